"""Weight-only int8 quantisation: the Linear and Conv2d layers of a network hold int8 weights and one scale per
output channel, and compute in the compute dtype (LLM.int8's absmax per-row scaling without its outlier
decomposition, Dettmers et al. 2022; the "weight-only int8" of torchao/gpt-fast).

A layer's weight w (out, ...) becomes q = round(w / s) in [-127, 127] with s = max|w| / 127 per output channel,
s rounded to the compute dtype first so that q * s is the nearest grid point for the scale actually used. Each
call dequantises q * s into the compute dtype (one multiply, ~0.3 ns per weight) and runs the ordinary
`F.linear` / `F.conv2d`; torch's own int8 weight-only kernel (`aten._weight_int8pack_mm`) ran 2-3x slower than
the bf16 matmul on this CPU. The dequantisation is not free where activations are small: an SD 1.5 step at a
32x32 latent measured 1.3-1.6x the bf16 one on a loaded machine (docs/benchmarks.md, "int8 weights").
Resident weights shrink from 2 bytes (bf16) to 1 byte per parameter, plus one buffer as large as the largest
dequantised layer, per thread, reused by every call without gradients (a fresh tensor per call under autograd).

Quantised while read (`int8_loading`): inside that context a safetensors file's Linear/Conv-shaped tensors are
quantised one at a time as the reader converts them to the compute dtype (the reader asks `read_hook`), and
`weights.strict.instantiate` builds the network's int8 layers on the meta device and fills them; so a float copy
of the whole U-Net never exists and the load peaks at about the int8 footprint. A tensor quantised on reading
that turns out not to belong to a quantised layer (the VAE's convolutions, an embedding) is read again as it
was. The result equals quantising after a float load, bit for bit (tests/test_quantize.py).

A quantised network refuses to produce a state dict (`QuantizedWeightsError`): a checkpoint written from it
(`daguerre convert`, `save_model`) would carry the int8 rounding as if it were the model, silently. Write
checkpoints from the model loaded without quantisation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory import trim

QMAX = 127  # symmetric: -127..127, so that -q is representable and zero is exact
# Layers with fewer weights stay in the compute dtype: their memory is negligible (the time embedding's and the
# norms' are below this) and a tiny matmul is dominated by the dequantisation call.
MIN_PARAMS = 1 << 14
QUANTIZE_BLOCK = 1 << 20  # weights quantised at a time (`_quantize`): 4 MiB of float32 scratch


class QuantizedWeightsError(ValueError):
    """A state dict (hence a checkpoint) was asked of a network with int8-quantised layers."""


class QuantizeWhileReadingError(RuntimeError):
    """A loader changed a weight quantised on reading beyond a rename or a reshape (e.g. split or filled it):
    the load is to be done again without `int8_loading`, quantising after it (`registry`)."""


def _quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, per-output-channel scales in `dtype`, shaped to broadcast over the weight).

    Computed in float32 a block of rows at a time (at most `QUANTIZE_BLOCK` weights), so that quantising a large
    layer needs a few MiB of scratch memory, not several float32 copies of it; every element and every row's
    maximum are what the whole-tensor computation gives."""
    w = weight.detach()
    if w.is_meta:  # a network built on the meta device: shapes only (and no meta kernels, weights.strict)
        scale = torch.empty(w.shape[0], *([1] * (w.ndim - 1)), dtype=dtype, device="meta")
        return torch.empty_strided(w.shape, w.stride(), dtype=torch.int8, device="meta"), scale
    # abs and max are exact in any float dtype, and rounding to float32 keeps the order: the same maximum
    absmax = w.reshape(w.shape[0], -1).abs().amax(1).float().clamp_min(torch.finfo(torch.float32).tiny)
    scale = (absmax / QMAX).to(dtype).reshape(-1, *([1] * (w.ndim - 1)))  # (out, 1, ...) in the compute dtype
    q = torch.empty_like(w, dtype=torch.int8)  # keeps the weight's memory format (channels_last stays so)
    step = max(1, QUANTIZE_BLOCK // max(1, w[0].numel()))
    for i in range(0, w.shape[0], step):
        q[i:i + step] = torch.round(w[i:i + step].float() / scale[i:i + step].float()).clamp_(-QMAX, QMAX)
    return q, scale


_SCRATCH = threading.local()  # per thread: (dtype, device) -> a flat buffer as large as the largest weight


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements for dequantised weights, one per thread, dtype and device,
    grown to the largest layer and reused by every call: a fresh tensor per call left freed weights of every
    size in glibc's heap (~0.1 GiB more at the peak of sampling SD 1.5 with int8 weights)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buffers.pop((dtype, device), None)
        del buf
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            buf = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf


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

    def _call_weight(self) -> torch.Tensor:
        """The dequantised weight for one call: without gradients, written into this thread's scratch buffer
        (`_scratch`), which the next layer's call overwrites; else a fresh tensor (autograd keeps it)."""
        if torch.is_grad_enabled():
            return self.dequantized_weight()
        q = self.weight_int8
        out = _scratch(q.numel(), self.weight_scale.dtype, q.device).as_strided(q.shape, q.stride())
        return torch.mul(q, self.weight_scale, out=out)

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
        return F.linear(x, self._call_weight(), self.bias)

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
        return F.conv2d(x, self._call_weight(), self.bias, self.stride, self.padding, self.dilation,
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


# --- quantising while the weights are read -------------------------------------------------------------------

_INT8_LOADING: ContextVar[bool] = ContextVar("daguerre_int8_loading", default=False)
_SCALE, _REREAD = "_daguerre_int8_scale", "_daguerre_int8_reread"  # attributes of a tensor quantised on reading


@contextlib.contextmanager
def int8_loading() -> Iterator[None]:
    """While the context lasts, weights read from safetensors files are quantised as they are read, and the
    U-Net and text encoder built from them (`components.build_components`) get their int8 layers filled
    directly (module docstring); the networks equal `quantize_int8_` applied after a float load. Raises
    `QuantizeWhileReadingError` for a loader that does more than rename or reshape such a weight."""
    token = _INT8_LOADING.set(True)
    try:
        yield
    finally:
        _INT8_LOADING.reset(token)


# A per-tensor hook on what `weights.io.read_state_dict` reads from a safetensors file: hook(key, tensor, reread)
# -> the tensor to keep, where `reread()` reads the same tensor again (converted as the first time).
ReadHook = Callable[[str, torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


def read_hook() -> ReadHook | None:
    """The hook the weight reader applies to each tensor it reads: quantising inside `int8_loading`, else None."""
    return _quantize_on_read if _INT8_LOADING.get() else None


def int8_loading_active() -> bool:
    """Whether the current load is inside `int8_loading` (so the U-Net and the text encoder are built int8)."""
    return _INT8_LOADING.get()


def _quantize_on_read(key: str, t: torch.Tensor, reread: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A `ReadHook`: a tensor shaped like a quantisable Linear (2-D) or Conv2d (4-D) weight becomes
    its int8 form, carrying its scales and a way to read the float tensor again; anything else is kept."""
    if not (t.is_floating_point() and t.ndim in (2, 4) and t.numel() >= MIN_PARAMS):
        return t
    trim()  # the float tensors read before, freed between the kept int8 ones: back to the system (daguerre.memory)
    q, scale = _quantize(t, t.dtype)
    setattr(q, _SCALE, scale)
    setattr(q, _REREAD, reread)
    return q


def _read_source(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor quantised on reading that `t` is, or is a reshape of (rows kept: per-row scales still hold)."""
    if hasattr(t, _SCALE):
        return t
    base = t._base
    if (base is not None and hasattr(base, _SCALE) and t.is_contiguous() and t.numel() == base.numel()
            and t.shape[0] == base.shape[0]):
        return base
    if t.dtype == torch.int8 and _INT8_LOADING.get():
        raise QuantizeWhileReadingError("a weight quantised while read was changed by the loader")
    return None


def int8_weight(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, per-output-channel scales in `dtype`) of a layer weight given as a float tensor (cast to
    `dtype` first, as a load would) or as a tensor quantised on reading (`int8_loading`)."""
    source = _read_source(t)
    if source is None:
        return _quantize(t.to(dtype), dtype)
    scale = getattr(source, _SCALE)
    if scale.dtype != dtype:
        raise QuantizeWhileReadingError(f"read with scales in {scale.dtype}, built in {dtype}")
    return t.detach(), scale.reshape(t.shape[0], *([1] * (t.ndim - 1)))


def float_value(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or for a tensor quantised on reading whose layer is not quantised, the float tensor read
    again (reshaped as `t` is)."""
    source = _read_source(t)
    return t if source is None else getattr(source, _REREAD)().reshape(t.shape)


def int8_layer_names(model: nn.Module) -> set[str]:
    """The names of `model`'s int8 layers (`quantize_int8_`)."""
    return {name for name, m in model.named_modules() if isinstance(m, _Int8Weight)}
