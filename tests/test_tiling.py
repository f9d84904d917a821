"""Tiled VAE decode/encode: exact blending of a local map, closeness to the whole-image decode, auto switch.

Tiles normalise with their own GroupNorm statistics and attend only within themselves, so tiled and
whole-image results differ. Measured on random weights with i.i.d. N(0, 1) latents (tiles of 24 of
48 cells, overlap 8: three tiles per side), mean |tiled - full| / std(full) is 0.08 for the tiny VAE
and 0.13 for the Stable Diffusion v1 VAE configuration (14-cell tiles of a 20-cell latent; 0.13 also
at 40 cells with 24-cell tiles), max |diff| / std 0.8 and 1.6 (smaller tiles are worse: 0.25 mean for
12-cell tiles). Latents with large-scale structure (a gradient) differ more (about 0.25 std for the tiny
VAE), without seams. The tests allow
MEAN_TOL x std and MAX_TOL x std; a misplaced or unblended tile gives a mean error of order 1 x std.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from daguerre.config import VAEConfig, preset
from daguerre.models.autoencoder import AutoencoderKL
from daguerre.pipelines import tiling
from daguerre.pipelines.tiling import (
    AUTO_TILE_CELLS,
    blend_tiles,
    decode_latents,
    decode_tiled,
    encode_latents,
    encode_tiled,
    should_tile,
    tile_starts,
)

MEAN_TOL = 0.2  # mean |tiled - full| <= MEAN_TOL * std(full)
MAX_TOL = 2.0  # max |tiled - full| <= MAX_TOL * std(full)
EXACT = 1e-5  # weighted averages of identical values


def _vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_close_to_full(tiled: torch.Tensor, full: torch.Tensor) -> None:
    diff = (tiled - full).abs()
    std = full.std().item()
    assert diff.mean().item() <= MEAN_TOL * std, (diff.mean().item(), std)
    assert diff.max().item() <= MAX_TOL * std, (diff.max().item(), std)


@pytest.mark.parametrize("size,tile,overlap", [(48, 24, 8), (100, 64, 16), (65, 64, 16), (64, 64, 16), (7, 64, 16),
                                               (130, 32, 0), (97, 20, 19)])
def test_tile_starts_cover_the_axis_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    assert min(starts[-1] + tile, size) == size  # the last tile ends at the border
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert a < b and a + tile - b >= overlap  # neighbours share at least `overlap`


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)


@pytest.mark.parametrize("scale", [1, 2, 8])
def test_blend_tiles_is_exact_for_a_pointwise_map(scale):
    """Tiling a map without spatial context (nearest upsampling + a pointwise function) changes nothing."""
    x = _randn(2, 3, 37, 53)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(t, scale_factor=scale, mode="nearest") * 2)

    full = fn(x)
    for tile, overlap in ((16, 4), (20, 12), (64, 16)):
        out = blend_tiles(lambda y0, y1, x0, x1: fn(x[:, :, y0:y1, x0:x1]), (37, 53), tile, overlap, scale)
        torch.testing.assert_close(out, full, atol=EXACT, rtol=0)


def test_decode_tiled_is_exact_when_one_tile_covers_the_latent():
    vae = _vae(preset("tiny").vae)
    z = _randn(1, 4, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(decode_tiled(vae, z, tile=16, overlap=4), vae.decode(z), atol=EXACT, rtol=0)


def test_decode_tiled_close_to_full_decode_tiny():
    vae = _vae(preset("tiny").vae)
    z = _randn(2, 4, 48, 48)
    with torch.no_grad():
        full, tiled = vae.decode(z), decode_tiled(vae, z, tile=24, overlap=8)
    assert tiled.shape == full.shape == (2, 3, 96, 96)
    _assert_close_to_full(tiled, full)
    # the bound is meaningful: shifting the tiled result by one latent cell breaks it
    with pytest.raises(AssertionError):
        _assert_close_to_full(torch.roll(tiled, 2, dims=-1), full)


def test_encode_tiled_close_to_full_encode_tiny():
    vae = _vae(preset("tiny").vae)
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        full, tiled = vae.encode(x).mean, encode_tiled(vae, x, tile=48, overlap=16)
    assert tiled.shape == full.shape == (1, 4, 48, 64)
    _assert_close_to_full(tiled, full)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        encode_tiled(vae, x[..., :95, :])


@pytest.mark.slow
def test_decode_tiled_close_to_full_decode_sd15():
    vae = _vae(preset("sd15").vae)
    z = _randn(1, 4, 20, 20)
    with torch.no_grad():
        full, tiled = vae.decode(z), decode_tiled(vae, z, tile=14, overlap=6)
    assert tiled.shape == full.shape == (1, 3, 160, 160)
    _assert_close_to_full(tiled, full)
    del vae, full, tiled
    gc.collect()


def test_should_tile_threshold():
    assert not should_tile(96, 96) and should_tile(97, 96) and should_tile(96 * 96 + 1, 1)
    assert should_tile(8, 8, tiled=True) and not should_tile(500, 500, tiled=False)
    assert AUTO_TILE_CELLS == 96 * 96  # the documented threshold (docs/usage.md, --tile help)


def test_decode_latents_unscales_clamps_and_switches_to_tiles(monkeypatch):
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                    scale_factor=0.5, shift_factor=0.1)
    vae = _vae(cfg)
    z = _randn(1, 4, 10, 12) * 3
    with torch.no_grad():
        expected = vae.decode(vae.unscale_latents(z)).clamp(-1, 1)
        torch.testing.assert_close(decode_latents(vae, z), expected, atol=EXACT, rtol=0)
        torch.testing.assert_close(decode_latents(vae, z, tiled=True), expected, atol=EXACT, rtol=0)  # one tile

    calls = []

    def spy(vae, z, *args, **kwargs):
        calls.append(tuple(z.shape))
        return torch.zeros(z.shape[0], 3, z.shape[2] * 2, z.shape[3] * 2)

    monkeypatch.setattr(tiling, "decode_tiled", spy)
    monkeypatch.setattr(vae, "decode", lambda z: torch.zeros(z.shape[0], 3, z.shape[2] * 2, z.shape[3] * 2))
    big = torch.zeros(1, 4, 97, 96)
    with torch.no_grad():
        decode_latents(vae, big)  # 97 x 96 cells > 96 x 96: tiled
        decode_latents(vae, z, tiled=True)
        decode_latents(vae, big, tiled=False)
        decode_latents(vae, big[..., :96, :])  # exactly 96 x 96: not tiled
    assert calls == [(1, 4, 97, 96), (1, 4, 10, 12)]


def test_decode_latents_gives_the_freed_heap_back_before_decoding(monkeypatch):
    """The sampler's freed activations go back to the system before the decoder allocates its large tensors."""
    vae = _vae(VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    order = []
    monkeypatch.setattr(tiling, "trim", lambda: order.append("trim"))
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: order.append("decode") or decode(z))
    with torch.no_grad():
        decode_latents(vae, _randn(1, 4, 6, 6))
    assert order == ["trim", "decode"]


def test_encode_latents_scales_the_mean():
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                    scale_factor=0.5, shift_factor=0.1)
    vae = _vae(cfg)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = vae.scale_latents(vae.encode(x).mean)
        torch.testing.assert_close(encode_latents(vae, x), expected, atol=EXACT, rtol=0)
        torch.testing.assert_close(encode_latents(vae, x, tiled=True), expected, atol=EXACT, rtol=0)
