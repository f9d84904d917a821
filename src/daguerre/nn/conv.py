"""Convolutions and linear layers with their weights reordered once into oneDNN's blocked layout.

torch's bf16 conv and linear calls on a CPU reorder every weight into oneDNN's layout on every call.
`packed_conv2d` / `packed_linear` run oneDNN with a weight reordered once (`pack_conv_weight`,
`pack_linear_weight`: `torch.ops.mkldnn._reorder_*_weight`, what inductor's freezing does), the same sums in the
same order: equal to `F.conv2d` / `F.linear` bit for bit. `bench/conv_shapes.py` times them, and the other forms
tried (im2col, shifted GEMMs, 1x1 as a GEMM: `bench/conv_forms.py`), against torch's calls at the shapes of an
SD 1.5 step and of the VAE decoder (docs/benchmarks.md, "Convolutions and linear layers"); packing was the one
form that won.

`PackedConv2d` and `PackedLinear` run it in daguerre: `pack_for_inference_` puts them in place of a network's
Conv2d and Linear layers where `packing_pays` says so (bfloat16 on a CPU, at inference). Each holds its weight
once, in oneDNN's layout for the last input shape it saw (packed on that shape's first call, packed again when
the shape changes: a 1x1 convolution's layout for one size ran 200x slower at another), so the resident memory
stays that of the plain weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Layers with fewer input or output channels keep torch's call: the SD U-Net's 4-channel conv_in and out
# convolution ran 1.5-1.7x slower packed (bench/conv_shapes.py).
MIN_PACKED_CHANNELS = 8


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pack_conv_weight(weight: torch.Tensor, stride, padding, groups: int,
                     input_size: tuple[int, ...] | None) -> torch.Tensor:
    """The conv weight reordered once into oneDNN's blocked layout for inputs of `input_size` (an opaque
    `torch._mkldnn` tensor; `.to_dense()` gives the weight back exactly). Without `input_size` oneDNN guesses a
    layout, which for 1x1 convolutions measured up to 40x slower than `F.conv2d` (docs/benchmarks.md)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(pair(padding)), list(pair(stride)), [1, 1], groups,
        None if input_size is None else list(input_size))


