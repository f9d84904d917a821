"""Tiled VAE decoding and encoding: large images through the autoencoder in overlapping tiles.

The autoencoder's memory grows with the image (the decoder's last level holds 128 channels at full
resolution, and its middle block attends over every latent cell: (h w)^2 scores), so images much
larger than the training size are decoded tile by tile. Tiles overlap and are blended with cosine
weights that fall to almost zero at a tile's inner edges (a partition of unity across each overlap),
so there is no seam, the idea of MultiDiffusion (Bar-Tal et al. 2023, Eq. 5: a per-pixel weighted
average of overlapping windows) applied to the VAE.

The result is close to, not equal to, a whole-image decode: every tile computes its own GroupNorm
statistics and its own middle-block attention. On latents whose statistics vary slowly over the image
the difference is small (tests/test_tiling.py measures it on a tiny random VAE and on the Stable
Diffusion v1 VAE configuration and states the tolerance).

`decode_latents` / `encode_latents` are what pipelines call: they tile automatically when the latent
has more than `AUTO_TILE_CELLS` (96 x 96) cells, e.g. above 768 x 768 pixels for Stable Diffusion
(factor 8), or when told to.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from ..memory import trim
from ..models.autoencoder import AutoencoderKL

DECODE_TILE = 64  # latent cells per decoder tile side (512 pixels for Stable Diffusion, its training size)
DECODE_OVERLAP = 16  # latent cells shared by neighbouring decoder tiles
ENCODE_TILE = 512  # pixels per encoder tile side
ENCODE_OVERLAP = 64  # pixels shared by neighbouring encoder tiles
AUTO_TILE_CELLS = 96 * 96  # latents with more cells than this are tiled when `tiled` is None


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours sharing >= `overlap`.

    The tiles are spread evenly, the first at 0 and the last ending at `size`; one tile when it fits.
    """
    if tile < 1 or not (0 <= overlap < tile):
        raise ValueError(f"tile {tile} and overlap {overlap} must satisfy 0 <= overlap < tile; lower the overlap")
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def _ramp(length: int, device: torch.device) -> torch.Tensor:
    """Cosine ramp rising from ~0 to ~1 over `length` samples, at cell centres (never exactly 0)."""
    t = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def blend_weights(starts: list[int], tile: int, size: int, scale: int, device: torch.device) -> list[torch.Tensor]:
    """1-D weights of each tile (in output units = `scale` x input units) for a weighted average.

    A tile ramps up across the region it shares with its left neighbour and down across the region it
    shares with its right one; the image border gets full weight. Over a shared region the falling
    and rising cosines sum to one.
    """
    weights = []
    for k, s in enumerate(starts):
        length = min(tile, size - s) * scale
        w = torch.ones(length, device=device)
        if k > 0:
            left = (starts[k - 1] + tile - s) * scale  # shared with the previous tile
            w[:left] = torch.minimum(w[:left], _ramp(left, device))
        if k + 1 < len(starts):
            right = (s + tile - starts[k + 1]) * scale  # shared with the next tile
            w[length - right:] = torch.minimum(w[length - right:], _ramp(right, device).flip(0))
        weights.append(w)
    return weights


def blend_tiles(
    fn: Callable[[int, int, int, int], torch.Tensor],
    size: tuple[int, int],
    tile: int,
    overlap: int,
    scale: int,
) -> torch.Tensor:
    """Weighted average of overlapping tiles: the tiled form of a map whose output is `scale` x its input.

    `size` = (height, width) of the input in tile units; `fn(y0, y1, x0, x1)` returns the output of
    the input window [y0, y1) x [x0, x1) as (B, C, (y1 - y0) scale, (x1 - x0) scale). Float32 out.
    """
    height, width = size
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = total = None
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            part = fn(y0, y1, x0, x1).float()  # (B, C, (y1 - y0) scale, (x1 - x0) scale)
            if out is None:
                wy = blend_weights(ys, tile, height, scale, part.device)
                wx = blend_weights(xs, tile, width, scale, part.device)
                out = part.new_zeros(*part.shape[:2], height * scale, width * scale)
                total = part.new_zeros(1, 1, height * scale, width * scale)
            w = wy[ys.index(y0)][:, None] * wx[xs.index(x0)][None, :]  # (th, tw)
            oy, ox = y0 * scale, x0 * scale
            out[:, :, oy:y1 * scale, ox:x1 * scale] += part * w
            total[:, :, oy:y1 * scale, ox:x1 * scale] += w
    return out / total


def decode_tiled(
    vae: AutoencoderKL, z: torch.Tensor, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> torch.Tensor:
    """`vae.decode(z)` for un-scaled latents z (B, C, h, w), tile by tile -> image (B, out_channels, h f, w f).

    Tiles are `tile` latent cells square and share at least `overlap` cells with their neighbours; the
    output is float32 and not clamped, like `vae.decode`.
    """
    f = vae.config.downsample_factor
    return blend_tiles(lambda y0, y1, x0, x1: vae.decode(z[:, :, y0:y1, x0:x1]), z.shape[-2:], tile, overlap, f)


def encode_tiled(
    vae: AutoencoderKL, x: torch.Tensor, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> torch.Tensor:
    """`vae.encode(x).mean` for images x (B, C, H, W) in [-1, 1], tile by tile -> un-scaled latent mean.

    H and W must be multiples of the VAE factor f; `tile` and `overlap` (pixels) are rounded down to
    multiples of f, so every tile starts on a latent-cell boundary and its latents line up with the
    whole image's. Float32 out.
    """
    f = vae.config.downsample_factor
    height, width = x.shape[-2:]
    if height % f or width % f:
        raise ValueError(f"image size {width}x{height} is not a multiple of the VAE factor {f}: resize or crop it")

    def encode(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:  # latent-cell window -> its latent mean
        return vae.encode(x[:, :, y0 * f:y1 * f, x0 * f:x1 * f]).mean  # (B, latent_channels, y1 - y0, x1 - x0)

    return blend_tiles(encode, (height // f, width // f), max(tile // f, 1), overlap // f, 1)


def should_tile(height: int, width: int, tiled: bool | None = None) -> bool:
    """Whether to tile a latent of height x width cells: `tiled` if given, else above `AUTO_TILE_CELLS`."""
    if tiled is not None:
        return bool(tiled)
    return height * width > AUTO_TILE_CELLS


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Diffusion latents (B, C, h, w) -> images (B, out_channels, h f, w f) in [-1, 1], float32.

    Undoes the latent scaling (`vae.unscale_latents`), decodes in the VAE's own dtype (the compute dtype,
    `daguerre.precision`) on its device, tiled when `should_tile(h, w, tiled)` (module docstring). A
    bfloat16 or float16 decode whose output holds a NaN or an infinity (an overflow) is done again in
    float32 (`in_float32`), so the result is what the float32 VAE gives.

    First the C heap's free pages go back to the system (`memory.trim`): the sampler's freed activations
    stay in glibc's heap, while the decoder's large tensors come from fresh mappings, so without it both
    count in the peak (SD 1.5 at 512x512: ~0.2 GiB).
    """
    trim()
    x = _decode(vae, latents, tiled)
    if not bool(torch.isfinite(x).all()) and next(vae.parameters()).dtype != torch.float32:
        with in_float32(vae):
            x = _decode(vae, latents, tiled)
    return x.clamp(-1, 1)


def _decode(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool | None) -> torch.Tensor:
    """`decode_latents` without the retry or the clamp: float32 output, possibly not finite."""
    param = next(vae.decoder.parameters())  # the decoder's: the encoder may be released (on the meta device)
    z = vae.unscale_latents(latents.to(device=param.device, dtype=torch.float32)).to(param.dtype)
    if should_tile(*z.shape[-2:], tiled):
        return decode_tiled(vae, z).float()
    return vae.decode(z).float()


@contextlib.contextmanager
def in_float32(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` in float32 while the context lasts, then cast it back to its dtype: bfloat16 and float16
    values are exact in float32, so the weights come back bit for bit (memory formats are kept)."""
    dtype = next(module.parameters()).dtype
    module.float()
    try:
        yield
    finally:
        module.to(dtype)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> diffusion latents: the scaled posterior mean, float32.

    Tiled when `should_tile(H / f, W / f, tiled)`; otherwise one `vae.encode` call.
    """
    param = next(vae.encoder.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    f = vae.config.downsample_factor
    if should_tile(x.shape[-2] // f, x.shape[-1] // f, tiled):
        mean = encode_tiled(vae, x)
    else:
        mean = vae.encode(x).mean.float()
    return vae.scale_latents(mean)
