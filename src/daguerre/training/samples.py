"""Images written during training: autoencoder comparisons and sample grids of the diffusion model.

Both are PNG files written atomically under RUN/samples/. Sample grids use the txt2img pipeline with
the EMA weights and fixed prompts / labels and seeds (`[sample]`), so successive grids of a run are
directly comparable: each prompt (or class) gets `seeds_per_prompt` images, seeds `seed`, `seed + 1`, ...
(the same seeds for every prompt, so two prompts drawn alike from the same noise show as such), with the
prompt or class name written under each image (PIL's default font, wrapped to the cell). Images narrower
than `MIN_CELL` pixels are enlarged by an integer factor (nearest neighbour) first, so that a grid of 32x32
samples stays readable.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..components import Components
from ..conditioning import Conditioner, conditioner_for
from ..fileio import atomic_path
from .config import SampleConfig

logger = logging.getLogger("daguerre.train")
SAMPLES_DIR = "samples"
GRID_PAD = 2  # pixels between grid cells
MIN_CELL = 96  # captioned cells narrower than this are enlarged by an integer factor (nearest neighbour)
CAPTION_LINES = 3  # lines of caption under a cell at most; a longer caption ends in ELLIPSIS
TEXT_PAD = 2  # pixels around a caption
ELLIPSIS = "..."
CAPTION_BACKGROUND, CAPTION_INK = (255, 255, 255), (0, 0, 0)


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


def wrap_caption(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
                 max_lines: int = CAPTION_LINES) -> list[str]:
    """`text` in lines of at most `width` pixels (at word boundaries; a word too long is cut), at most
    `max_lines` of them, the last ending in ELLIPSIS when the text does not fit."""
    lines: list[str] = []
    for word in text.split():
        while len(word) > 1 and font.getlength(word) > width:  # a word wider than the cell: cut it
            k = len(word) - 1
            while k > 1 and font.getlength(word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + ELLIPSIS) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + ELLIPSIS]
    return lines


def captioned_grid(images: list[Image.Image], captions: list[str], cols: int) -> Image.Image:
    """Images of one size tiled row by row, `cols` per row, each with its caption under it (module docstring)."""
    if not images or len(images) != len(captions):
        raise ValueError(f"captioned_grid: {len(images)} images and {len(captions)} captions")
    w, h = images[0].size
    scale = math.ceil(MIN_CELL / w) if w < MIN_CELL else 1
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag")
    line_h = bottom - top + 2
    wrapped = [wrap_caption(c, font, w - 2 * TEXT_PAD) for c in captions]
    text_h = max(1, max(len(lines) for lines in wrapped)) * line_h + 2 * TEXT_PAD
    cell_h = h + text_h
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w + GRID_PAD) + GRID_PAD, rows * (cell_h + GRID_PAD) + GRID_PAD), (128, 128, 128))
    draw = ImageDraw.Draw(out)
    for i, (im, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, cols)
        x, y = GRID_PAD + c * (w + GRID_PAD), GRID_PAD + r * (cell_h + GRID_PAD)
        out.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y))
        draw.rectangle((x, y + h, x + w - 1, y + cell_h - 1), fill=CAPTION_BACKGROUND)
        for k, line in enumerate(lines):
            _text(draw, (x + TEXT_PAD, y + h + TEXT_PAD + k * line_h - top), line, font)
    return out


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], line: str, font) -> None:
    try:
        draw.text(xy, line, fill=CAPTION_INK, font=font)
    except UnicodeError:  # a bitmap font (PIL without FreeType) draws Latin-1 only
        draw.text(xy, line.encode("latin-1", "replace").decode("latin-1"), fill=CAPTION_INK, font=font)


def grid_columns(n_cells: int, per_prompt: int) -> int:
    """Columns of a grid of `n_cells` images, `per_prompt` consecutive ones per prompt: about square, and a
    multiple of `per_prompt` so that a prompt's images share a row."""
    per_row = max(1, math.ceil(math.sqrt(n_cells) / per_prompt))
    return min(per_row * per_prompt, n_cells)


def cell_caption(conditioner: Conditioner, cell: dict, seed: int) -> str:
    """What is written under a sample: its prompt, its class name, or for an unconditional model its seed."""
    if conditioner.takes_prompt:
        return cell["prompt"] or "(empty prompt)"
    label = cell.get("class_label")
    if label is None:
        return f"seed {seed}"
    names = conditioner.config.class_names or []
    return names[label] if 0 <= label < len(names) else f"class {label}"


@torch.no_grad()
def sample_grid(components: Components, sample: SampleConfig) -> Image.Image:
    """`seeds_per_prompt` images per prompt / label (seeds sample.seed + j), or `n_unconditional` images
    (seeds sample.seed + i), as a grid with each image's prompt or class written under it."""
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img

    conditioner = conditioner_for(components.config)
    cells = conditioner.sample_cells(sample.prompts, sample.labels, sample.n_unconditional)
    conditional = conditioner.takes_prompt or any(c.get("class_label") is not None for c in cells)
    per_prompt = sample.seeds_per_prompt if conditional else 1
    images, captions = [], []
    for i, cell in enumerate(cells):
        for j in range(per_prompt):
            seed = sample.seed + (j if conditional else i)
            req = GenerationRequest(**cell, steps=sample.steps, sampler=sample.sampler, schedule=sample.schedule,
                                    cfg_scale=conditioner.guidance_scale(sample.cfg_scale), seed=seed)
            images.append(txt2img(components, req.validate(components.config))[0].image)
            captions.append(cell_caption(conditioner, cell, seed))
    return captioned_grid(images, captions, grid_columns(len(images), per_prompt))


def ignored_sample_settings(conditioner: Conditioner, sample: SampleConfig) -> list[str]:
    """Warnings for `[sample]` keys a model's grids do not use: prompts for a class-conditional, unconditional
    or concatenation model (those show training images with their own captions), labels for any model
    without class labels. The defaults are never warned about."""
    default = SampleConfig()
    out = []
    concat = conditioner.concat.kind is not None or conditioner.takes_layout  # grids of training images
    given = sample.prompts != default.prompts and any(p.strip() for p in sample.prompts)
    if given and (concat or not conditioner.takes_prompt):
        shown = ("the first training images with their own captions (only the number of prompts counts)" if concat
                 else "sample.labels (every class when empty)" if conditioner.kind == "class"
                 else f"sample.n_unconditional = {sample.n_unconditional} samples")
        out.append(f"[sample] prompts are ignored: this is a {_kind(conditioner)} model; its sample grids show "
                   f"{shown}")
    if sample.labels and conditioner.kind != "class":
        out.append(f"[sample] labels are ignored: this is a {_kind(conditioner)} model, not a class-conditional "
                   "one" + ("; its grids use sample.prompts" if conditioner.takes_prompt and not concat else ""))
    return out


def _kind(conditioner: Conditioner) -> str:
    what = {"text": "text-conditional", "class": "class-conditional", "none": "unconditional",
            "layout": "layout-to-image"}[conditioner.kind]
    return what + (f" {conditioner.concat.kind} (image-concatenation)" if conditioner.concat.kind else "")
