"""Live previews of sampling: the model's current estimate of the final image at every step, and a GIF.

At step i a sampler reports `denoised`, the denoiser's estimate of the clean latent x0 given the
current noisy latent (k-diffusion's callback; Karras et al. 2022, Eq. 3: D(x; sigma)). Decoding it
shows the image emerge from blur. Two ways to decode it:

- `approx` (default): a linear map from the latent channels to RGB, RGB ~ W z + b per latent cell,
  fitted once by least squares to the VAE itself (a few random latents decoded, each decoded image
  averaged over the f x f pixels of each latent cell). It costs nothing per step and works for any
  VAE; the preview has the latent's resolution, enlarged to the image size. When the map explains
  less than half of the decoded images' variance (an untrained VAE: `random:` models) previews fall
  back to `full`.
- `full`: the VAE decoder at every step (exact, as slow as decoding an image: seconds per step for
  Stable Diffusion on a CPU).

`PreviewWriter` is the pipeline callback: it writes `DIR/step_{i:03d}.png` at every step and, when
finished, `DIR/preview.gif`, the steps in order followed by the final images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..fileio import atomic_path
from ..models.autoencoder import AutoencoderKL
from .images import make_grid
from .tiling import decode_latents

PREVIEW_MODES = ("approx", "full")
FIT_SAMPLES = 2  # random latents decoded to fit the approximate latent -> RGB map
FIT_CELLS = 24  # their side in latent cells (192 pixels for Stable Diffusion)
FIT_SEED = 0  # the fit is deterministic: the same VAE always gives the same previews
MIN_FIT_R2 = 0.5  # below this explained variance the approximation is useless: `approx` decodes fully
GIF_FRAME_MS = 100  # display time of one step in the GIF
GIF_LAST_FRAME_MS = 2000  # the final image stays this long before the GIF loops
GIF_MAX_SIDE = 512  # GIF frames are shrunk to at most this many pixels on their longer side
GIF_NAME = "preview.gif"


def fit_latent_to_rgb(
    vae: AutoencoderKL, samples: int = FIT_SAMPLES, cells: int = FIT_CELLS, seed: int = FIT_SEED
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W, b, r2) with image ~ W z + b per latent cell, fitted by least squares on decoded random latents.

    z are diffusion latents (B, C, h, w) ~ N(0, I), the scale the sampler's x0 estimates live on; the
    target is the VAE's decoded image average-pooled over each f x f cell. W is (out_channels, C) and
    b (out_channels,), float32 on the VAE's device; r2 is the fraction of the target's variance the
    map explains (high for a trained VAE, near 0 for an untrained one).
    """
    cfg = vae.config
    param = next(getattr(vae, "decoder", vae).parameters())  # the decoder's: the encoder may be released (meta)
    gen = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(samples, cfg.latent_channels, cells, cells, generator=gen)
    with torch.no_grad():
        x = vae.decode(vae.unscale_latents(z.to(param.device)).to(param.dtype)).float()  # (S, out_c, H, W)
    target = F.avg_pool2d(x, cfg.downsample_factor)  # (S, out_c, cells, cells)
    inputs = z.to(param.device).permute(0, 2, 3, 1).reshape(-1, cfg.latent_channels)  # (N, C)
    inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)  # (N, C + 1): the bias column
    outputs = target.permute(0, 2, 3, 1).reshape(-1, cfg.out_channels)  # (N, out_c)
    solution = torch.linalg.lstsq(inputs.cpu().double(), outputs.cpu().double()).solution  # (C + 1, out_c)
    residual = outputs.cpu().double() - inputs.cpu().double() @ solution
    r2 = 1.0 - float(residual.pow(2).sum() / (outputs.cpu().double() - outputs.cpu().double().mean(0)).pow(2).sum())
    solution = solution.float().to(param.device)
    return solution[:-1].T.contiguous(), solution[-1].contiguous(), r2


