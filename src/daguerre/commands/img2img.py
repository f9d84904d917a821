"""`daguerre img2img IMAGE [PROMPT]`: redraw an image guided by a prompt (SDEdit), and the runner the
image commands (img2img, inpaint, upscale) share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..cli import command
from .generate import (
    add_model_arguments,
    add_output_arguments,
    add_sampling_arguments,
    check_limits_early,
    run_and_save,
    set_threads,
)
from .outputs import plan_outputs

RESIZE_CHOICES = ("crop", "fit", "stretch", "none")


def add_image_arguments(p: argparse.ArgumentParser, strength_help: str) -> None:
    """--strength / --resize / --class, shared by the image commands, plus generate's model, sampling and
    output arguments (--tile, --preview, --grid, --overwrite, the limit flags)."""
    p.add_argument("--strength", "-s", type=float, default=None, help=strength_help)
    p.add_argument("--resize", default="crop", choices=RESIZE_CHOICES,
                   help="how the input meets --size: crop (scale to cover, center-crop), fit (scale to fit, "
                        "pad with edge pixels), stretch, none (must match). Without --size the image's own size "
                        "is used, center-cropped to the model's grid (default crop)")
    p.add_argument("--class", dest="class_label", default=None, metavar="NAME_OR_INDEX",
                   help="class label, for class-conditional models")
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_output_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("prompt", nargs="?", default="", help="what to draw")
    add_image_arguments(p, "denoising strength in [0, 1]: 0 keeps the image, 1 ignores it (default 0.75)")


def run_image_command(
    args: argparse.Namespace,
    pipeline: Callable[..., list[Any]],
    fields: dict[str, Any],
    note: Callable[[Any], str | None] | None = None,
) -> int:
    """Build the request from the shared arguments and `fields`, run `pipeline` with a progress bar,
    save the PNGs (and a grid for several images), print their paths. `note(components)` may return a
    line to tell the user before the run (e.g. which upscaling method applies)."""
    from ..pipelines.request import GenerationRequest
    from ..registry import open_model

    width, height = args.size if args.size else (None, None)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler,
        schedule=args.schedule, cfg_scale=args.cfg, seed=args.seed, width=width, height=height, n=args.n,
        batch_size=args.batch_size, clip_skip=args.clip_skip, eta=args.eta, class_label=args.class_label,
        init_image=args.image, strength=args.strength, resize_mode=args.resize, tile=args.tile,
        **fields,
    )
    limits = check_limits_early(args, request)
    outputs = plan_outputs(args.out, args.n, args.overwrite, inputs=[args.image, fields.get("mask")])
    comps, model_hash = open_model(args.model, device=args.device)
    set_threads(args, comps)
    request = request.validate(comps.config, limits)  # fail before any work on bad input (images included)
    if note is not None and (line := note(comps)):
        print(f"daguerre {args.command}: note: {line}", file=sys.stderr)
    return run_and_save(args, comps, request, pipeline, model_hash, outputs)


@command("img2img", "redraw an image guided by a prompt", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..pipelines.img2img import img2img

    return run_image_command(args, img2img, {"task": "img2img"})
