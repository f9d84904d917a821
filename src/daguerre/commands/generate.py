"""`daguerre generate PROMPT`: text-to-image from the command line.

The request's flags (prompt, sampling settings, size, seed, `--tile/--no-tile`, ...) come from
`GenerationRequest`'s field table (commands/request_args.py). Besides them: `--from-png FILE` makes an
image again from the A1111 `parameters` chunk of a PNG (flags given on the command line override the
file's values), `--preview DIR` saves the model's x0 estimate at every step and a GIF, `--grid` saves
a grid of the images (on by default for several), and `--list-samplers` prints the sampler names. An
existing --out file is replaced only with `--overwrite` (outputs.py); the limit flags bound the request
(daguerre.limits). See docs/usage.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..limits import Limits, add_limit_arguments, limits_from_args
from ..precision import AUTO, CLI_CHOICES, QUANTIZE_CHOICES
from .outputs import Outputs, add_overwrite_argument, plan_outputs
from .registry import UserError, command
from .request_args import add_request_arguments, request_fields


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype, shared by every command that runs a model."""
    p.add_argument("--model", "-m", default=None, help="checkpoint file, diffusers folder, shipped model name, "
                   "or random:PRESET (default: the shipped default model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default=AUTO, choices=CLI_CHOICES,
                   help="compute dtype of the networks (default auto: bf16 on a CPU with bf16 units or a GPU, fp32 "
                   "elsewhere and for the smallest models; fp16 on a CPU is very slow; see docs/usage.md, Precision)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="int8: keep the U-Net's and text encoder's layer weights in int8 (half the memory of bf16, "
                   "slightly different images); default none (with --from-png: the file's)")
    p.add_argument("--compile", action="store_true",
                   help="compile the U-Net with torch inductor (freezing): the first image at each size compiles "
                   "for minutes, later steps may run faster, memory grows; needs a C++ compiler")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: automatic, one thread for small models, torch's default otherwise)")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="the checkpoint's CompVis inference YAML (e.g. v1-inference.yaml), for a file whose head "
                   "widths its weights cannot tell; default: MODEL.yaml beside it, if any (docs/lora.md)")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="an adapter file's base model: a file or a shipped name (default: the shipped model the "
                   "adapter names; docs/layout.md)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="say which precision, attention form, convolution layout and thread count the run uses")


def checked_config(config: str | None, model: str | None) -> Path | None:
    """--config FILE: FILE, the CompVis YAML of the checkpoint `model` names, checked before any work; the
    command passes it to `open_model(original_config=...)`, the one load it is for."""
    from ..registry import original_config_for

    return original_config_for(model, config)


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """--lora-dir / --embeddings-dir: the folders the prompts name LoRAs and textual-inversion embeddings in."""
    p.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="folder of LoRA files (.safetensors, .pt): the prompt's <lora:NAME:WEIGHT> applies DIR/NAME.* "
                   "(docs/lora.md)")
    p.add_argument("--embeddings-dir", metavar="DIR", default=None,
                   help="folder of textual-inversion embeddings: a file's name (without extension) used in a prompt "
                   "or negative prompt calls it (docs/lora.md)")


def attach_adapters(args: argparse.Namespace, comps) -> None:
    """Give the model the --lora-dir / --embeddings-dir folders (daguerre.lora.apply.attach)."""
    if getattr(args, "lora_dir", None) is not None or getattr(args, "embeddings_dir", None) is not None:
        from ..lora.apply import attach

        attach(comps, args.lora_dir, args.embeddings_dir)


