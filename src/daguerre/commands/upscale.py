"""`daguerre upscale IMAGE [PROMPT]`: enlarge an image with a super-resolution model, or with a regular
model by Lanczos resize + img2img (A1111 "hires fix")."""

from __future__ import annotations

import argparse

from ..cli import command
from .img2img import add_image_arguments, run_image_command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("prompt", nargs="?", default="", help="what the image shows (guides the added detail)")
    p.add_argument("--scale", type=float, default=2.0, help="upscale factor (default 2; --size overrides it)")
    p.add_argument("--noise-level", type=int, default=20, help="super-resolution models that take it: noise "
                   "added to the low-res input, in steps of the augmentation schedule (default 20)")
    add_image_arguments(p, "regular models: img2img denoising strength after the resize (default 0.4); "
                           "super-resolution models start from noise and ignore it")


def _note(components) -> str | None:
    from ..pipelines.request import DEFAULT_STRENGTH
    from ..pipelines.upscale import FALLBACK_UPSCALER, is_sr_model

    if is_sr_model(components):
        return None
    return (f"model {components.config.name!r} is not a super-resolution model: resizing with "
            f"{FALLBACK_UPSCALER}, then img2img (A1111 hires fix; --strength, default {DEFAULT_STRENGTH['upscale']})")


@command("upscale", "enlarge an image (super-resolution model, or resize + img2img)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..pipelines.upscale import upscale

    fields = {"task": "upscale", "upscale_factor": args.scale, "noise_level": args.noise_level}
    return run_image_command(args, upscale, fields, note=_note)
