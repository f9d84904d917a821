"""`daguerre inpaint IMAGE MASK [PROMPT]`: repaint the white part of a mask."""

from __future__ import annotations

import argparse

from .img2img import image_command_arguments, run_image_command
from .registry import command


@command("inpaint", "repaint the masked part of an image", image_command_arguments("inpaint"))
def run(args: argparse.Namespace) -> int:
    from ..pipelines.inpaint import inpaint

    return run_image_command(args, inpaint, "inpaint")
