"""Checkpoint I/O: daguerre and Stable Diffusion single files, `.ckpt` pickles (weights only), diffusers folders.

    load_model(path)            -> Components   any supported format, variant detected, strict load
    save_model(components, f)   daguerre checkpoint (SD single-file layout + ModelConfig JSON metadata)
    save_diffusers(components, folder)   a diffusers StableDiffusionPipeline folder
    save_vae / load_vae         the VAE-only file of `daguerre train vae` (vae_file.py)
    read_state_dict(path)       -> (tensors, metadata) of one weight file (from `daguerre.weights.io`)
    save_adapter(components, f, base, name)   an adapter file: what a model adds to its base file (adapter.py)
    file_hash / short_hash      sha256 and the AUTOMATIC1111 10-digit "Model hash" (idem)

The formats, the detection rules and the keys deliberately ignored are documented in docs/formats.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..components import Components
from ..weights.io import file_hash, read_state_dict, safe_torch_load, short_hash
from .adapter import find_base, is_adapter, save_adapter, with_base
from .detect import IGNORED_KEYS, Detection, check_original_config, detect_checkpoint
from .diffusers_folder import is_diffusers_folder, load_diffusers, save_diffusers
from .single_file import load_single, save_model
from .vae_file import load_vae, save_vae

__all__ = [
    "IGNORED_KEYS",
    "Detection",
    "detect_checkpoint",
    "file_hash",
    "load_model",
    "load_vae",
    "read_state_dict",
    "safe_torch_load",
    "save_adapter",
    "save_diffusers",
    "save_model",
    "save_vae",
    "short_hash",
]


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    original_config: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    rebase: bool = False,
) -> Components:
    """Load a model from a daguerre / SD single file (.safetensors, .ckpt, .pt, .pth) or a diffusers folder.

    The variant is detected from keys and shapes (docs/formats.md); every tensor must be used or be in
    `IGNORED_KEYS`, otherwise a ValueError names the offending keys and nothing is loaded. Weights are
    converted to `dtype` (default float32) on `device` (default cpu). `prediction_type` ("epsilon",
    "v_prediction", "sample") overrides what the file says or what is inferred; `use_ema` loads the
    U-Net from the file's `model_ema.*` copy (full CompVis training checkpoints). `original_config` is the
    file's CompVis inference YAML (`--config FILE`), read for this load only, as if it were beside the file.
    An adapter file (`adapter.py`) is read over its base model's file: `base` (a file or a shipped model's name),
    else the shipped model it names; a base that is not the file it was trained on (sha256) is a ValueError,
    unless `rebase` (training that continues an adapter on another base: `train.init_base`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or folder: {path}")
    yaml = check_original_config(path, original_config) if original_config is not None else None
    if path.is_dir():
        if base is not None:
            raise ValueError(f"a base model goes with an adapter file; {path} is a folder, it needs none")
        if not is_diffusers_folder(path):
            raise ValueError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        if use_ema:
            raise ValueError("use_ema applies to single-file training checkpoints; diffusers folders hold one U-Net")
        return load_diffusers(path, device=device, dtype=dtype, prediction_type=prediction_type)
    sd, metadata = read_state_dict(path, dtype or torch.float32)
    if is_adapter(metadata):
        base_path = find_base(path, metadata, base, rebase=rebase)
        sd, metadata = with_base(sd, metadata, read_state_dict(base_path, dtype or torch.float32)[0], path, base_path)
    elif base is not None:
        raise ValueError(f"a base model goes with an adapter file; {path} is a whole model, it needs none")
    return load_single(
        sd, metadata, path=path, device=device, dtype=dtype, prediction_type=prediction_type, use_ema=use_ema,
        original_config=yaml,
    )[0]