def set_threads(args: argparse.Namespace, comps) -> None:
    """Apply --threads. Automatic (`precision.auto_threads`): one thread on the CPU for small U-Nets
    (daguerre's own models; on a busy machine more threads measured up to 100x slower), torch's default of
    one thread per core for big models (Stable Diffusion)."""
    import torch

    from ..precision import auto_threads
    from ..quantize import weight_count

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = automatic), got {args.threads}")
    threads = args.threads or auto_threads(comps.device, weight_count(comps.unet))
    if threads:
        torch.set_num_threads(threads)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """--out, --preview, --preview-mode, --grid, --overwrite: where and how results are shown and saved;
    and the limit flags (--max-pixels, ...) every image command takes."""
    p.add_argument("--out", "-o", default="outputs", help="output PNG file (one image) or folder (default outputs/)")
    p.add_argument("--preview", metavar="DIR", default=None,
                   help="save the model's current estimate of the image at every step as DIR/step_NNN.png, "
                   "and DIR/preview.gif at the end")
    p.add_argument("--preview-mode", choices=["approx", "full"], default="approx",
                   help="approx: a fitted linear latent->RGB map, free (default); full: the VAE decoder at every "
                   "step, exact but slow")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None,
                   help="also save the images in one grid-*.png (default: on when there are several images)")
    add_overwrite_argument(p)
    add_limit_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_request_arguments(p, "txt2img")
    add_model_arguments(p)
    add_adapter_arguments(p)
    add_output_arguments(p)
    p.add_argument("--from-png", metavar="FILE", default=None,
                   help="make the image of a PNG again from its A1111 'parameters' chunk (prompt, negative prompt, "
                   "steps, sampler, schedule, CFG, seed, size, class, clip skip, guidance rescale, eta, model, "
                   "precision: --dtype auto means the file's); flags you pass override the file")
    p.add_argument("--list-samplers", action="store_true", help="print the sampler and schedule names, then exit")


def resolve_settings(args: argparse.Namespace) -> tuple[dict, str | None, str | None]:
    """(GenerationRequest fields, model spec, the file's model hash): the flags given, over the --from-png
    file (every field with a PNG key), over the request's defaults. With --from-png, `--dtype auto` becomes
    the file's precision (its `Precision` key; none: fp32), so the image is made again bit for bit."""
    from ..pipelines.infotext import settings_from_parameters

    fields = {}
    model, expected_hash = args.model, None
    if args.from_png:
        from ..pngmeta import read_png_parameters
        from ..registry import RANDOM_PREFIX, shipped_models

        settings = settings_from_parameters(read_png_parameters(args.from_png), args.from_png)
        fields.update(settings.fields)
        expected_hash = settings.model_hash
        if args.dtype == AUTO:
            args.dtype = settings.precision
        if args.quantize is None:
            args.quantize = settings.quantize
        if settings.ignored:
            _note(f"{args.from_png} also has settings daguerre does not apply: {', '.join(settings.ignored)}")
        name = settings.model
        found = name and (name.startswith(RANDOM_PREFIX) or name in shipped_models() or Path(name).exists())
        if model is None and found:
            model = settings.model
        elif model is None and settings.model:
            _note(f"{args.from_png} was made with model {settings.model!r}, which is not available here; using the "
                  "default model (choose one with --model)")
    fields.update(request_fields(args, "txt2img"))
    spatial = fields.get("semantic_map") is not None, bool(fields.get("layout") or fields.get("boxes"))
    if model is None and any(spatial):  # a map or a layout goes to a shipped model that draws from it
        from ..registry import shipped_model_for

        model = shipped_model_for(*spatial)
        if model is None:
            asked = [pair for pair, given in zip((("semantic map", "semantic"), ("layout", "layout")), spatial,
                                                 strict=True) if given]  # (what the request holds, its config)
            what = " and a ".join(name for name, _ in asked)
            configs = " or ".join(f"shapes_{config}_ldm.toml" for _, config in asked)
            raise ValueError(f"no shipped model draws from a {what}: name one with --model (a model trained with "
                             f"{configs}, docs/layout.md)")
    return fields, model, expected_hash


def _note(text: str) -> None:
    print(f"daguerre generate: note: {text}", file=sys.stderr)


@command("generate", "generate images from a text prompt", _add_arguments)
def run(args: argparse.Namespace) -> int:
    if args.list_samplers:
        from ..diffusion.sampler_names import sampler_table

        print(sampler_table())
        return 0
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img
    from ..registry import open_model

    fields, model, expected_hash = resolve_settings(args)
    yaml = checked_config(args.config, model)
    request = GenerationRequest(**fields)
    limits = check_limits_early(args, request)
    outputs = plan_outputs(args.out, request.n, args.overwrite, inputs=[args.from_png])  # before any model work
    # one request, then the process ends: each network is read when the run needs it and freed after (the
    # peak memory is about the U-Net's alone; components.py), except for a compiled U-Net, which keeps its own
    comps, model_hash = open_model(model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                   compile=args.compile, release_after_use=not args.compile, original_config=yaml,
                                   base=args.base)
    set_threads(args, comps)
    request = request.validate(comps.config, limits)  # fail before any work on bad input: the one check
    if expected_hash and model_hash and expected_hash.lower() != model_hash.lower():
        _note(f"{args.from_png} was made by a model with hash {expected_hash}; this one's is {model_hash}: "
              "the image will differ")
    if args.from_png:
        _check_lora_hashes(args, request)
    return run_and_save(args, comps, request, txt2img, model_hash, outputs)


