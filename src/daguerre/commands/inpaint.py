"""`daguerre inpaint IMAGE MASK [PROMPT]`: repaint the white part of a mask."""

from __future__ import annotations

import argparse

from ..cli import command
from .img2img import add_image_arguments, run_image_command

FILL_CHOICES = ("original", "fill", "latent-noise", "latent-nothing")  # A1111 "Masked content"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("mask", help="mask image of the same size: white = repaint, black = keep")
    p.add_argument("prompt", nargs="?", default="", help="what to draw in the masked area")
    p.add_argument("--mask-blur", type=int, default=4, help="soften the mask edge by a Gaussian of this many "
                   "pixels (default 4); outside the blurred mask the output keeps the input's pixels exactly")
    p.add_argument("--fill", default="original", choices=FILL_CHOICES,
                   help="what the masked area starts from: the original image, a fill of its surroundings, "
                        "latent noise or zero latents (the last two want --strength 1) (default original)")
    p.add_argument("--only-masked", action="store_true",
                   help="A1111's 'Only masked': redraw only a crop around the mask, at --size (default: the "
                        "model's size), and paste it back; the output keeps the input's size")
    p.add_argument("--only-masked-padding", type=int, default=32, metavar="PIXELS",
                   help="with --only-masked: pixels of context around the mask in the crop (default 32)")
    add_image_arguments(p, "denoising strength in [0, 1] inside the mask (default 0.75; 1 with an "
                           "inpainting model or --fill latent-noise)")


@command("inpaint", "repaint the masked part of an image", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..pipelines.inpaint import inpaint

    fields = {"task": "inpaint", "mask": args.mask, "mask_blur": args.mask_blur,
              "inpaint_fill": args.fill.replace("-", " "), "inpaint_padding": args.only_masked_padding,
              "inpaint_area": "only masked" if args.only_masked else "whole"}
    return run_image_command(args, inpaint, fields)
