"""Convolutions written as other kernels than torch's oneDNN call, for measuring them (bench/conv_shapes.py;
docs/benchmarks.md, "Convolutions and linear layers"). None beat oneDNN on the SD 1.5 shapes, so daguerre runs
none of them; `daguerre.nn.conv` holds the form that won (weights packed once).

- `im2col_conv2d`: the k x k input patches of a channels_last input gathered into rows (im2col), chunked over
  output rows so the patch buffer holds at most `IM2COL_ELEMENTS`, each chunk one GEMM with the weight read
  in place (a channels_last weight (O, C, kh, kw) is already (O, kh*kw*C) in memory);
- `shifted_conv2d`: the kxk convolution as k*k GEMMs of shifted views of the padded input, accumulated in the
  output (the "kn2row" form); torch's CPU GEMM has no bf16-in, float32-out variant, so the running sum is
  rounded to bf16 after each of the k*k products;
- `conv1x1_as_linear`: a 1x1 convolution as one GEMM over the channels of the NHWC view (no copy).

Each computes the same sums as `F.conv2d` in another order; float32 is the reference their errors are stated
against (tests/test_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daguerre.nn.conv import pair

# Elements of one im2col chunk's patch buffer: 2^22 bf16 values, 8 MiB, which stays in this CPU's L3 cache.
IM2COL_ELEMENTS = 1 << 22


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
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
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
    ph, pw = pair(padding)
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
