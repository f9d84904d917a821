"""`describe(path)`: what a checkpoint is, without loading its weights (what `daguerre info` prints).

Safetensors files are read from their header only; the networks are built on the `meta` device and the
file's names and shapes are checked against them exactly as `load_model` does, so a file `describe`
accepts is one `load_model` loads (pickles must be read whole to learn their shapes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..components import Components
from ..weights.io import file_hash, read_shapes, short_hash, sniff
from .adapter import base_record, find_base, is_adapter, with_base
from .detect import check_original_config, match_preset
from .diffusers_folder import is_diffusers_folder, load_diffusers_folder
from .single_file import load_single

META = "meta"


def _count(model: nn.Module | None) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters())


def _frozen_description(t) -> str | None:
    """What a frozen pretrained text encoder is and where its weights come from (None for CLIP)."""
    if not t.frozen:
        return None
    from ..models.bert import describe_minilm

    return describe_minilm(t)


def _architecture(c: Components) -> dict[str, Any]:
    cfg = c.config
    u, v, t = cfg.unet, cfg.vae, cfg.text_encoder
    widths = [u.model_channels * m for m in u.channel_mult]
    heads = [f"{h}x{d}" for h, d in (u.heads_at(w) for w in widths)]
    return {
        "unet": {
            "in_channels": u.in_channels, "out_channels": u.out_channels, "levels": len(widths),
            "channels": widths, "res_blocks": u.num_res_blocks, "attention_levels": list(u.attention_levels),
            "heads": heads, "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
            "linear_proj": u.use_linear_proj, "upcast_attention": u.upcast_attention,
        },
        "vae": {
            "downsample_factor": v.downsample_factor, "latent_channels": v.latent_channels,
            "channels": [v.base_channels * m for m in v.channel_mult], "scale_factor": v.scale_factor,
            "shift_factor": v.shift_factor, "regularizer": v.regularizer,
            "codebook_size": v.codebook_size if v.regularizer == "vq" else None,
            "codebook_dim": v.latent_channels if v.regularizer == "vq" else None,
        },
        "text_encoder": None if t is None else {
            "kind": t.kind, "causal": t.causal, "width": t.width, "layers": t.layers, "heads": t.heads,
            "skip_layers": t.skip_layers,
            "activation": t.activation, "projection_dim": t.projection_dim, "pad_token_id": t.pad_token_id,
            "max_length": t.max_length, "weights_sha256": t.weights_sha256,
            "frozen_pretrained": _frozen_description(t),
        },
    }


def _either(own, base_value_of, base_shapes):
    """value_of(key) of an adapter over its base: the base file's tensor for its keys, the adapter's otherwise."""
    return lambda key: base_value_of(key) if key in base_shapes else own(key)


def describe(
    path: str | os.PathLike, *, prediction_type: str | None = None, use_ema: bool = False, hashes: bool = True,
    original_config: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of a model file or diffusers folder; ValueError for anything load_model refuses.
    `original_config`: the file's CompVis YAML (`--config FILE`), `base`: an adapter file's base model, as
    `load_model` takes them. An adapter file is described as the whole model it makes with its base (`base`:
    the base's name, file and sha256)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or folder: {path}")
    yaml = check_original_config(path, original_config) if original_config is not None else None
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir() and base is not None:
        raise ValueError(f"a base model goes with an adapter file; {path} is a folder, it needs none")
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ValueError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        comps, stored = load_diffusers_folder(path, prediction_type=prediction_type, shapes_only=True)
        info.update(format="diffusers folder", variant=comps.config.provenance.get("variant"),
                    prediction_type_from="argument" if prediction_type else "scheduler_config.json",
                    has_ema=False, ignored_keys=0, stored_dtypes=dict(stored))
        files = [f for f in path.rglob("*") if f.is_file()]
        info["file_size"] = sum(f.stat().st_size for f in files)
        info["sha256"] = info["short_hash"] = None  # a folder has no single-file hash
    else:
        kind = sniff(path)
        shapes, metadata, value_of = read_shapes(path)
        if is_adapter(metadata):
            name, sha = base_record(path, metadata)
            base_path = find_base(path, metadata, base)
            base_shapes, _, base_value_of = read_shapes(base_path)
            shapes, metadata = with_base(shapes, metadata, base_shapes, path, base_path)
            value_of = _either(value_of, base_value_of, base_shapes)
            info["base"] = {"name": name, "file": str(base_path), "sha256": sha}
        elif base is not None:
            raise ValueError(f"a base model goes with an adapter file; {path} is a whole model, it needs none")
        comps, det = load_single(
            shapes, metadata, path=path, device=META, prediction_type=prediction_type, use_ema=use_ema,
            value_of=value_of, original_config=yaml,
        )
        fmt = "daguerre adapter" if "base" in info else "daguerre checkpoint" if det.is_daguerre else "SD single file"
        fmt += " (safetensors)" if kind == "safetensors" else " (PyTorch pickle, read with weights_only=True)"
        info.update(format=fmt, variant=det.variant, prediction_type_from=det.prediction_source,
                    has_ema=det.has_ema, ignored_keys=len(det.ignored), stored_dtypes=det.stored_dtypes)
        info["file_size"] = path.stat().st_size
        info["sha256"] = file_hash(path) if hashes else None
        info["short_hash"] = short_hash(path) if hashes else None
    cfg = comps.config
    info["name"] = cfg.name
    info["preset"] = match_preset(cfg)
    info["prediction_type"] = cfg.schedule.prediction_type
    info["concat"] = cfg.concat
    info["sample_size"] = cfg.sample_size
    info.update(_architecture(comps))
    params = {"unet": _count(comps.unet), "vae": _count(comps.vae), "text_encoder": _count(comps.text_encoder)}
    params["total"] = sum(params.values())
    info["parameters"] = params
    info["config"] = cfg.to_dict()
    return info

