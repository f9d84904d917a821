"""`daguerre generate PROMPT`: text-to-image from the command line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..cli import UserError, command


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768); '512' -> (512, 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype, shared by every command that runs a model."""
    p.add_argument("--model", "-m", default=None, help="checkpoint file, diffusers folder, shipped model name, "
                   "or random:PRESET (default: the shipped default model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype of the U-Net and text encoder (the VAE decodes in fp32)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative", "-N", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--sampler", default="DPM++ 2M", help="sampler, A1111 or ComfyUI name (default 'DPM++ 2M'); "
                   "see docs/samplers.md")
    p.add_argument("--schedule", default="Automatic", help="schedule type: Automatic, Karras, Exponential, "
                   "SGM Uniform, Simple, Normal (default Automatic)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--seed", type=int, default=-1, help="seed of the first image; image i uses seed+i (-1: random)")
    p.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT in pixels (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per network call (default 1)")
    p.add_argument("--clip-skip", type=int, default=1, help="A1111 clip skip (default 1)")
    p.add_argument("--out", "-o", default="outputs", help="output PNG file (one image) or folder (default outputs/)")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="", help="what to draw")
    add_model_arguments(p)
    add_sampling_arguments(p)


def output_paths(out: str, seeds: list[int]) -> list[Path]:
    """A file path for one image; for a folder (or several images) numbered files `NNNNN-SEED.png`."""
    target = Path(out)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{i:02d}-{s}.png") for i, s in enumerate(seeds)]
    target.mkdir(parents=True, exist_ok=True)
    start = len(list(target.glob("*.png")))
    return [target / f"{start + i:05d}-{s}.png" for i, s in enumerate(seeds)]


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@command("generate", "generate images from a text prompt", _add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img
    from ..pngmeta import save_png
    from ..registry import open_model

    dtype = getattr(torch, DTYPES[args.dtype])
    width, height = args.size if args.size else (None, None)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler,
        schedule=args.schedule, cfg_scale=args.cfg, seed=args.seed, width=width, height=height, n=args.n,
        batch_size=args.batch_size, clip_skip=args.clip_skip,
    )
    comps, model_hash = open_model(args.model, device=args.device)
    request = request.validate(comps.config)  # fail before any work on bad input
    if dtype != torch.float32:
        comps.unet.to(dtype)
        if comps.text_encoder is not None:
            comps.text_encoder.to(dtype)
    from tqdm import tqdm

    total = request.n * request.steps
    with tqdm(total=total, unit="step", desc="generating", dynamic_ncols=True) as bar:
        results = txt2img(comps, request, callback=lambda info: bar.update(1), model_hash=model_hash)
    paths = output_paths(args.out, [r.seed for r in results])
    for result, path in zip(results, paths):
        save_png(result.image, path, result.parameters)
        print(path)
    if not results:
        raise UserError("nothing was generated")
    return 0
