"""`daguerre img2img IMAGE [PROMPT]`: redraw an image guided by a prompt (SDEdit), and the runner the
image commands (img2img, inpaint, upscale) share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .generate import (
    add_adapter_arguments,
    add_model_arguments,
    add_output_arguments,
    check_limits_early,
    checked_config,
    run_and_save,
    set_threads,
)
from .outputs import plan_outputs
from .registry import command
from .request_args import add_request_arguments, request_fields


def image_command_arguments(task: str) -> Callable[[argparse.ArgumentParser], None]:
    """The arguments of an image command: its task's request flags (pipelines/request.py: the input image,
    the prompt, the sampling settings, --strength, --resize, ...), the model and the output arguments."""

    def add(p: argparse.ArgumentParser) -> None:
        add_request_arguments(p, task)
        add_model_arguments(p)
        add_adapter_arguments(p)
        add_output_arguments(p)

    return add


def run_image_command(
    args: argparse.Namespace,
    pipeline: Callable[..., list[Any]],
    task: str,
    note: Callable[[Any], str | None] | None = None,
) -> int:
    """Build the `task` request from the command line, validate it against the model, run `pipeline` with
    a progress bar, save the PNGs (and a grid for several images), print their paths. `note(components)`
    may return a line to tell the user before the run (e.g. which upscaling method applies)."""
    from ..pipelines.request import GenerationRequest
    from ..registry import open_model

    request = GenerationRequest(task=task, **request_fields(args, task))
    yaml = checked_config(args.config, args.model)
    limits = check_limits_early(args, request)
    outputs = plan_outputs(args.out, request.n, args.overwrite, inputs=[request.init_image, request.mask])
    comps, model_hash = open_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                   compile=args.compile, original_config=yaml, base=args.base)
    set_threads(args, comps)
    request = request.validate(comps.config, limits)  # fail before any work on bad input (images included)
    if note is not None and (line := note(comps)):
        print(f"daguerre {args.command}: note: {line}", file=sys.stderr)
    return run_and_save(args, comps, request, pipeline, model_hash, outputs)


@command("img2img", "redraw an image guided by a prompt", image_command_arguments("img2img"))
def run(args: argparse.Namespace) -> int:
    from ..pipelines.img2img import img2img

    return run_image_command(args, img2img, "img2img")
