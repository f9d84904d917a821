"""What the explain sub-commands share: opening the model, reading an input image, bounds, drawing images.

The work of every sub-command is bounded before it starts (`check_count`, `image_size`): at most
`MAX_TIMESTEPS` timesteps or columns, `MAX_STEPS` sampling steps, `MAX_IMAGE_SIDE` pixels on a side, so a
figure is seconds on the shipped models and at most minutes for Stable Diffusion on a CPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from PIL import Image

    from ..components import Components
    from ..config import ModelConfig
    from ..pipelines.request import ValidRequest

MAX_TIMESTEPS = 12  # columns of a noising strip
MAX_STEPS = 50  # sampling steps of a trajectory (each one is two decoded images)
MAX_IMAGE_SIDE = 1024  # pixels on a side of an explained image
IMAGE_INCHES = 1.6  # the side of one image in a figure, in inches (160 pixels at page.DPI)


def check_count(value: int, low: int, high: int, what: str, flag: str) -> int:
    """`value` when low <= value <= high, else a ValueError naming the flag and the bounds."""
    if not low <= value <= high:
        raise ValueError(f"{flag} {value}: the number of {what} must be between {low} and {high}")
    return value


def open_components(args: argparse.Namespace) -> Components:
    """The model of `--model` on `--device` in `--dtype`, each network read only when first needed
    (`registry.open_model(release_after_use=True)`: a sub-command that only encodes and decodes never reads the
    U-Net), with the automatic thread count for the U-Net's size (counted on its shapes, read or not)."""
    import torch

    from ..precision import auto_threads
    from ..quantize import weight_count
    from ..registry import open_model

    comps, _ = open_model(args.model, device=args.device, dtype=args.dtype, release_after_use=True)
    threads = auto_threads(comps.device, weight_count(comps.unet))
    if threads:
        torch.set_num_threads(threads)
    return comps


def int_list(example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse `type` reading a comma-separated list of integers; its error shows `example`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. {example}") \
                from None

    return parse


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """PROMPT and the sampling options of the sub-commands that generate an image (trajectory, attention)."""
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    p.add_argument("--negative", "-N", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: the model's recommended number; at most {MAX_STEPS})")
    p.add_argument("--sampler", default=None, help="sampler, A1111 or ComfyUI name (default: the model's)")
    p.add_argument("--schedule", default=None, help="schedule type, e.g. Karras (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="side of the square image (default: the model's size)")


def sampling_request(args: argparse.Namespace, comps: Components) -> ValidRequest:
    """The validated request of `add_sampling_arguments`' options, its steps (the model's own included) at most
    MAX_STEPS."""
    from ..pipelines.request import GenerationRequest

    if args.steps is not None:
        check_count(args.steps, 1, MAX_STEPS, "sampling steps", "--steps")
    side = image_size(comps.config, args.size)
    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps,
                                sampler=args.sampler, schedule=args.schedule, cfg_scale=args.cfg, seed=args.seed,
                                width=side, height=side).validate(comps.config)
    check_count(request.sampler_steps, 1, MAX_STEPS, "sampling steps", "--steps")  # the model's own too
    return request


def model_config(spec: str | None) -> ModelConfig:
    """The `ModelConfig` of `--model` without reading any network's weights (a `random:` preset is not built)."""
    from ..config import preset
    from ..registry import RANDOM_PREFIX, default_model_name, open_model

    spec = spec or default_model_name()
    if spec.startswith(RANDOM_PREFIX):
        cfg = preset(spec[len(RANDOM_PREFIX):])
        cfg.name = spec
        return cfg
    return open_model(spec, release_after_use=True)[0].config


def image_size(config: ModelConfig, size: int | None) -> int:
    """The side of the square an input image is cropped to: `size` (default: the model's own `sample_size`),
    which must be a multiple of the VAE factor and at most MAX_IMAGE_SIDE."""
    f = config.vae.downsample_factor
    side = config.sample_size if size is None else size
    if not f <= side <= MAX_IMAGE_SIDE or side % f:
        raise ValueError(f"--size {side}: the image side must be a multiple of the model's VAE factor {f} between "
                         f"{f} and {MAX_IMAGE_SIDE} pixels")
    return side


def read_image(path: str | Path, config: ModelConfig, side: int) -> torch.Tensor:
    """The image at `path` as (1, C, side, side) in [-1, 1]: RGB or grayscale as the model's VAE reads, scaled
    to cover the square and centre-cropped (a file over the input-pixel limit is refused before decoding)."""
    from ..pipelines.images import image_to_tensor, load_image, resize_image

    mode = "L" if config.vae.in_channels == 1 else "RGB"
    return image_to_tensor(resize_image(load_image(path, mode), side, side, "crop"))


def to_display(images: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> (B, H, W, C) float arrays in [0, 1] for `imshow` (C = 1 or 3)."""
    return ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def pil_to_display(image: Image.Image) -> np.ndarray:
    """A PIL image -> (H, W, C) float array in [0, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def show_image(ax: Axes, image: np.ndarray, title: str = "") -> None:
    """Draw one (H, W, C) image in [0, 1] on `ax` without axes, pixels unsmoothed (grayscale for C = 1)."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def label_row(ax: Axes, text: str) -> None:
    """A row's label, written vertically left of its first image."""
    ax.set_ylabel(text, fontsize=9)


def figure_path(args: argparse.Namespace, name: str) -> Path:
    """Where a sub-command writes its figure `name` (`--out`)."""
    return Path(args.out) / name