def packed_conv2d(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                  groups: int) -> torch.Tensor:
    """`F.conv2d` with a weight from `pack_conv_weight` (equal bit for bit; the same memory format out)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(pair(padding)), list(pair(stride)), [1, 1], groups, "none", [], "")


def pack_linear_weight(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The (out, in) linear weight reordered once into oneDNN's layout for `rows` input rows (opaque)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` with a weight from `pack_linear_weight`, equal bit for bit for a contiguous x (for a strided x
    with a bias, F.linear adds the bias after rounding the product: one bf16 rounding apart)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_pays(dtype: torch.dtype, device: torch.device | str) -> bool:
    """The measured rule (docs/benchmarks.md, "Convolutions and linear layers"): oneDNN-packed weights in
    bfloat16 on a CPU with oneDNN, where torch's conv and linear calls reorder every weight on every call; the
    packed forms are equal to them bit for bit. float32 (MKL's GEMM, and the bit-identity with diffusers that
    tests/test_golden.py pins), float16 on the CPU and GPUs keep torch's calls."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class _Packed:
    """Shared by the packed layers: the weight Parameter stays registered (so that parameter counts, dtypes and
    devices read as before) but, while packed, holds a placeholder (one zero, expanded to the weight's shape),
    the values living in `_packed`, oneDNN's layout for inputs of shape `_packed_for`.

    Reading `.weight` (a LoRA merge, code that inspects the layer) unpacks the layer for good: the Parameter
    gets its values back (exactly: a reorder) and the layer computes with torch's call from then on, so a
    weight changed through `.weight` is the weight used. `state_dict` writes the values; `.to()` and the like
    unpack first; calls with gradients, in another dtype or on another device take torch's call."""

    _packed: torch.Tensor | None
    _packed_for: tuple[int, ...] | None
    _dense_format: torch.memory_format = torch.contiguous_format

    @property
    def weight(self) -> nn.Parameter:
        self._unpack()
        return self._parameters["weight"]

    def is_packed(self) -> bool:
        return self._packed is not None

    def stored_weight(self) -> torch.Tensor:
        """The weight's values as a plain tensor in the memory format it had, without unpacking the layer."""
        if self._packed is None:
            return self._parameters["weight"].data
        return self._packed.to_dense().contiguous(memory_format=self._dense_format)

    def _unpack(self) -> None:
        if self._packed is not None:
            self._parameters["weight"].data = self.stored_weight()
            self._packed = self._packed_for = None

    def _pack(self, input_shape: tuple[int, ...]) -> None:
        """Pack the weight for inputs of `input_shape` (from the plain values or from another packed layout)."""
        dense = self.stored_weight()
        if self._packed is None:
            cl = dense.dim() == 4 and dense.is_contiguous(memory_format=torch.channels_last) \
                and not dense.is_contiguous()
            self._dense_format = torch.channels_last if cl else torch.contiguous_format
        self._packed = self._reorder(dense, input_shape)
        self._packed_for = input_shape
        param = self._parameters["weight"]
        if param.data.stride() != (0,) * param.dim():  # release the plain values: one copy, the packed one
            param.data = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)

    def _packed_call(self, x: torch.Tensor) -> bool:
        """Whether this call can take the packed form (packing for x's shape if needed)."""
        param = self._parameters["weight"]
        if (torch.is_grad_enabled() and (x.requires_grad or param.requires_grad)) or not packing_pays(
                x.dtype, x.device) or param.dtype != x.dtype or param.device != x.device:
            self._unpack()
            return False
        if self._packed_for != tuple(x.shape):
            self._pack(tuple(x.shape))
        return True

    @classmethod
    def of(cls, layer: nn.Module) -> nn.Module:
        """The packed twin of `layer`: its attributes, holding the very same Parameters (not copies)."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._parameters = dict(layer._parameters)
        new._packed = new._packed_for = None
        return new

    def _apply(self, fn, recurse=True):
        if self._packed is not None:
            param = self._parameters["weight"]
            probe = torch.zeros(1, dtype=param.dtype, device=param.device)
            if fn(probe).is_meta:  # released to the meta device (Components.release): the values are not needed
                self._packed = self._packed_for = None
            else:
                self._unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.stored_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpack()
        super()._load_from_state_dict(*args, **kwargs)


class PackedConv2d(_Packed, nn.Conv2d):
    """`nn.Conv2d` computing with a oneDNN-packed weight at inference (`_Packed`); equal to it bit for bit."""

    def _reorder(self, dense: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        return pack_conv_weight(dense, self.stride, self.padding, self.groups, input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.padding_mode == "zeros" and self.dilation == (1, 1) and isinstance(self.padding, tuple)
                and x.dim() == 4 and self._packed_call(x)):
            y = packed_conv2d(x, self._packed, self.bias, self.stride, self.padding, self.groups)
            # F.conv2d's rule: channels_last out when the input or the weight is channels_last
            cl = self._dense_format == torch.channels_last or (
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return y if cl else y.contiguous()
        return self._conv_forward(x, self._parameters["weight"], self.bias)


class PackedLinear(_Packed, nn.Linear):
    """`nn.Linear` computing with a oneDNN-packed weight at inference (`_Packed`); equal to it bit for bit."""

    def _reorder(self, dense: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        return pack_linear_weight(dense, torch.Size(input_shape[:-1]).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and self._packed_call(x):  # oneDNN's result for a strided x: F.linear's of x.contiguous()
            return packed_linear(x.contiguous(), self._packed, self.bias)
        return F.linear(x, self._parameters["weight"], self.bias)


def pack_for_inference_(module: nn.Module) -> int:
    """In place: every `nn.Conv2d` (zero padding, no dilation, at least `MIN_PACKED_CHANNELS` in and out) and
    `nn.Linear` of `module` becomes its packed twin (`PackedConv2d`, `PackedLinear`: the same Parameters,
    packed on their first call in bf16 on a CPU); returns how many layers were replaced. A no-op on layers
    already packed and on other layer types (int8)."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Packed):
                continue
            if type(child) is nn.Conv2d and child.padding_mode == "zeros" and child.dilation == (1, 1) \
                    and isinstance(child.padding, tuple) \
                    and min(child.in_channels, child.out_channels) >= MIN_PACKED_CHANNELS:
                setattr(parent, name, PackedConv2d.of(child))
                count += 1
            elif type(child) is nn.Linear:
                setattr(parent, name, PackedLinear.of(child))
                count += 1
    return count


def is_pack_ready(module: nn.Module) -> bool:
    """Whether `pack_for_inference_` was applied to `module` (its layers pack on their next bf16 CPU call)."""
    return any(isinstance(m, _Packed) for m in module.modules())


def unpack_(module: nn.Module) -> int:
    """In place: the packed layers of `module` back to plain `nn.Conv2d` / `nn.Linear` holding the weight's
    values (what `torch.compile`'s freezing and other code that reads parameters directly need); returns how
    many were replaced."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Packed):
                child._unpack()
                cls = nn.Conv2d if isinstance(child, nn.Conv2d) else nn.Linear
                plain = cls.__new__(cls)
                plain.__dict__.update({k: v for k, v in child.__dict__.items()
                                       if k not in ("_packed", "_packed_for", "_dense_format")})
                setattr(parent, name, plain)
                count += 1
    return count
