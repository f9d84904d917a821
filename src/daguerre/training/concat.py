"""Image-concatenation conditioning in stage 2: super-resolution ("lowres"), inpainting ("inpaint") and
semantic-synthesis ("semantic") models.

Both kinds feed the U-Net cat(x_t, c) (LDM Sec. 3.3: "concatenation" conditioning); c is built by the
SAME functions the pipelines call at inference, so training and sampling cannot drift apart:

- `model.concat = "lowres"` (LDM super-resolution, Sec. 4.4; SD x4 upscaler): the training image is the
  high-resolution target (its latent comes from the latent cache as for any model); c is the image
  downscaled `data.lowres_factor` times (PIL bicubic, `downscale`, then 8-bit, as a saved low-res PNG),
  mapped to [-1, 1] and resized bicubically to the latent grid by `conditioning.LowresConcat.build`.
  With `data.lowres_noise` = L > 0, each sample draws a level l ~ U{0..L}, c becomes a c + s eps with
  (a, s) = `conditioning.LowresConcat.noise_scales(l)` (noise-conditioning augmentation, Ho et al. 2022),
  and the U-Net is told l through a label embedding of L + 1 rows (`unet.num_classes`), exactly what
  `daguerre upscale --noise-level` feeds it. The low-res images are computed ONCE from the images and
  kept (uint8, one per cached view) in a pixel cache beside the latent cache; only the resize to the
  latent grid and the noise happen per step.
- `model.concat = "inpaint"` (SD inpainting, 9 channels for 4 latent channels): per sample and step a
  random mask (`random_mask`: rectangles and brush strokes, and a fraction `data.mask_full` of fully
  masked examples, so the model also generates from nothing); c = cat(mask at the latent size, latent
  of the masked image) from `conditioning.InpaintConcat.build`, the function `daguerre inpaint`
  uses. The masked image changes every step, so it is encoded by the frozen VAE every step (one encoder
  pass per image, without gradients: ~20% fewer images/s with shapes_inpaint_ldm.toml than with
  shapes_ldm.toml); the training images are kept in memory (and in the pixel cache) as uint8.
- `model.concat = "semantic"` (LDM semantic synthesis, Sec. 4.3.2): c is the training scene's semantic map
  (`data.shapes.render_labels`: background and the 8 shapes) as label fractions on the latent grid, from
  `conditioning.SemanticConcat.build`, the function `daguerre generate --semantic` uses. The maps are drawn
  once from the scenes (no image is rendered for them) and kept in the pixel cache as uint8 labels.

All randomness (masks, noise levels, augmentation noise) comes from the per-sample generators of the
training loop (`dist.sample_generator`), after the draws of `objective.draw_noise`, so a resumed run and a
torchrun run see the same conditioning. The pixel cache is one safetensors file
CACHE/pixels_<kind>_<key>.safetensors, keyed by the data description, the kind, the factor and `flip`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..conditioning import InpaintConcat, LowresConcat, NoConcat, SemanticConcat, conditioner_for
from ..config import ModelConfig
from ..fileio import atomic_save_safetensors
from . import dist
from .data import TrainData, images_of, load_items

if TYPE_CHECKING:
    from ..components import Components
    from ..models.autoencoder import AutoencoderKL
    from .config import RunConfig, SampleConfig

logger = logging.getLogger("daguerre.train")

DEFAULT_LOWRES_FACTOR = 4  # LDM SR and the SD x4 upscaler: x4
DEFAULT_MASK_FULL = 0.25  # SD inpainting: "in 25% mask everything"
SAMPLE_NOISE_LEVEL = 20  # sample grids of noise-augmented SR models: `daguerre upscale`'s default level
MAX_SAMPLE_IMAGES = 8
PIXEL_CACHE_VERSION = 1
KEY_CHARS = 16
HALF = 127.5  # uint8 <-> [-1, 1], as pipelines.images.image_to_tensor
LOAD_BATCH = 64

# random masks (sizes relative to the image side), in the spirit of LaMa's / SD inpainting's synthetic masks
MAX_RECTS = 2
MAX_STROKES = 3
RECT_SIDE = (0.1, 0.6)
STROKE_VERTICES = (2, 6)  # vertices per stroke (1 to 5 segments)
STROKE_WIDTH = (0.05, 0.15)
STROKE_SEGMENT = (0.1, 0.4)


# --- conditioning images ------------------------------------------------------------------------------

def downscale(image: Image.Image, factor: int) -> Image.Image:
    """The low-resolution version of a training image: PIL bicubic (antialiased) to 1/factor per side, the
    bicubic degradation of LDM's super-resolution experiments. Give `daguerre upscale` such an image."""
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BICUBIC)


def random_mask(gen: torch.Generator, height: int, width: int, full: float) -> torch.Tensor:
    """A random inpainting mask (1, H, W) float32 in {0, 1} (1 = repaint) from `gen`: with probability
    `full` everything, else 0-2 rectangles and 0-3 brush strokes (polylines of round brushes), at least
    one shape. The draws from `gen` depend only on `gen`'s state, so a sample's mask is reproducible."""
    if float(torch.rand(1, generator=gen)) < full:
        return torch.ones(1, height, width)
    side = min(height, width)
    n_rects = int(torch.randint(0, MAX_RECTS + 1, (1,), generator=gen))
    n_strokes = int(torch.randint(0, MAX_STROKES + 1, (1,), generator=gen))
    if n_rects + n_strokes == 0:
        n_rects = 1
    yy = (torch.arange(height, dtype=torch.float32) + 0.5)[:, None]  # pixel centres (H, 1)
    xx = (torch.arange(width, dtype=torch.float32) + 0.5)[None, :]  # (1, W)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(n_rects):
        u = torch.rand(4, generator=gen)
        h = height * (RECT_SIDE[0] + (RECT_SIDE[1] - RECT_SIDE[0]) * float(u[0]))
        w = width * (RECT_SIDE[0] + (RECT_SIDE[1] - RECT_SIDE[0]) * float(u[1]))
        top, left = (height - h) * float(u[2]), (width - w) * float(u[3])
        mask |= (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
    for _ in range(n_strokes):
        n = int(torch.randint(STROKE_VERTICES[0], STROKE_VERTICES[1] + 1, (1,), generator=gen))
        u = torch.rand(3 + 2 * (n - 1), generator=gen)
        radius = side * (STROKE_WIDTH[0] + (STROKE_WIDTH[1] - STROKE_WIDTH[0]) * float(u[0])) / 2
        y, x = height * float(u[1]), width * float(u[2])
        for k in range(n - 1):
            angle = 2 * math.pi * float(u[3 + 2 * k])
            length = side * (STROKE_SEGMENT[0] + (STROKE_SEGMENT[1] - STROKE_SEGMENT[0]) * float(u[4 + 2 * k]))
            y1 = min(max(y + length * math.sin(angle), 0.0), float(height))
            x1 = min(max(x + length * math.cos(angle), 0.0), float(width))
            mask |= _segment_distance(yy, xx, (y, x), (y1, x1)) <= radius
            y, x = y1, x1
    return mask.float()[None]


def _segment_distance(yy: torch.Tensor, xx: torch.Tensor, p0: tuple[float, float],
                      p1: tuple[float, float]) -> torch.Tensor:
    """Distance of every pixel centre (H, W) to the segment p0-p1 (points as (y, x))."""
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    t = ((yy - p0[0]) * dy + (xx - p0[1]) * dx) / max(dy * dy + dx * dx, 1e-12)
    t = t.clamp(0, 1)
    return torch.hypot(yy - (p0[0] + t * dy), xx - (p0[1] + t * dx))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (the datasets' x / 127.5 - 1 of 8-bit pixels) back to their uint8 values."""
    return ((images.float() + 1) * HALF).round().clamp(0, 255).to(torch.uint8)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], computed as pipelines.images.image_to_tensor computes it."""
    return pixels.float() / HALF - 1


def pil_of(pixels: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> a PIL "L" or "RGB" image."""
    arr = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")


def lowres_views(pixels: torch.Tensor, factor: int, flip: bool) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> their low-res versions (B, V, C, H/k, W/k), V = 2 with the flipped view."""
    out = []
    for px in pixels:
        views = [px, px.flip(-1)] if flip else [px]
        small = [np.asarray(downscale(pil_of(v), factor)) for v in views]
        out.append(torch.stack([torch.from_numpy(s.reshape(*s.shape[:2], -1).copy()).permute(2, 0, 1)
                                for s in small]))
    return torch.stack(out)


# --- the per-step inputs --------------------------------------------------------------------------------

@dataclass
class ConcatInputs(ABC):
    """What stage 2 concatenates to x_t, for one run (module docstring): one subclass per concatenation
    kind of `daguerre.conditioning` (`INPUTS`), which builds c with the pipelines' own functions."""

    config: ModelConfig  # the derived model config (VAE factor, unet.num_classes)
    vae: AutoencoderKL  # the frozen autoencoder (inpaint: masked-image latents)
    pixels: torch.Tensor  # uint8: lowres (N, V, C, H/k, W/k); inpaint (N, C, H, W)
    size: int  # training image side
    factor: int = DEFAULT_LOWRES_FACTOR
    noise_max: int = 0
    mask_full: float = DEFAULT_MASK_FULL
    preview: list[dict[str, Any]] = field(default_factory=list)  # the first training items: sample grids

    @staticmethod
    def cache_params(factor: int, flip: bool) -> dict[str, Any]:
        """The settings its pixel cache depends on besides the data (part of the cache key)."""
        return {"factor": None, "flip": None}

    @staticmethod
    def cached_pixels(pixels: torch.Tensor, factor: int, flip: bool) -> torch.Tensor:
        """uint8 training images (b, C, H, W) -> what the pixel cache keeps of them."""
        return pixels

    @classmethod
    def cached_rows(cls, data: TrainData, indices: np.ndarray, factor: int, flip: bool) -> torch.Tensor:
        """What the pixel cache keeps of the dataset items `indices` (`cached_pixels` of their images)."""
        return cls.cached_pixels(to_uint8(images_of(load_items(data, indices))), factor, flip)

    @abstractmethod
    def draw(self, rows: torch.Tensor, views: torch.Tensor, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """The CPU inputs of one micro-batch: images (lowres or full, in [-1, 1]) and the per-sample draws."""

    @abstractmethod
    def build(self, draws: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(concat (B, c, h, w), labels y or None) on `device`, from `draw`'s output."""

    def step(self, rows: torch.Tensor, views: torch.Tensor, gens: list[torch.Generator],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.build(self.draw(rows, views, gens), device)

    def apply(self, x_t: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor, views: torch.Tensor,
              gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
        """The U-Net input cat(x_t, c) of one micro-batch; the low-res noise level, when drawn, goes to kwargs["y"]."""
        c, y = self.step(rows, views, gens, device)
        if y is not None:
            kwargs["y"] = y
        return torch.cat([x_t, c.to(x_t)], dim=1)

    @abstractmethod
    def sample_pair(self, original: Image.Image, common: dict[str, Any], components: Components,
                    index: int) -> tuple[Image.Image, Image.Image]:
        """(the input shown, the model's output) of preview image `index` (training row `index`) through the
        pipeline of its kind."""

    @torch.no_grad()
    def sample_grid(self, components: Components, sample: SampleConfig) -> Image.Image:
        """The first training images through `upscale` / `inpaint` (fixed seeds, sample steps, sampler and
        guidance, each image's own caption): rows input, output, original."""
        from .samples import grid

        conditioner = conditioner_for(components.config)
        cells = []
        for i, item in enumerate(self.preview):
            original = pil_of(to_uint8(item["image"]))
            common = {**conditioner.item_request(item.get("caption", ""), item.get("label")),
                      "steps": sample.steps, "sampler": sample.sampler,
                      "cfg_scale": conditioner.guidance_scale(sample.cfg_scale),
                      "seed": sample.seed + i, "width": self.size, "height": self.size}
            shown, out = self.sample_pair(original, common, components, i)
            cells.append((shown, out, original))
        n = len(cells)
        return grid([c[0] for c in cells] + [c[1] for c in cells] + [c[2] for c in cells], cols=n)


class LowresInputs(ConcatInputs):
    """Super-resolution: the cached low-res views, noise-augmented per sample when `noise_max` > 0."""

    @staticmethod
    def cache_params(factor: int, flip: bool) -> dict[str, Any]:
        return {"factor": factor, "flip": flip}

    @staticmethod
    def cached_pixels(pixels: torch.Tensor, factor: int, flip: bool) -> torch.Tensor:
        return lowres_views(pixels, factor, flip)

    def draw(self, rows: torch.Tensor, views: torch.Tensor, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        out = {"lowres": to_float(self.pixels[rows, views])}  # (B, C, h0, w0)
        if self.noise_max > 0:
            f = self.config.vae.downsample_factor
            shape = (self.pixels.shape[2], self.size // f, self.size // f)
            levels, eps = [], []
            for g in gens:
                levels.append(torch.randint(0, self.noise_max + 1, (1,), generator=g))
                eps.append(torch.randn(shape, generator=g))
            out["level"], out["eps"] = torch.cat(levels), torch.stack(eps)
        return out

    @torch.no_grad()
    def build(self, draws: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = LowresConcat.build(self.config, draws["lowres"].to(device), self.size, self.size)
        if "level" not in draws:
            return c, None
        scales = [LowresConcat.noise_scales(int(v)) or (1.0, 0.0) for v in draws["level"]]
        a = torch.tensor([s[0] for s in scales], dtype=c.dtype, device=device).view(-1, 1, 1, 1)
        s = torch.tensor([s[1] for s in scales], dtype=c.dtype, device=device).view(-1, 1, 1, 1)
        return a * c + s * draws["eps"].to(device, c.dtype), draws["level"].to(device)

    def sample_pair(self, original: Image.Image, common: dict[str, Any], components: Components,
                    index: int) -> tuple[Image.Image, Image.Image]:
        from ..pipelines.request import GenerationRequest
        from ..pipelines.upscale import upscale

        small = downscale(original, self.factor)
        req = GenerationRequest(**common, task="upscale", init_image=small, upscale_factor=float(self.factor),
                                noise_level=min(SAMPLE_NOISE_LEVEL, self.noise_max))
        shown = small.resize(original.size, Image.Resampling.NEAREST)
        return shown, upscale(components, req.validate(components.config))[0].image


class InpaintInputs(ConcatInputs):
    """Inpainting: a random mask per sample and step, and the latent of the image masked by it."""

    def draw(self, rows: torch.Tensor, views: torch.Tensor, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        x = to_float(self.pixels[rows])  # (B, C, H, W)
        flipped = views.bool()
        x[flipped] = x[flipped].flip(-1)
        masks = torch.stack([random_mask(g, self.size, self.size, self.mask_full) for g in gens])  # (B, 1, H, W)
        return {"image": x, "mask": masks}

    @torch.no_grad()
    def build(self, draws: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        from ..pipelines.tiling import encode_latents

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return encode_latents(self.vae, pixels).to(pixels.device)

        factor = self.config.vae.downsample_factor
        return InpaintConcat.build(draws["image"].to(device), draws["mask"].to(device), encode, factor), None

    def sample_pair(self, original: Image.Image, common: dict[str, Any], components: Components,
                    index: int) -> tuple[Image.Image, Image.Image]:
        from ..pipelines.inpaint import inpaint
        from ..pipelines.request import GenerationRequest

        mask = np.zeros((self.size, self.size), np.uint8)
        q = self.size // 4
        mask[q:self.size - q, q:self.size - q] = 255  # the centre square
        keep = (mask == 0)[..., None] if original.mode == "RGB" else mask == 0
        shown = Image.fromarray(np.where(keep, np.asarray(original), 128).astype(np.uint8), original.mode)
        req = GenerationRequest(**common, task="inpaint", init_image=original, mask=Image.fromarray(mask),
                                strength=1.0, mask_blur=0)
        return shown, inpaint(components, req.validate(components.config))[0].image


class SemanticInputs(ConcatInputs):
    """Semantic synthesis: the training scenes' label maps (the pixel cache holds them, (N, H, W) uint8), as
    label fractions on the latent grid (`conditioning.SemanticConcat.build`)."""

    @classmethod
    def cached_rows(cls, data: TrainData, indices: np.ndarray, factor: int, flip: bool) -> torch.Tensor:
        raw = getattr(data.dataset, "dataset", data.dataset)
        if not hasattr(raw, "label_map"):
            raise ValueError("a semantic-synthesis model trains on scenes whose label maps are known: data.kind = "
                             "'shapes'")
        return torch.stack([torch.from_numpy(raw.label_map(int(i))) for i in indices])  # (b, H, W) uint8

    def draw(self, rows: torch.Tensor, views: torch.Tensor, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        labels = self.pixels[rows].long()  # (B, H, W)
        flipped = views.bool()
        labels[flipped] = labels[flipped].flip(-1)
        return {"labels": labels}

    @torch.no_grad()
    def build(self, draws: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        count, factor = len(self.config.semantic_labels), self.config.vae.downsample_factor
        return SemanticConcat.build(draws["labels"].to(device), count, factor), None

    def sample_pair(self, original: Image.Image, common: dict[str, Any], components: Components,
                    index: int) -> tuple[Image.Image, Image.Image]:
        from ..data.layout import LabelMap
        from ..pipelines.request import GenerationRequest
        from ..pipelines.txt2img import txt2img

        semantic = LabelMap.from_array(self.pixels[index].numpy())
        req = GenerationRequest(**common, semantic_map=semantic)
        return semantic.image().convert("RGB"), txt2img(components, req.validate(components.config))[0].image


class NoInputs:
    """A model without concatenation: the U-Net input is x_t alone (nothing drawn), the grid plain samples."""

    def apply(self, x_t: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor, views: torch.Tensor,
              gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
        return x_t

    def sample_grid(self, components: Components, sample: SampleConfig) -> Image.Image:
        from .samples import sample_grid

        return sample_grid(components, sample)


INPUTS: dict[type[NoConcat], type[ConcatInputs]] = {LowresConcat: LowresInputs, InpaintConcat: InpaintInputs,
                                                     SemanticConcat: SemanticInputs}


def pixel_cache_key(description: dict, inputs: type[ConcatInputs], kind: str, factor: int, flip: bool,
                    n_train: int) -> str:
    blob = json.dumps({"version": PIXEL_CACHE_VERSION, "data": description, "kind": kind,
                       **inputs.cache_params(factor, flip), "n_train": n_train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def _build_pixels(data: TrainData, inputs: type[ConcatInputs], factor: int, flip: bool) -> torch.Tensor:
    chunks = []
    pool = data.train_pool
    for start in range(0, len(pool), LOAD_BATCH):
        chunks.append(inputs.cached_rows(data, pool[start:start + LOAD_BATCH], factor, flip))
    return torch.cat(chunks)


def build_concat_inputs(model_cfg: ModelConfig, cfg: RunConfig, data: TrainData, vae: AutoencoderKL,
                        cache_root: Path, env: dist.DistEnv) -> ConcatInputs | NoInputs:
    """The run's `ConcatInputs` (`NoInputs` for a model without concatenation); rank 0 builds the pixel cache
    file CACHE/pixels_<kind>_<key>.safetensors when it is missing, every process then loads it."""
    conditioner, d = conditioner_for(model_cfg), cfg.data
    inputs = INPUTS.get(type(conditioner.concat))
    if inputs is None:
        return NoInputs()
    kind, factor = conditioner.concat.kind, d.lowres_factor
    key = pixel_cache_key(data.description, inputs, kind, factor, d.flip, len(data.train_pool))
    path = cache_root / f"pixels_{kind}_{key}.safetensors"
    if not dist.broadcast_object(path.is_file()):  # rank 0's answer, so that every process takes the same path
        if env.is_main:
            began = time.monotonic()
            logger.info("building the %s pixel cache %s from %d training images", kind, path, len(data.train_pool))
            pixels = _build_pixels(data, inputs, factor, d.flip)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors({"pixels": pixels}, path, {"key": key, "kind": kind})
            logger.info("pixel cache: %s uint8 (%.1f MB) in %.1f s", tuple(pixels.shape), pixels.numel() / 1e6,
                        time.monotonic() - began)
        dist.barrier()
    else:
        logger.info("reusing the pixel cache %s", path)
    from safetensors.torch import load_file

    pixels = load_file(str(path))["pixels"]
    if pixels.shape[0] != len(data.train_pool):
        raise ValueError(f"pixel cache {path} holds {pixels.shape[0]} images, not {len(data.train_pool)}: "
                         "delete it to rebuild it")
    n_preview = conditioner.preview_count(cfg.sample.prompts, cfg.sample.n_unconditional)
    n_preview = min(n_preview, MAX_SAMPLE_IMAGES, len(data.train_pool))
    preview = load_items(data, data.train_pool[:n_preview]) if env.is_main else []
    return inputs(config=model_cfg, vae=vae, pixels=pixels, size=d.size, factor=factor,
                  noise_max=d.lowres_noise, mask_full=d.mask_full, preview=preview)
