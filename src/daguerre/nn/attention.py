"""Multi-head attention: the one attention implementation every network in daguerre calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v over `heads` heads (Vaswani et al. 2017).

    q: (B, Tq, heads*d); k, v: (B, Tk, heads*d) -> (B, Tq, heads*d). `mask` is added to (bool: selects)
    the scores and broadcasts to (B, heads, Tq, Tk); `causal` masks future keys; `upcast` runs the
    attention in float32 for half-precision inputs (SD 2.1 overflows in float16 otherwise).
    """
    b, tq, c = q.shape
    d = c // heads
    dtype = q.dtype
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if _use_matmul_attention(q, k, v):
        out = matmul_attention(q, k, v, mask=mask, causal=causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, heads, Tq, d)
    return out.transpose(1, 2).reshape(b, tq, c).to(dtype)


def _use_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Training in half precision on the CPU: the backward of torch's fused CPU kernel in bfloat16 is
    5-20x slower than two batched matmuls at the sequence lengths of training (docs/benchmarks.md,
    "Attention in training"); its forward, and float32, are not, so inference keeps the fused kernel."""
    return (q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                     causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, T, d) tensors as two batched matmuls in the inputs' dtype,
    the softmax in float32; `mask` and `causal` as in `F.scaled_dot_product_attention`."""
    wide = torch.promote_types(q.dtype, torch.float32)  # the softmax in at least float32
    scores = torch.matmul(q, k.transpose(-1, -2)).to(wide) * q.shape[-1] ** -0.5  # (B, heads, Tq, Tk)
    if causal:
        tq, tk = scores.shape[-2:]
        future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)  # SDPA: top-left aligned
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)
