"""Pixel-side helpers of the image pipelines: loading with clear errors, resizing policies, masks,
tensor conversion and contact-sheet grids.

Resize policies (`RESIZE_MODES`, AUTOMATIC1111's img2img "Resize mode" under shorter names):
  crop     scale to cover the target keeping the aspect ratio, then center-crop ("Crop and resize");
  fit      scale to fit inside the target keeping the aspect ratio, then pad by repeating the edge
           pixels ("Resize and fill");
  stretch  resize to the target, ignoring the aspect ratio ("Just resize");
  none     use the image as it is: its size must already be the target.
Masks follow the same geometry as their image, so the two stay aligned. Images are RGB (or L for
grayscale models); masks are L, white (255) = repaint, black (0) = keep.

An input image is refused before its pixels are decoded when its header declares more than
`Limits.max_input_pixels` (a PNG of a few KB can declare 20000x20000 pixels, 1.2 GB once decoded);
PIL's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) stays on under any limits.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from ..limits import DEFAULT_LIMITS, Limits
from .fields import RESIZE_MODES

ImageSource = str | os.PathLike | Image.Image
IMAGE_RESAMPLE = Image.Resampling.LANCZOS  # A1111 resizes images with Lanczos
MASK_RESAMPLE = Image.Resampling.BILINEAR  # masks: no ringing at the black/white edge
# Modes a mask may come in: each converts to L meaningfully (alpha modes are flattened onto black).
MASK_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16", "F")
PIXEL_MAX = 255.0
FILL_BLUR_SIGMA = 32.0  # px: how far "fill" spreads the surrounding colours into the masked area
FILL_EPS = 1e-6  # guard for the normalised-convolution fill where no known pixel is near


def load_image(source: ImageSource, mode: str = "RGB", limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """An image from a path (or a PIL image), converted to `mode` ("RGB" or "L"), fully read.

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not an
    image PIL can read, or when it has more pixels than `limits.max_input_pixels` (a LimitError,
    checked on the header before decoding); a PIL image is only checked and converted.
    """
    if isinstance(source, Image.Image):
        limits.check_input_image(source.width, source.height, "(in-memory image)")
        return source.convert(mode) if source.mode != mode else source.copy()
    path = _image_path(source, "image")
    im = open_image(path, str(path), limits)
    return im.convert(mode) if im.mode != mode else im  # an alpha channel is dropped: the colour channels are the image


def load_mask(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """An inpainting mask as L (white = repaint, black = keep) from a path or PIL image.

    Colour masks become their luminance; alpha masks are flattened onto black (transparent = keep).
    Modes without a meaningful gray value (CMYK, YCbCr, LAB, HSV, ...) are a ValueError. Size limits
    and errors as in `load_image`.
    """
    if isinstance(source, Image.Image):
        raw, name = source, "mask image"
        limits.check_input_image(raw.width, raw.height, "(in-memory mask image)")
    else:
        path = _image_path(source, "mask image")
        raw, name = open_image(path, str(path), limits), str(source)
    if raw.mode not in MASK_MODES:
        raise ValueError(
            f"mask {name} has mode {raw.mode!r}, which is not a grayscale or RGB image; "
            "save it as a black-and-white PNG (white = repaint, black = keep)"
        )
    if raw.mode in ("LA", "PA", "RGBA"):
        rgba = raw.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        flat.alpha_composite(rgba)
        return flat.convert("L")
    if raw.mode in ("I", "I;16", "F"):
        arr = np.asarray(raw, dtype=np.float64)
        top = arr.max() if arr.max() > PIXEL_MAX else PIXEL_MAX
        return Image.fromarray(np.clip(arr / top * PIXEL_MAX, 0, PIXEL_MAX).round().astype(np.uint8), "L")
    return raw.convert("L")


def open_image(source: str | os.PathLike | BinaryIO, name: str, limits: Limits = DEFAULT_LIMITS,
               formats: Sequence[str] | None = None) -> Image.Image:
    """The image in a file (a path or a binary file object, e.g. `io.BytesIO` of an upload) in its own
    mode, fully read, after its size is read from the header and checked against `limits`.

    `name` names the image in errors: a LimitError over `limits.max_input_pixels`, a ValueError when
    PIL's decompression-bomb guard trips or the data is not an image PIL can read. `formats` restricts
    the formats PIL tries (None: all it knows).
    """
    hint = f"give a {'/'.join(formats)} image" if formats else "give a PNG, JPEG or WebP file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source, formats=formats)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{name} declares too many pixels to decode safely ({e}): too large to load, "
                         "scale it down first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL: SyntaxError for broken files
        raise ValueError(f"{name} is not a readable image ({e}); {hint}") from None
    with im:
        limits.check_input_image(im.width, im.height, name)
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as e:  # truncated data; PIL's ValueError: a text chunk too large
            raise ValueError(f"{name} is not a readable image ({e}); {hint}") from None
        return im.copy()


def _image_path(source: str | os.PathLike, what: str) -> Path:
    """The path of an image file, with FileNotFoundError / ValueError when there is no file to read."""
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"the {what} must be a file path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such {what}: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    return path


def snap_down(value: int, factor: int) -> int:
    """The largest multiple of `factor` not above `value` (0 when value < factor)."""
    return value // factor * factor


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centered width x height window of `image` (no resampling); the image must be at least that big."""
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_image(
    image: Image.Image, width: int, height: int, mode: str = "crop", resample: Image.Resampling = IMAGE_RESAMPLE
) -> Image.Image:
    """`image` brought to width x height by a resize policy (module docstring); unchanged if already that size."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if image.size == (width, height):
        return image
    if mode == "none":
        raise ValueError(
            f"image is {image.width}x{image.height}, not {width}x{height}: "
            "choose a resize mode (crop, fit or stretch) or give a matching size"
        )
    if mode == "stretch":
        return image.resize((width, height), resample)
    if mode == "crop":
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        return center_crop(image.resize(size, resample), width, height)
    scale = min(width / image.width, height / image.height)  # "fit"
    size = (min(width, max(1, round(image.width * scale))), min(height, max(1, round(image.height * scale))))
    small = np.asarray(image.resize(size, resample))
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    pad = [(top, height - size[1] - top), (left, width - size[0] - left)] + [(0, 0)] * (small.ndim - 2)
    return Image.fromarray(np.pad(small, pad, mode="edge"), image.mode)


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """The mask softened by a Gaussian of standard deviation `radius` pixels (A1111 "Mask blur"); 0 = unchanged."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, C, H, W) float32 in [-1, 1] (C = 3 for RGB, 1 for L)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr / (PIXEL_MAX / 2) - 1).permute(2, 0, 1)[None].contiguous()  # (1, C, H, W)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """An L mask -> (1, 1, H, W) float32 in [0, 1] (1 = repaint)."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / PIXEL_MAX)[None, None]


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with the surrounding colours (A1111 "Masked content: fill"): a normalised
    convolution, blur(image * keep) / blur(keep), with a wide Gaussian, so the fill is a smooth extension
    of the known pixels (A1111 uses OpenCV's Telea inpainting for the same purpose)."""
    keep = 1.0 - np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / PIXEL_MAX  # (H, W, 1)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    t = torch.from_numpy(np.concatenate([arr * keep, keep], axis=-1)).permute(2, 0, 1)[None]  # (1, C+1, H, W)
    blurred = _gaussian_blur(t, FILL_BLUR_SIGMA)[0].permute(1, 2, 0).numpy()
    fill = blurred[..., :-1] / np.maximum(blurred[..., -1:], FILL_EPS)
    if not (keep > 0).any():
        fill = np.full_like(arr, PIXEL_MAX / 2)  # nothing known: mid gray
    out = arr * keep + fill * (1 - keep)
    out = np.clip(out, 0, PIXEL_MAX).round().astype(np.uint8)
    return Image.fromarray(out[..., 0] if image.mode == "L" else out, image.mode)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect-free zero padding (the normalised fill divides it out)."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """A contact sheet of `images` in rows of `cols` (default ceil(sqrt(n))), cells as big as the largest image."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    grid = Image.new(mode, (cols * cell_w, rows * cell_h))
    for k, im in enumerate(images):
        grid.paste(im.convert(mode), ((k % cols) * cell_w, (k // cols) * cell_h))
    return grid
