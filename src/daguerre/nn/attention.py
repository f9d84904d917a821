"""Multi-head attention: the one attention implementation every network in daguerre calls.

Three forms compute the same softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017); `_form` picks one per call
from the dtype, the device and whether a backward will run:

- "sdpa": torch's fused kernel, `F.scaled_dot_product_attention` (float32, where it is faster; GPUs);
- "matmul": two batched matmuls in the inputs' dtype, the softmax in float32 (half-precision training on
  the CPU, whose fused backward is 3-5x slower: docs/benchmarks.md, "Attention in training");
- "chunked": the matmul form at inference in query chunks that bound the scores tensor, in reused buffers
  (bfloat16 on a CPU with AVX512-BF16 but no AMX, where the fused kernel runs no faster than float32 while
  the bf16 matmuls do: 1.2-2x the fused kernel at SD's shapes; with AMX the fused kernel runs on the tiles
  and is 1.2-2.5x faster than the chunked form: docs/benchmarks.md, "Attention at inference").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu

# Elements of one chunk's scores tensor (batch x heads x query chunk x keys): 2^22 bf16 scores and their
# probabilities take 16 MiB, which stays in this CPU's L3 cache (bench/attention_inference.py).
CHUNK_ELEMENTS = 1 << 22


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
    form = _form(q, k, v)
    if form == "matmul":
        out = matmul_attention(q, k, v, mask=mask, causal=causal)
    elif form == "chunked":
        out = chunked_attention(q, k, v, mask=mask, causal=causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, heads, Tq, d)
    return out.transpose(1, 2).reshape(b, tq, c).to(dtype)


def _form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The form one call takes: "matmul" for half-precision training on the CPU (the fused kernel's bf16
    backward is 3-5x slower), "chunked" where `chunked_pays` says the chunked matmuls beat the fused kernel
    at inference, "sdpa" otherwise."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad:
        return "matmul" if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16) else "sdpa"
    return "chunked" if chunked_pays(q.dtype, q.device) else "sdpa"


def chunked_pays(dtype: torch.dtype, device: torch.device | str) -> bool:
    """The measured crossover (docs/benchmarks.md, "Attention at inference"). In bfloat16 on a CPU with
    AVX512-BF16 but no AMX (the AMD Zen 5 measured) the chunked matmul form beats the fused kernel at every
    shape of SD 1.5 (1.2x at 4096 tokens x 40 dims, 1.3-2.6x below, 1.9x at the VAE's 4096 x 512); with AMX
    (the Intel Xeon measured) torch's fused kernel computes on the tiles and wins at every shape (2.0x at
    4096 x 40, 1.2-2.5x elsewhere), so it keeps it. In float32 the chunked form loses everywhere (sgemm runs
    at about half the bf16 matmul's speed), so float32 keeps the fused kernel, bit for bit as before; so do
    float16 on the CPU (no fp16 units) and GPUs (fused flash kernels)."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not cpu.has_amx()


def attention_form(dtype: torch.dtype, device: torch.device | str) -> str:
    """In words, the attention form an inference run in `dtype` on `device` uses (for `daguerre info` and
    `--verbose`). Layers that upcast (the VAE's, SD 2.x's U-Net) run in float32 and keep the fused kernel."""
    if chunked_pays(dtype, device):
        return f"bf16 matmuls in query chunks of <= {CHUNK_ELEMENTS} scores, softmax in float32"
    return f"torch's fused kernel (SDPA) in {str(dtype).removeprefix('torch.')}"


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


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                      causal: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The matmul form for inference, in query chunks: per chunk, scores = q k^T / sqrt(d) as one batched
    matmul in the inputs' dtype (the scale applied to the float32 accumulator, `baddbmm`'s alpha), their
    softmax computed in float32 and stored in the inputs' dtype (torch's softmax of a bf16 tensor is the
    float32 softmax rounded once), then probabilities @ v. The two score buffers, (B*heads, chunk, Tk),
    hold at most `chunk_elements` elements (at least one query row) and are reused across chunks, which
    also saves the page faults of fresh allocations. (B, heads, T, d) tensors; `mask` and `causal` as in
    `F.scaled_dot_product_attention`. No gradients (the buffers are written in place)."""
    b, h, tq, d = q.shape
    tk, dv = k.shape[-2], v.shape[-1]
    bh = b * h
    q3, v3 = q.reshape(bh, tq, d), v.reshape(bh, tk, dv)  # copies of the (B, T, heads, d) views
    kt = k.reshape(bh, tk, d).transpose(1, 2)  # (BH, d, Tk)
    rows = max(1, min(tq, chunk_elements // max(1, bh * tk)))
    scores = torch.empty(bh * rows * tk, dtype=q.dtype, device=q.device)  # flat: every chunk's view is contiguous
    probs = torch.empty_like(scores)
    out = torch.empty(bh, tq, dv, dtype=v.dtype, device=q.device)
    if mask is not None:
        mask = mask.expand(b, h, tq, tk)  # a view: each chunk's slice is copied to (BH, n, Tk) alone
    for i in range(0, tq, rows):
        n = min(rows, tq - i)
        s, p = scores[:bh * n * tk].view(bh, n, tk), probs[:bh * n * tk].view(bh, n, tk)
        torch.baddbmm(s, q3[:, i:i + n], kt, beta=0, alpha=d ** -0.5, out=s)  # (BH, n, Tk)
        if causal:  # SDPA's causal mask is top-left aligned: query i + r sees keys 0..i + r
            s.masked_fill_(torch.ones(n, tk, dtype=torch.bool, device=q.device).triu(i + 1), float("-inf"))
        if mask is not None:
            m = mask[:, :, i:i + n].reshape(bh, n, tk)
            if m.dtype == torch.bool:
                s.masked_fill_(~m, float("-inf"))
            else:
                s.add_(m)
        torch.ops.aten._softmax.out(s, -1, False, out=p)  # float32 inside, rounded once to the inputs' dtype
        out[:, i:i + n] = torch.bmm(p, v3)  # (BH, n, dv): small beside the scores
    return out.reshape(b, h, tq, dv)
