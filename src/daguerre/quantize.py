"""Weight-only int8 quantisation: the Linear and Conv2d layers of a network hold int8 weights and one scale per
output channel, and compute in the compute dtype (LLM.int8's absmax per-row scaling without its outlier
decomposition, Dettmers et al. 2022; the "weight-only int8" of torchao/gpt-fast).

A layer's weight w (out, ...) becomes q = round(w / s) in [-127, 127] with s = max|w| / 127 per output channel,
s rounded to the compute dtype first so that q * s is the nearest grid point for the scale actually used. Each
call dequantises q * s into the compute dtype (one multiply, ~0.3 ns per weight) and runs the ordinary
`F.linear` / `F.conv2d`; torch's own int8 weight-only kernel (`aten._weight_int8pack_mm`) ran 2-3x slower than
the bf16 matmul on this CPU. The dequantisation is not free where activations are small: an SD 1.5 step at a
32x32 latent measured 1.3-1.6x the bf16 one on a loaded machine (docs/benchmarks.md, "int8 weights").
Resident weights shrink from 2 bytes (bf16) to 1 byte per parameter, plus one transient dequantised layer.

A quantised network refuses to produce a state dict (`QuantizedWeightsError`): a checkpoint written from it
(`daguerre convert`, `save_model`) would carry the int8 rounding as if it were the model, silently. Write
checkpoints from the model loaded without quantisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127  # symmetric: -127..127, so that -q is representable and zero is exact
# Layers with fewer weights stay in the compute dtype: their memory is negligible (the time embedding's and the
# norms' are below this) and a tiny matmul is dominated by the dequantisation call.
MIN_PARAMS = 1 << 14


class QuantizedWeightsError(ValueError):
    """A state dict (hence a checkpoint) was asked of a network with int8-quantised layers."""


def _quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, per-output-channel scales in `dtype`, shaped to broadcast over the weight)."""
    w = weight.detach().float()
    absmax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    scale = (absmax / QMAX).to(dtype).reshape(-1, *([1] * (w.ndim - 1)))  # (out, 1, ...) in the compute dtype
    q = torch.round(w / scale.float()).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale  # elementwise ops keep the weight's memory format (channels_last stays channels_last)


class _Int8Weight(nn.Module):
    """Shared by the int8 layers: the int8 weight and its scales as buffers (so `.to(dtype)` moves the scales, and
    with them the compute dtype, while the int8 weight stays int8), dequantised on each call."""

    def _init_weight(self, layer: nn.Module) -> None:
        q, scale = _quantize(layer.weight, layer.weight.dtype)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = layer.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in the compute dtype (the scales' dtype), in the int8 weight's memory format."""
        return torch.mul(self.weight_int8, self.weight_scale)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (dequantised) weight, a fresh tensor, for code that reads a layer's `.weight` (its dtype,
        its device); not a parameter."""
        return self.dequantized_weight()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise QuantizedWeightsError(
            f"layer {prefix.rstrip('.') or type(self).__name__} holds int8-quantised weights (daguerre.quantize): "
            "a checkpoint written from it would carry the int8 rounding as the model's weights; write checkpoints "
            "from the model loaded without --quantize")


class Int8Linear(_Int8Weight):
    """`nn.Linear` with an int8 weight and per-output-channel scales, computed in the scales' dtype."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_weight(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Conv2d(_Int8Weight):
    """`nn.Conv2d` (zero padding) with an int8 weight and per-output-channel scales, computed in the scales' dtype."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._init_weight(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def _convertible(layer: nn.Module, min_params: int) -> bool:
    if type(layer) is nn.Linear:
        return layer.weight.numel() >= min_params
    if type(layer) is nn.Conv2d:  # a string padding ("same") or another padding mode keeps the float layer
        return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                and layer.weight.numel() >= min_params)
    return False


@torch.no_grad()
def quantize_int8_(module: nn.Module, *, min_params: int = MIN_PARAMS) -> int:
    """Replace, in place, every `nn.Linear` and `nn.Conv2d` of `module` with at least `min_params` weights by its
    weight-only int8 form (per-output-channel absmax scales in the layer's dtype, which stays the compute dtype);
    return how many layers were converted. Floating-point layers only; an already quantised layer is left as it is.
    The module then refuses `state_dict()` (`QuantizedWeightsError`), so that no checkpoint is written from it."""
    if min_params < 1:
        raise ValueError(f"min_params must be at least 1, got {min_params}")
    todo = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if _convertible(child, min_params) and child.weight.is_floating_point()]
    for parent, name, child in todo:
        setattr(parent, name, Int8Linear(child) if isinstance(child, nn.Linear) else Int8Conv2d(child))
    return len(todo)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds int8-quantised layers (`quantize_int8_`)."""
    return any(isinstance(m, _Int8Weight) for m in module.modules())


def weight_count(module: nn.Module) -> int:
    """The number of weights of `module`, its int8-quantised ones included (they are buffers, not parameters):
    the size that decides thread counts and layouts, the same before and after `quantize_int8_`."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.weight_int8.numel() for m in module.modules() if isinstance(m, _Int8Weight))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers `module` holds (each tensor counted once): its resident weights."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
