"""Attention at inference: the chunked matmul form equals torch's fused kernel (float32 within 1e-5, masks and
causal included, at chunk boundaries that do not divide the queries), bfloat16 stays within bf16 rounding of
float32, and the dispatcher takes the form the measured rule names (docs/benchmarks.md, "Attention at
inference")."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from daguerre import cpu, precision

attn = importlib.import_module("daguerre.nn.attention")  # the module (the package exports the function)


def _qkv(tq, tk, d=8, heads=3, dtype=torch.float32, seed=0):
    """(B, heads, T, d) views of (B, T, heads*d) tensors, as the networks pass them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, t, heads, d, generator=g).to(dtype).transpose(1, 2) for t in (tq, tk, tk)]


def _mask(case, tq, tk):
    g = torch.Generator().manual_seed(1)
    if case == "bool mask":
        m = torch.rand(2, 1, tq, tk, generator=g) > 0.3
        m[..., 0] = True  # every query keeps a key
        return m
    if case == "bool key mask":  # broadcast over queries, as BERT's padding mask
        m = torch.rand(2, 1, 1, tk, generator=g) > 0.3
        m[..., 0] = True
        return m
    if case == "additive mask":
        return torch.randn(2, 3, tq, tk, generator=g)
    return None


@pytest.mark.parametrize("case", ["plain", "cross", "causal", "causal cross", "bool mask", "bool key mask",
                                  "additive mask"])
@pytest.mark.parametrize("rows", [1, 4, 5, 23])  # query rows per chunk: 23 queries are not a multiple of 4 or 5
def test_chunked_equals_sdpa_in_float32(case, rows):
    tq, tk = 23, (11 if "cross" in case else 23)
    q, k, v = _qkv(tq, tk)
    mask, causal = _mask(case, tq, tk), case.startswith("causal")
    ours = attn.chunked_attention(q, k, v, mask=mask, causal=causal, chunk_elements=2 * 3 * rows * tk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_chunks_do_not_divide_the_queries(monkeypatch):
    """23 queries in chunks of 5 rows: four full chunks and a last one of 3, each a contiguous view of the buffers."""
    q, k, v = _qkv(23, 23)
    rows = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **kw: rows.append(a[1].shape[1]) or real(*a, **kw))
    out = attn.chunked_attention(q, k, v, causal=True, chunk_elements=6 * 23 * 5)
    assert rows == [5, 5, 5, 5, 3]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_bf16_is_within_bf16_rounding_of_float32(causal):
    q, k, v = _qkv(40, 40, d=16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ours = attn.chunked_attention(*(t.bfloat16() for t in (q, k, v)), causal=causal, chunk_elements=6 * 40 * 7)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() < 0.03  # bf16 keeps 8 bits: 2^-8 of values around 1, a few roundings


def _forms_taken(monkeypatch):
    taken = []
    for name in ("chunked_attention", "matmul_attention"):
        real = getattr(attn, name)
        monkeypatch.setattr(attn, name, lambda *a, _n=name, _r=real, **kw: taken.append(_n) or _r(*a, **kw))
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention",
                        lambda *a, **kw: taken.append("sdpa") or real_sdpa(*a, **kw))
    return taken


def test_dispatcher_takes_the_form_the_rule_names(monkeypatch):
    monkeypatch.setattr(cpu, "has_amx", lambda: False)  # a bf16 CPU without AMX: the chunked form
    taken = _forms_taken(monkeypatch)
    q, k, v = (t.transpose(1, 2).reshape(2, 23, 24) for t in _qkv(23, 23))
    with torch.no_grad():
        out32 = attn.attention(q, k, v, 3)
        assert taken == ["sdpa"]  # float32 inference: the fused kernel, bit for bit as before
        taken.clear()
        out16 = attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3)
        assert taken == ["chunked_attention"] and out16.dtype == torch.bfloat16
        taken.clear()
        attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, upcast=True)  # upcast runs in float32
        assert taken == ["sdpa"]
        taken.clear()
        attn.attention(q.half(), k.half(), v.half(), 3)  # no fp16 units on CPUs: the rule keeps the fused kernel
        assert taken == ["sdpa"]
    torch.testing.assert_close(out16.float(), out32, rtol=0, atol=0.03)
    taken.clear()
    qg = q.bfloat16().requires_grad_()
    attn.attention(qg, k.bfloat16(), v.bfloat16(), 3)  # training in bf16: the unchunked matmul form, with gradients
    assert taken == ["matmul_attention"]
    assert attn.chunked_pays(torch.bfloat16, "cpu") and not attn.chunked_pays(torch.float32, "cpu")
    assert not attn.chunked_pays(torch.bfloat16, "cuda") and not attn.chunked_pays(torch.float16, "cpu")


def test_with_amx_bf16_inference_keeps_the_fused_kernel(monkeypatch):
    """On AMX the fused kernel runs on the tiles and is faster (docs/benchmarks.md): no chunked form there;
    training in bf16 still takes the matmul form (the fused backward is 3-4x slower on AMX too)."""
    monkeypatch.setattr(cpu, "has_amx", lambda: True)
    taken = _forms_taken(monkeypatch)
    q, k, v = (t.transpose(1, 2).reshape(2, 23, 24).bfloat16() for t in _qkv(23, 23))
    with torch.no_grad():
        attn.attention(q, k, v, 3)
    assert taken == ["sdpa"] and not attn.chunked_pays(torch.bfloat16, "cpu")
    assert attn.attention_form(torch.bfloat16, "cpu") == "torch's fused kernel (SDPA) in bfloat16"
    taken.clear()
    attn.attention(q.requires_grad_(), k, v, 3)
    assert taken == ["matmul_attention"]


def test_the_amx_probe_reads_the_cpu_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_AMX", None)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: calls.append(1) or {"amx_bf16": True}, raising=False)
    assert cpu.has_amx() and cpu.has_amx() and calls == [1]
    monkeypatch.setattr(cpu, "_AMX", None)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True},
                        raising=False)
    assert not cpu.has_amx() and precision.cpu_has_bf16()


def test_float32_inference_is_bit_identical_to_sdpa():
    q, k, v = _qkv(23, 23)
    with torch.no_grad():
        out = attn.attention(*(t.transpose(1, 2).reshape(2, 23, 24) for t in (q, k, v)), 3, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 23, 24)
    assert torch.equal(out, ref)


def test_attention_form_describes_the_rule(monkeypatch):
    monkeypatch.setattr(cpu, "has_amx", lambda: False)
    assert "chunks" in attn.attention_form(torch.bfloat16, "cpu") and "float32" in attn.attention_form(
        torch.bfloat16, "cpu")
    assert "fused" in attn.attention_form(torch.float32, "cpu")
    assert "fused" in attn.attention_form(torch.bfloat16, torch.device("cuda"))
