"""The attention function: its matmul form equals torch's fused kernel (values and gradients, masks,
causal), and training in bfloat16 on the CPU, which takes the matmul form, stays within bfloat16
rounding of float32."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

attn = importlib.import_module("daguerre.nn.attention")  # the module (the package exports the function)


def _qkv(tq=12, tk=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, t, 8, generator=g, dtype=dtype, requires_grad=True) for t in (tq, tk, tk)]


@pytest.mark.parametrize("case", ["plain", "cross", "causal", "bool mask", "additive mask"])
def test_matmul_attention_equals_sdpa_with_gradients(case):
    tk = 7 if case == "cross" else 12
    q, k, v = _qkv(12, tk)
    mask = None
    if case == "bool mask":
        mask = torch.rand(2, 1, 1, tk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True  # every query keeps a key
    elif case == "additive mask":
        mask = torch.randn(2, 1, 12, tk, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    causal = case == "causal"
    ours = attn.matmul_attention(q, k, v, mask=mask, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bf16_training_takes_the_matmul_form_and_matches_float32(monkeypatch):
    calls = []
    real = attn.matmul_attention
    monkeypatch.setattr(attn, "matmul_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (t.detach().float().reshape(2, 12, 24).requires_grad_() for t in _qkv(12, 12, torch.float32))
    out32 = attn.attention(q, k, v, 3, causal=True)
    assert not calls  # float32 keeps the fused kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, causal=True)
    assert calls and out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.03)
    g16 = torch.autograd.grad(out16.float().sum(), (q, k, v))
    g32 = torch.autograd.grad(out32.sum(), (q, k, v))
    for a, b in zip(g16, g32, strict=True):
        assert torch.linalg.vector_norm(a - b) < 0.05 * torch.linalg.vector_norm(b)
    calls.clear()
    with torch.no_grad():  # inference never takes the training form (bf16: the chunked one, test_attention_inference)
        attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3)
    assert not calls
