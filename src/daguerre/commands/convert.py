"""`daguerre convert SRC DST`: between daguerre / SD single files, `.ckpt` pickles and diffusers folders."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .outputs import check_folder
from .registry import UserError, command

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SINGLE_SUFFIX = ".safetensors"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a .safetensors / .ckpt / .pt file or a diffusers folder")
    p.add_argument("dst", help="a .safetensors file (daguerre checkpoint) or a folder (diffusers)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of the written weights (default: the dtype most of the source is stored in)")
    p.add_argument("--to", choices=["single", "diffusers"], default=None,
                   help="output format (default: single file if DST ends in .safetensors, else diffusers folder)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="the model's prediction type, when the source cannot say (SD v2 single files)")
    p.add_argument("--ema", action="store_true", help="use the EMA U-Net of a full training checkpoint (model_ema.*)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE:WEIGHT",
                   help="merge this LoRA (kohya / A1111, diffusers / PEFT, LyCORIS) into the written weights, with "
                   "WEIGHT (default 1); repeatable (docs/lora.md)")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="SRC's CompVis inference YAML, for a file whose head widths its weights cannot tell "
                   "(default: SRC.yaml beside it, if any)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def _read_loras(values: list[str] | None) -> list:
    """(LoraFile, weight) of each --lora FILE:WEIGHT."""
    from ..lora.formats import read_lora
    from ..lora.syntax import parse_lora_arg

    refs = [parse_lora_arg(v) for v in values or ()]
    return [(read_lora(ref.name), ref.unet_weight) for ref in refs]


def dominant_float_dtype(stored: dict[str, int]) -> str:
    """The floating dtype name most tensors are stored in ('float32' when there are none)."""
    floats = Counter({k: n for k, n in stored.items() if k in DTYPES.values()})
    return floats.most_common(1)[0][0] if floats else DTYPES["fp32"]


@command("convert", "convert a model between single-file (.safetensors/.ckpt) and diffusers formats", _add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import load_model, save_diffusers, save_model
    from ..checkpoints.summary import describe

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise FileNotFoundError(f"no such model file or folder: {src}")
    if src.resolve() == dst.resolve():
        raise UserError(f"source and destination are the same path ({src}): choose another destination")
    if (dst.exists() or dst.is_symlink()) and not args.overwrite:
        raise UserError(f"{dst} exists: remove it, choose another name, or pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"cannot write {dst}: folder {dst.parent} does not exist")
    check_folder(dst.parent)  # a read-only folder fails now, not after loading the model
    to = args.to or ("single" if dst.suffix == SINGLE_SUFFIX else "diffusers")
    if to == "single" and dst.suffix != SINGLE_SUFFIX:
        raise UserError(f"a single-file checkpoint must end in {SINGLE_SUFFIX}: {dst}")
    if to == "diffusers" and dst.suffix == SINGLE_SUFFIX:
        raise UserError(f"a diffusers export is a folder: {dst} ends in {SINGLE_SUFFIX}")
    from ..checkpoints.vae_file import is_autoencoder, load_vae, save_vae, save_vae_diffusers

    if args.config is not None:
        from ..checkpoints.detect import check_original_config

        check_original_config(src, args.config)  # before any work; describe and load_model read it
    loras = _read_loras(args.lora)  # every LoRA read and checked before the model is
    if is_autoencoder(src) and loras:
        raise UserError(f"{src} is an autoencoder alone: a LoRA adapts a U-Net and a text encoder")
    if is_autoencoder(src):  # a first stage alone: a VAE-only daguerre file or a diffusers VAE / VQModel folder
        vae, vae_config = load_vae(src)
        (save_vae if to == "single" else save_vae_diffusers)(vae, vae_config, dst)
        print(f"wrote {dst} (autoencoder alone, {vae_config.vae.regularizer}, "
              f"{'daguerre VAE file' if to == 'single' else 'diffusers folder'}, float32)")
        return 0
    if args.dtype is not None:
        dtype_name = DTYPES[args.dtype]
    else:
        dtype_name = dominant_float_dtype(describe(src, prediction_type=args.prediction_type, use_ema=args.ema,
                                                   hashes=False, original_config=args.config)["stored_dtypes"])
    dtype = getattr(torch, dtype_name)
    components = load_model(src, dtype=dtype, prediction_type=args.prediction_type, use_ema=args.ema,
                            original_config=args.config)
    if loras:
        from ..lora.apply import merge_loras
        from ..lora.syntax import short_hash

        merge_loras(components, [(lora, weight) for lora, weight in loras])  # in float32, rounded once to dtype
        merged = ", ".join(f"{lora.name} ({short_hash(lora.path)}): {weight:g}" for lora, weight in loras)
        components.config.provenance = {**components.config.provenance, "merged_loras": merged}
        print(f"merged LoRA(s) {merged}")
    if to == "single":
        save_model(components, dst)
    else:
        save_diffusers(components, dst)
    cfg = components.config
    print(f"wrote {dst} ({'daguerre single file' if to == 'single' else 'diffusers folder'}, {dtype_name}, "
          f"model {cfg.name}, {cfg.schedule.prediction_type})")
    return 0
