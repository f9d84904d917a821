"""Bounds on the work of one request, checked before any model work (shared/DESIGN.md, "Work is bounded").

One request must not be able to take the machine down: a 100000x100000 image, a million images, or a
2048x2048 image from a model trained at 64x64 (whose attention then costs 25 TFLOP a step) are refused
up front with an error that names the value, the limit and the flag that raises it. The CLI's image
commands and `daguerre serve` take the same flags (`add_limit_arguments`); the Python API applies
`DEFAULT_LIMITS` unless given others (`Limits.unlimited()` turns them off).

Work is the estimated floating-point work of the networks, counted exactly on the model's own
architecture: one U-Net forward at the request's latent size runs on PyTorch's "meta" device (shapes
only, no memory, no arithmetic) under `torch.utils.flop_counter.FlopCounterMode`, and so does one VAE
decode (and encode, for the image tasks). That captures what a pixels x steps x images product cannot:
attention's cost grows with the square of the number of latent cells, and models differ a thousandfold
in cost per pixel. Memory is bounded by the pixels held at once (`max_batch_pixels`) and per image.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ModelConfig, UNetConfig, VAEConfig

TFLOP = 1e12


class LimitError(ValueError):
    """A request over one of the `Limits`: the message names the value, the limit and how to raise it."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds of one request. The defaults are safe on a 24 GB machine with 2 cores: the largest
    default request runs in well under an hour on such a CPU and its activations fit in a few GB."""

    max_pixels: int = 2048 * 2048  # width x height of one image (A1111's slider stops at 2048)
    max_batch_pixels: int = 4 * 1024 * 1024  # batch_size x width x height: the images in memory at once
    max_images: int = 100  # images per request (n; A1111's batch_size x n_iter)
    max_steps: int = 1000  # sampler steps (DDPM's full chain is 1000)
    max_work: float = 500.0  # estimated network work of the whole request, in TFLOP (SD 1.5: ~36 per 512² image)
    max_input_pixels: int = 16 * 1024 * 1024  # width x height of an input image (init image, mask), before decoding

    @classmethod
    def unlimited(cls) -> Limits:
        """No bounds: for scripts that know what they ask for."""
        inf = math.inf
        return cls(max_pixels=inf, max_batch_pixels=inf, max_images=inf, max_steps=inf, max_work=inf,
                   max_input_pixels=inf)

    def check_size(self, width: int, height: int, batch_size: int = 1) -> None:
        """One image of width x height, and batch_size of them at once."""
        pixels = width * height
        if pixels > self.max_pixels:
            raise LimitError(f"size {width}x{height} ({_mp(pixels)}) is over the limit of {_mp(self.max_pixels)} "
                             f"per image; choose a smaller size or raise --max-pixels (Limits.max_pixels)")
        if batch_size * pixels > self.max_batch_pixels:
            raise LimitError(f"batch size {batch_size} x {width}x{height} ({_mp(batch_size * pixels)} in memory at "
                             f"once) is over the limit of {_mp(self.max_batch_pixels)}; use a smaller batch size "
                             f"(more batches make the same images) or raise --max-batch-pixels "
                             f"(Limits.max_batch_pixels)")

    def check_count(self, n: int, steps: int) -> None:
        if n > self.max_images:
            raise LimitError(f"{n} images is over the limit of {self.max_images} per request; ask for fewer or "
                             "raise --max-images (Limits.max_images)")
        if steps > self.max_steps:
            raise LimitError(f"{steps} steps is over the limit of {self.max_steps}; use fewer steps or raise "
                             "--max-steps (Limits.max_steps)")

    def check_input_image(self, width: int, height: int, name: str) -> None:
        """An input image's size, read from its header before its pixels are decoded."""
        if width * height > self.max_input_pixels:
            raise LimitError(f"image {name} is {width}x{height} ({_mp(width * height)}), over the input limit of "
                             f"{_mp(self.max_input_pixels)}; scale it down first or raise --max-input-pixels "
                             "(Limits.max_input_pixels)")

    def check_work(self, tflop: float, what: str) -> None:
        if tflop > self.max_work:
            raise LimitError(f"{what} needs about {tflop:.4g} TFLOP of network work, over the limit of "
                             f"{self.max_work:g} TFLOP; use fewer steps, images or pixels, or raise --max-work "
                             "(Limits.max_work, in TFLOP)")