def approx_decode(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Diffusion latents (B, C, h, w) -> approximate images (B, out_c, h, w) in [-1, 1]: W z + b per cell."""
    z = latents.to(device=weight.device, dtype=torch.float32)
    x = torch.einsum("oc,bchw->bohw", weight, z) + bias[None, :, None, None]
    return x.clamp(-1, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, C, H, W) in [-1, 1] (C = 1 or 3) -> PIL images, 8 bits per channel."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(np.ascontiguousarray(a[..., 0]), "L") for a in arr]
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]


def save_gif(frames: list[Image.Image], path: str | os.PathLike, durations: list[int]) -> Path:
    """Write an endlessly looping animated GIF atomically (temporary file, then rename)."""
    path = Path(path)
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    with atomic_path(path) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False
        )
    return path


class PreviewDecoder:
    """Preview images of diffusion latents, `approx` or `full` (module docstring); shared by
    `PreviewWriter` and the server's live preview. `mode` turns to "full" when the linear map is useless."""

    def __init__(self, vae: AutoencoderKL, mode: str = "approx", tiled: bool | None = None):
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview mode {mode!r} is not one of {', '.join(PREVIEW_MODES)}")
        self.vae = vae
        self.mode = mode
        self.tiled = tiled
        self._linear: tuple[torch.Tensor, torch.Tensor] | None = None

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Preview images of diffusion latents (B, C, h, w), at the full image size."""
        f = self.vae.config.downsample_factor
        with torch.no_grad():
            if self.mode == "full":
                return to_pil(decode_latents(self.vae, latents, self.tiled))
            if self._linear is None:
                weight, bias, r2 = fit_latent_to_rgb(self.vae)
                self._linear = (weight, bias)
                if r2 < MIN_FIT_R2:  # the VAE is not (near) linear per cell, e.g. untrained: decode exactly
                    self.mode = "full"
                    return self.decode(latents)
            small = to_pil(approx_decode(latents, *self._linear))
        return [im.resize((im.width * f, im.height * f), Image.Resampling.BILINEAR) for im in small]


class PreviewWriter:
    """Pipeline callback that saves the x0 estimate of every step, and a GIF when `finish` is called.

    `folder` is created if needed. For a batch the frame shows its images side by side; frames of
    the first batch are `step_{i:03d}.png`, those of a batch starting at image k > 0 are
    `image{k:03d}_step_{i:03d}.png`. `tiled` is passed to `decode_latents` in `full` mode. A folder that
    already holds previews is refused unless `overwrite`.
    """

    def __init__(self, vae: AutoencoderKL, folder: str | os.PathLike, mode: str = "approx", tiled: bool | None = None,
                 overwrite: bool = False):
        self.decoder = PreviewDecoder(vae, mode, tiled)
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"preview folder {self.folder} is a file: name a folder")
        earlier = sorted(self.folder.glob("*step_*.png")) + sorted(self.folder.glob("preview.gif"))
        if earlier and not overwrite:
            raise ValueError(f"preview folder {self.folder} already holds previews ({earlier[0].name}, ...): name "
                             "another folder, or pass --overwrite to replace them")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._frames: list[Image.Image] = []

    @property
    def mode(self) -> str:
        return self.decoder.mode

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Preview images of diffusion latents (B, C, h, w), at the full image size."""
        return self.decoder.decode(latents)

    def __call__(self, info: dict[str, Any]) -> None:
        frame = make_grid(self.decode(info["denoised"]), cols=info["denoised"].shape[0])
        start = int(info.get("batch_start", 0))
        name = f"step_{int(info['i']):03d}.png" if start == 0 else f"image{start:03d}_step_{int(info['i']):03d}.png"
        path = self.folder / name
        with atomic_path(path) as tmp:
            frame.save(tmp, format="PNG")
        self.paths.append(path)
        self._frames.append(_gif_frame(frame))

    def finish(self, final: list[Image.Image] | None = None) -> Path | None:
        """Write `DIR/preview.gif` (the steps, then `final` images in a grid, if given); None if no step ran."""
        if not self._frames:
            return None
        frames = list(self._frames)
        durations = [GIF_FRAME_MS] * len(frames)
        if final:
            frames.append(_gif_frame(make_grid(final, cols=len(final))))
            durations.append(GIF_LAST_FRAME_MS)
        else:
            durations[-1] = GIF_LAST_FRAME_MS
        size = (max(f.width for f in frames), max(f.height for f in frames))
        frames = [f if f.size == size else _on_canvas(f, size) for f in frames]
        return save_gif(frames, self.folder / GIF_NAME, durations)


def _gif_frame(image: Image.Image) -> Image.Image:
    """A frame for the GIF: shrunk to GIF_MAX_SIDE, reduced to a 256-colour palette (what GIF stores)."""
    scale = GIF_MAX_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image.convert("RGB").quantize(colors=256)


def _on_canvas(frame: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A frame centred on a black canvas of `size` (frames of a batch and of all final images differ in size)."""
    canvas = Image.new("RGB", size)
    canvas.paste(frame.convert("RGB"), ((size[0] - frame.width) // 2, (size[1] - frame.height) // 2))
    return canvas.quantize(colors=256)
