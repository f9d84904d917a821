"""The image commands' request flags, made from `GenerationRequest`'s field table (pipelines/fields.py).

Each command runs one task (generate: txt2img; img2img, inpaint, upscale) and takes the `cli` flag of
every field that matters for it: positional arguments first (the input image, the mask), then the
optional prompt, then the flags. A flag left out is None on the parsed arguments, so
`request_fields` returns only the fields given on the command line: the request's defaults (or, for
`generate --from-png`, the file's settings) stand for the others.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..pipelines.fields import surface
from ..pipelines.request import FEWER_CALLS_FIELDS, GenerationRequest

# the settings of fewer network calls (issue 15) and their preset, which `daguerre eval` takes too
FEWER_CALLS = (*FEWER_CALLS_FIELDS, "fast")
# CLIP guidance's flags that `daguerre eval` takes (its own --clip names the scoring and the guiding CLIP)
CLIP_GUIDANCE = ("clip_guidance", "cutouts", "clip_repeats")
# a GLIGEN model's scheduled sampling, which `daguerre eval` takes to measure it (docs/layout.md)
LAYOUT_STEPS = ("layout_steps",)


def add_request_arguments(p: argparse.ArgumentParser, task: str, only: tuple[str, ...] | None = None) -> None:
    """The arguments of the request fields that matter for `task` (only the fields named in `only`, if given)."""
    flags = [x for x in surface(GenerationRequest, "cli", task) if only is None or x[0].name in only]
    positional = sorted((x for x in flags if x[1].positional), key=lambda x: "nargs" in x[1].options)
    for f, flag in [*positional, *(x for x in flags if not x[1].positional)]:
        flag.add(p, f, task)


def request_fields(args: argparse.Namespace, task: str, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The request fields given on the command line for `task` (of those named in `only`, if given)."""
    fields: dict[str, Any] = {}
    for f, flag in surface(GenerationRequest, "cli", task):
        if only is None or f.name in only:
            fields.update(flag.read(args, f))
    return fields