def _check_lora_hashes(args: argparse.Namespace, request) -> None:
    """--from-png: tell when a LoRA found here is not the file the PNG's `Lora hashes` name (A1111's short hash)."""
    from ..lora.syntax import HASH_KEY, find_lora, short_hash
    from ..pngmeta import parse_parameters, read_png_parameters

    recorded = parse_parameters(read_png_parameters(args.from_png))[2].get(HASH_KEY) or ""
    wanted = dict(part.strip().split(": ", 1) for part in recorded.split(",") if ": " in part)
    for ref in request.loras or ():
        name = ref.name if ref.from_prompt else Path(ref.name).stem
        if name not in wanted:
            continue
        try:
            path = find_lora(ref, args.lora_dir)
        except FileNotFoundError:
            continue  # the run says so
        if short_hash(path) != wanted[name]:
            _note(f"LoRA {name} ({path}) has hash {short_hash(path)}, not the {wanted[name]} {args.from_png} was "
                  "made with: the image will differ")


def check_limits_early(args: argparse.Namespace, request) -> Limits:
    """The `Limits` of the limit flags; a --size or --n over them, or a --clip that names no CLIP model, fails
    here, before a model is loaded (`GenerationRequest.validate` checks everything again against the model)."""
    limits = limits_from_args(args)
    if request.clip_guidance and request.clip_model is not None:
        from ..registry import clip_path

        clip_path(request.clip_model)
    if request.width is not None and request.height is not None:
        limits.check_size(request.width, request.height, max(1, min(request.batch_size, request.n)))
    limits.check_count(request.n, request.steps or 1)
    return limits


def seed_line(request) -> str:
    """How the seeds of a validated request are told: image i uses seed + i."""
    if request.n == 1:
        return f"seed {request.seed}"
    return f"seeds {request.seed} to {request.seed + request.n - 1} (image i: seed + i)"


def run_and_save(args: argparse.Namespace, comps, request, pipeline, model_hash: str | None,
                 outputs: Outputs) -> int:
    """Run `pipeline(comps, request)` (a `ValidRequest`; `comps` opened in --dtype) with a progress bar (and
    --preview), save the PNGs to `outputs` and a grid for several images (--grid), print the paths: the tail
    every image command shares. --verbose first says how the run computes (`precision.describe_run`)."""
    from tqdm import tqdm

    from ..lora.apply import prepare
    from ..pipelines.common import progress_total

    attach_adapters(args, comps)
    prepare(comps, request)  # the request's LoRAs found and matched to the model before any work
    if args.verbose:
        from ..precision import describe_run

        print(f"daguerre {args.command}: {describe_run(comps.unet, comps.device)}", file=sys.stderr, flush=True)
    preview = None
    if args.preview:
        from ..pipelines.preview import PreviewWriter

        comps.acquire("vae_decoder")  # a preview decodes at every step (both modes: "approx" fits its map with it)
        preview = PreviewWriter(comps.vae, args.preview, args.preview_mode, tiled=request.tile,
                                overwrite=args.overwrite)
    if request.clip_guidance:  # the guiding CLIP (the model's own by default) is read before any step
        from ..pipelines.common import open_guide

        open_guide(request.clip_model, comps.device)
    print(f"daguerre {args.command}: {seed_line(request)}", file=sys.stderr, flush=True)
    with tqdm(total=progress_total(request), unit="step", desc=args.command, dynamic_ncols=True) as bar:
        def on_step(info: dict) -> None:
            if preview is not None:
                preview(info)
            bar.update(1)

        results = pipeline(comps, request, callback=on_step, model_hash=model_hash)
    if not results:
        raise UserError("nothing was generated")
    outputs.save(results, grid=args.grid is not False)
    if preview is not None:
        gif = preview.finish([r.image for r in results])
        print(f"previews: {args.preview}/step_*.png, {gif}")
    return 0
