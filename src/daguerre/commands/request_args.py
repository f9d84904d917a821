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
from ..pipelines.request import GenerationRequest


def add_request_arguments(p: argparse.ArgumentParser, task: str) -> None:
    """The arguments of the request fields that matter for `task`."""
    flags = surface(GenerationRequest, "cli", task)
    positional = sorted((x for x in flags if x[1].positional), key=lambda x: "nargs" in x[1].options)
    for f, flag in [*positional, *(x for x in flags if not x[1].positional)]:
        flag.add(p, f, task)


def request_fields(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The request fields given on the command line for `task`."""
    fields: dict[str, Any] = {}
    for f, flag in surface(GenerationRequest, "cli", task):
        fields.update(flag.read(args, f))
    return fields