DEFAULT_LIMITS = Limits()


def _mp(pixels: float) -> str:
    return f"{pixels / 1e6:.3g} MP"


def request_work(config: ModelConfig, *, width: int, height: int, steps: int, n: int, guided: bool,
                 encodes: bool = False) -> float:
    """Estimated TFLOP of a request: steps x n U-Net calls (twice with classifier-free guidance), n VAE
    decodes, and n VAE encodes for the image tasks. A sampler that calls the network twice a step (Heun,
    DPM2) costs up to twice this; the bound is on the order of magnitude."""
    f = config.vae.downsample_factor
    h, w = height // f, width // f
    unet = unet_tflop(config.unet, h, w, config.unet.context_dim is not None)
    vae = vae_tflop(config.vae, h, w, encodes)
    return n * (steps * unet * (2 if guided else 1) + vae)


def unet_tflop(cfg: UNetConfig, h: int, w: int, text: bool) -> float:
    """TFLOP of one U-Net forward of batch 1 on an (h, w) latent with a 77-token context (counted on 'meta')."""
    return _cached(("unet", repr(cfg), h, w, text), lambda: _unet_tflop(cfg, h, w, text))


def vae_tflop(cfg: VAEConfig, h: int, w: int, encodes: bool) -> float:
    """TFLOP of one VAE decode of an (h, w) latent, plus one encode of its image when `encodes`."""
    return _cached(("vae", repr(cfg), h, w, encodes), lambda: _vae_tflop(cfg, h, w, encodes))


_CACHE: dict[tuple, float] = {}  # (network, its config's repr, latent h, w, flag) -> TFLOP
_CACHE_SIZE = 256


def _cached(key: tuple, count) -> float:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = count()
    return _CACHE[key]


def _unet_tflop(cfg: UNetConfig, h: int, w: int, text: bool) -> float:
    import torch

    from .models.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(cfg)
        x = torch.zeros(1, cfg.in_channels, h, w)
        context = torch.zeros(1, 77, cfg.context_dim) if text else None
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes is not None else None
        return _count(unet, x, torch.zeros(1), context, y)


def _vae_tflop(cfg: VAEConfig, h: int, w: int, encodes: bool) -> float:
    import torch

    from .models.autoencoder import Decoder, Encoder

    f = cfg.downsample_factor
    with torch.device("meta"):
        total = _count(Decoder(cfg), torch.zeros(1, cfg.latent_channels, h, w))
        if encodes:
            total += _count(Encoder(cfg), torch.zeros(1, cfg.in_channels, h * f, w * f))
    return total


def _count(module: Any, *inputs: Any) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / TFLOP


# --- the flags ------------------------------------------------------------------------------------------

def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-pixels, --max-batch-pixels, --max-images, --max-steps, --max-work, --max-input-pixels."""
    d = DEFAULT_LIMITS
    g = p.add_argument_group("limits", "upper bounds of one request, checked before any work (docs/security.md)")
    g.add_argument("--max-pixels", type=_positive(int), default=d.max_pixels,
                   help=f"pixels of one image, width x height (default {d.max_pixels}, 2048x2048)")
    g.add_argument("--max-batch-pixels", type=_positive(int), default=d.max_batch_pixels,
                   help=f"pixels of one batch, batch size x width x height (default {d.max_batch_pixels})")
    g.add_argument("--max-images", type=_positive(int), default=d.max_images,
                   help=f"images per request (default {d.max_images})")
    g.add_argument("--max-steps", type=_positive(int), default=d.max_steps,
                   help=f"sampler steps (default {d.max_steps})")
    g.add_argument("--max-work", type=_positive(float), default=d.max_work,
                   help=f"estimated network work of one request in TFLOP (default {d.max_work:g}; "
                   "Stable Diffusion 1.5 costs about 36 per 512x512 image at 20 steps)")
    g.add_argument("--max-input-pixels", type=_positive(int), default=d.max_input_pixels,
                   help=f"pixels of an input image (default {d.max_input_pixels}, 4096x4096)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The `Limits` of the flags `add_limit_arguments` added."""
    return Limits(max_pixels=args.max_pixels, max_batch_pixels=args.max_batch_pixels, max_images=args.max_images,
                  max_steps=args.max_steps, max_work=args.max_work, max_input_pixels=args.max_input_pixels)


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0) or (isinstance(value, float) and math.isnan(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse
