"""Token merging (ToMe for SD, Bolya & Hoffman 2023; issue 15, item 4): bipartite soft matching in
`daguerre.nn.tome`, applied by the U-Net to the self-attention of its full-resolution transformers. Ratio 0 is
the exact path bit for bit; at ratio r the attention sees r fewer tokens and every merged token gets its
destination's output. The merged blocks are those of the highest resolution with attention: the latent's full
resolution in Stable Diffusion, a lower level in models without attention there (the shipped ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daguerre.config import preset
from daguerre.models.unet import UNetModel
from daguerre.nn.tome import bipartite_merge
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.request import GenerationRequest
from daguerre.pipelines.txt2img import txt2img
from test_deepcache import woken_unet
from test_pipelines import _components


def test_ratio_zero_merges_nothing_and_unmerge_inverts_merge():
    x = torch.randn(2, 6 * 8, 5)
    plan = bipartite_merge(x, 6, 8, 0.0)
    assert plan.merge(x).shape == x.shape and torch.equal(plan.unmerge(plan.merge(x)), x)


def test_the_best_matched_sources_are_averaged_into_their_destination():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)  # a 4x4 map: destinations at (0,0), (0,2), (2,0), (2,2)
    x[0, 1] = 2.0 * x[0, 0]  # cosine 1 to the destination at position 0
    x[0, 4] = 3.0 * x[0, 0]
    plan = bipartite_merge(x, 4, 4, 2 / 16)
    merged = plan.merge(x)
    assert merged.shape == (1, 14, 8)
    assert sorted(plan.src_idx[plan.merged[0]].tolist()) == [1, 4] and plan.into[0].tolist() == [0, 0]
    assert torch.allclose(merged[0, -4], (x[0, 0] + x[0, 1] + x[0, 4]) / 3)  # the first destination: the mean
    out = plan.unmerge(merged)
    assert torch.equal(out[0, 1], out[0, 0]) and torch.equal(out[0, 4], out[0, 0])  # they get its output
    kept = [i for i in range(16) if i not in (0, 1, 4, 2, 8, 10)]
    assert torch.equal(out[0, kept], x[0, kept])  # the unmerged sources come back as they were


def test_at_most_the_sources_are_merged():
    x = torch.randn(1, 16, 4)
    assert bipartite_merge(x, 4, 4, 0.99).merge(x).shape == (1, 4, 4)  # only the 4 destinations are left
    with pytest.raises(ValueError, match="not a 4x5 map"):
        bipartite_merge(x, 4, 5, 0.5)


@pytest.fixture(scope="module")
def unet():
    return woken_unet()  # the SD 1.5 block layout at a tiny width, attention at the full resolution (level 0) too


@torch.no_grad()
def test_unet_ratio_zero_is_exact_and_only_full_resolution_self_attention_sees_fewer_tokens(unet):
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor(500.0)
    exact = unet(x, t, ctx)
    assert torch.equal(unet(x, t, ctx, tome=0.0), exact)
    tokens = []
    attn1 = [m.attn1 for m in unet.modules() if hasattr(m, "attn1")]
    hooks = [a.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1])) for a in attn1]
    try:
        merged = unet(x, t, ctx, tome=0.5)
    finally:
        for h in hooks:
            h.remove()
    # full resolution (256 tokens -> 128): input_blocks 1-2 and output_blocks 9-11; 8x8 and 4x4 unchanged
    assert tokens == [128, 128, 64, 64, 16, 16, 4, 16, 16, 16, 64, 64, 64, 128, 128, 128]
    assert not torch.equal(merged, exact) and merged.shape == exact.shape
    with pytest.raises(ValueError, match="token merging ratio"):
        unet(x, t, ctx, tome=1.0)


@pytest.mark.parametrize(("side", "tokens"), [(8, 8), (9, 13)])  # level 1: 4x4 -> 8; 5x5 (9 dst) -> 25 - 12
@torch.no_grad()
def test_without_full_resolution_attention_the_highest_level_with_attention_merges(side, tokens):
    torch.manual_seed(0)
    net = UNetModel(preset("tiny").unet).eval()  # attention at level 1 only
    x, ctx = torch.randn(1, 4, side, side), torch.randn(1, 3, 32)
    seen = []
    hooks = [m.attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for m in net.modules() if hasattr(m, "attn1")]
    try:
        net(x, 10.0, ctx, tome=0.5)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [tokens] * 4  # level 1, the last: one input block, the middle block, two output blocks


@pytest.fixture(scope="module")
def tiny_full_res():
    cfg = preset("tiny")
    cfg.name, cfg.unet.attention_levels = "tiny-attn0", (0, 1)  # attention at the full resolution too
    return _components(cfg)


def _images(comps, **fields):
    request = GenerationRequest(prompt="a red circle", steps=4, sampler="Euler", seed=2, **fields)
    results = txt2img(comps, request.validate(comps.config))
    return [np.asarray(r.image) for r in results], results


def test_pipeline_ratio_zero_is_the_exact_path_and_the_png_records_the_ratio(tiny_full_res):
    exact, _ = _images(tiny_full_res)
    same, _ = _images(tiny_full_res, tome_ratio=0.0)
    merged, results = _images(tiny_full_res, tome_ratio=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(same, exact, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(merged, exact, strict=True))
    assert settings_from_parameters(results[0].parameters, "png").fields["tome_ratio"] == 0.5


@pytest.mark.parametrize("bad", [-0.1, 0.8])
def test_a_ratio_outside_zero_to_three_quarters_is_refused(bad):
    with pytest.raises(ValueError, match="token merging ratio must be in"):
        GenerationRequest(prompt="a", tome_ratio=bad).validate(preset("tiny"))
