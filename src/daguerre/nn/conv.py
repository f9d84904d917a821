"""Convolutions and linear layers written as other kernels than torch's oneDNN calls, for measuring them.

`bench/conv_shapes.py` times each form against `F.conv2d` / `F.linear` at the shapes of an SD 1.5 step and
of the VAE decoder (docs/benchmarks.md, "Convolutions and linear layers"):

- `im2col_conv2d`: the k x k input patches of a channels_last input gathered into rows (im2col), chunked over
  output rows so the patch buffer holds at most `IM2COL_ELEMENTS`, each chunk one GEMM with the weight read
  in place (a channels_last weight (O, C, kh, kw) is already (O, kh*kw*C) in memory);
- `shifted_conv2d`: the kxk convolution as k*k GEMMs of shifted views of the padded input, accumulated in the
  output (the "kn2row" form); torch's CPU GEMM has no bf16-in, float32-out variant, so the running sum is
  rounded to bf16 after each of the k*k products;
- `conv1x1_as_linear`: a 1x1 convolution as one GEMM over the channels of the NHWC view (no copy);
- `packed_conv2d` / `packed_linear`: oneDNN with the weight reordered once into its blocked layout
  (`torch.ops.mkldnn._reorder_*_weight`, what inductor's freezing does) instead of on every call.

Every form computes the same sums as `F.conv2d` in another order (the packed ones in the same order: equal bit
for bit); float32 is the reference their errors are stated against.

The one form that won (the table in docs/benchmarks.md) runs in daguerre: `PackedConv2d` and `PackedLinear`,
which `pack_for_inference_` puts in place of a network's Conv2d and Linear layers where `packing_pays` says so
(bfloat16 on a CPU, at inference). Each holds its weight once, in oneDNN's layout for the last input shape it
saw (packed on that shape's first call, packed again when the shape changes: a 1x1 convolution's layout for
one size ran 200x slower at another), so the resident memory stays that of the plain weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Layers with fewer input or output channels keep torch's call: the SD U-Net's 4-channel conv_in and out
# convolution ran 1.5-1.7x slower packed (bench/conv_shapes.py).
MIN_PACKED_CHANNELS = 8
# Elements of one im2col chunk's patch buffer: 2^22 bf16 values, 8 MiB, which stays in this CPU's L3 cache.
IM2COL_ELEMENTS = 1 << 22


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  max_elements: int = IM2COL_ELEMENTS) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (groups 1, dilation 1) as im2col + GEMM, in x's dtype.

    x (B, C, H, W) is read through its NHWC view (free when x is channels_last); the patches of a band of output
    rows, (rows*W_out, kh*kw*C), are copied into a buffer of at most `max_elements` (at least one output row),
    and one `addmm` per band writes that band of the (B, H_out, W_out, O) output. Returns the output as a
    channels_last (B, O, H_out, W_out) view. Memory: the output, the padded input copy and one patch buffer."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()  # (B, H+2ph, W+2pw, C)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    wk = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)  # (O, kh*kw*C): a view of a channels_last weight
    out = torch.empty(b, ho, wo, o, dtype=x.dtype, device=x.device)
    s = xp.stride()
    patches = xp.as_strided((b, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))
    rows = max(1, max_elements // (wo * kh * kw * c))
    for i in range(b):
        for r in range(0, ho, rows):
            band = patches[i, r:r + rows].reshape(-1, kh * kw * c)  # the one copy: (rows*W_out, kh*kw*C)
            dest = out[i, r:r + rows].view(-1, o)
            if bias is None:
                torch.mm(band, wk.t(), out=dest)
            else:
                torch.addmm(bias, band, wk.t(), out=dest)
    return out.permute(0, 3, 1, 2)


def shifted_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   padding: int | tuple[int, int] = 0) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1, groups 1) as kh*kw GEMMs of shifted row ranges of
    the flattened padded NHWC input, each added into the output (accumulated in x's dtype: see the module
    docstring). Output positions are computed over the padded grid and the border cropped away (a copy);
    returns a channels_last (B, O, H_out, W_out) tensor."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ph, pw = _pair(padding)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()  # (B, Hp, Wp, C)
    hp, wp = h + 2 * ph, w + 2 * pw
    flat = xp.view(-1, c)  # (B*Hp*Wp, C)
    n = flat.shape[0]
    wt = weight.permute(2, 3, 1, 0)  # (kh, kw, C, O) views
    acc = torch.zeros(n, o, dtype=x.dtype, device=x.device)
    if bias is not None:
        acc += bias
    for i in range(kh):
        for j in range(kw):
            shift = i * wp + j
            rows = acc[: n - shift]
            torch.addmm(rows, flat[shift:], wt[i, j], out=rows)
    ho, wo = hp - kh + 1, wp - kw + 1
    return acc.view(b, hp, wp, o)[:, :ho, :wo].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def conv1x1_as_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1, stride-1 `F.conv2d` as `F.linear` over the channels of x's NHWC view (a view, no copy, when x is
    channels_last); returns a channels_last (B, O, H, W) view."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


def pack_conv_weight(weight: torch.Tensor, stride, padding, groups: int,
                     input_size: tuple[int, ...] | None) -> torch.Tensor:
    """The conv weight reordered once into oneDNN's blocked layout for inputs of `input_size` (an opaque
    `torch._mkldnn` tensor; `.to_dense()` gives the weight back exactly). Without `input_size` oneDNN guesses a
    layout, which for 1x1 convolutions measured up to 40x slower than `F.conv2d` (docs/benchmarks.md)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(_pair(padding)), list(_pair(stride)), [1, 1], groups,
        None if input_size is None else list(input_size))


def packed_conv2d(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                  groups: int) -> torch.Tensor:
    """`F.conv2d` with a weight from `pack_conv_weight` (equal bit for bit; the same memory format out)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(_pair(padding)), list(_pair(stride)), [1, 1], groups, "none", [], "")


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
