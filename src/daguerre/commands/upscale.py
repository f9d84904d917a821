"""`daguerre upscale IMAGE [PROMPT]`: enlarge an image with a super-resolution model, or with a regular
model by Lanczos resize + img2img (A1111 "hires fix")."""

from __future__ import annotations

import argparse

from .img2img import image_command_arguments, run_image_command
from .registry import command


def _note(components) -> str | None:
    from ..pipelines.request import DEFAULT_STRENGTH
    from ..pipelines.upscale import FALLBACK_UPSCALER, is_sr_model

    if is_sr_model(components):
        return None
    return (f"model {components.config.name!r} is not a super-resolution model: resizing with "
            f"{FALLBACK_UPSCALER}, then img2img (A1111 hires fix; --strength, default {DEFAULT_STRENGTH['upscale']})")


@command("upscale", "enlarge an image (super-resolution model, or resize + img2img)",
         image_command_arguments("upscale"))
def run(args: argparse.Namespace) -> int:
    from ..pipelines.upscale import upscale

    return run_image_command(args, upscale, "upscale", note=_note)
