"""Image transforms for training data: colour-mode normalisation, resize, crop, flip, tensor in [-1, 1].

The preprocessing of latent diffusion training (Rombach et al., CVPR 2022, and the Stable Diffusion
training scripts): resize the shorter side with a high-quality filter, crop a square (centre for
evaluation, random for training), optionally flip horizontally, and map uint8 pixels to floats in
[-1, 1] via x / 127.5 - 1, the data range the autoencoder and the diffusion model expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

HALF_RANGE = 127.5  # uint8 -> [-1, 1]: x / 127.5 - 1
WHITE = (255, 255, 255)  # transparent pixels are composited over white
UINT16_TO_UINT8 = 257.0  # 65535 / 255: 16-bit grayscale to 8-bit
CROPS = ("center", "random")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_mode(img: Image.Image, channels: int = 3) -> Image.Image:
    """Convert any PIL image to "RGB" (`channels=3`) or "L" (`channels=1`).

    Transparency (RGBA, LA, P with a transparent index) is composited over white; 16- and 32-bit
    integer images ("I;16", "I") are scaled to 8 bits; float images ("F") are taken as 0..255 and
    clipped; CMYK, YCbCr, HSV, LAB, 1-bit and palette images go through Pillow's own conversions.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    target = "RGB" if channels == 3 else "L"
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / UINT16_TO_UINT8
        elif img.mode == "I" and a.max(initial=0) > 255:
            a = a / UINT16_TO_UINT8
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode in TRANSPARENT_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != target:
        img = img.convert(target)
    return img


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size` pixels (Lanczos), keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.LANCZOS)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` square (the image must be at least that large)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A `size` x `size` square at a position drawn from `rng`."""
    w, h = img.size
    left = int(rng.integers(0, w - size + 1))
    top = int(rng.integers(0, h - size + 1))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A uint8 "L" or "RGB" image as a float32 tensor (C, H, W) in [-1, 1]."""
    a = np.array(img, dtype=np.uint8)  # copy: PIL's buffer is read-only
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(HALF_RANGE).sub_(1.0)  # (C, H, W)


@dataclass
class ImageTransform:
    """Mode -> resize shorter side -> square crop -> optional flip -> tensor (C, size, size) in [-1, 1].

    `flip` is off by default: mirroring an image silently falsifies captions that say "left" or
    "right". Randomness (crop position, flip) comes from the `rng` passed per call, so a dataset
    seeds it per (seed, epoch, index) and every epoch is reproducible.
    """

    size: int = 256  # output side in pixels
    crop: str = "center"  # "center" (evaluation) or "random" (training augmentation)
    flip: bool = False  # random horizontal flip with probability 1/2
    channels: int = 3  # 3 = RGB, 1 = grayscale

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if rng is None:
            rng = np.random.default_rng(0)
        img = to_mode(ImageOps.exif_transpose(img), self.channels)
        img = resize_shorter(img, self.size)
        img = center_crop(img, self.size) if self.crop == "center" else random_crop(img, self.size, rng)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch a list of item dicts: tensors are stacked, ints become a long tensor, anything else a list.

    Use as `DataLoader(..., collate_fn=collate)`: the default collate cannot batch `Scene` objects.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
