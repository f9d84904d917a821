"""Images written during training: autoencoder comparisons and sample grids of the diffusion model.

Both are PNG files written atomically under RUN/samples/. Sample grids use the txt2img pipeline with
the EMA weights and fixed prompts / labels and seeds (`[sample]`), so successive grids of a run are
directly comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..components import Components
from ..conditioning import conditioner_for
from ..fileio import atomic_path
from .config import SampleConfig

SAMPLES_DIR = "samples"
GRID_PAD = 2  # pixels between grid cells


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> PIL images ("L" or "RGB")."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in arr]
    return [Image.fromarray(a, "RGB") for a in arr]


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images of one size tiled row by row, `cols` per row, on a grey background."""
    if not images:
        raise ValueError("grid: no images")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w + GRID_PAD) + GRID_PAD, rows * (h + GRID_PAD) + GRID_PAD), (128, 128, 128))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.convert("RGB"), (GRID_PAD + c * (w + GRID_PAD), GRID_PAD + r * (h + GRID_PAD)))
    return out


def save_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def comparison_image(originals: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Originals in the top row, their reconstructions below."""
    n = originals.shape[0]
    return grid(to_pil(originals) + to_pil(reconstructions), cols=n)


@torch.no_grad()
def sample_grid(components: Components, sample: SampleConfig) -> Image.Image:
    """One image per prompt / label (or `n_unconditional` images), seeds sample.seed + i, as a grid."""
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img

    conditioner = conditioner_for(components.config)
    cells = conditioner.sample_cells(sample.prompts, sample.labels, sample.n_unconditional)
    images = []
    for i, cell in enumerate(cells):
        req = GenerationRequest(**cell, steps=sample.steps, sampler=sample.sampler, schedule=sample.schedule,
                                cfg_scale=conditioner.guidance_scale(sample.cfg_scale), seed=sample.seed + i)
        images.append(txt2img(components, req.validate(components.config))[0].image)
    cols = int(np.ceil(np.sqrt(len(images))))
    return grid(images, cols)
