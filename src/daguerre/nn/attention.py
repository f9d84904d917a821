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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, heads, Tq, d)
    return out.transpose(1, 2).reshape(b, tq, c).to(dtype)
