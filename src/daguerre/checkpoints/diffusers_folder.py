"""diffusers pipeline folders: `model_index.json` + `unet/ vae/ text_encoder/ tokenizer/ scheduler/`.

Each network folder holds a `config.json` and its weights (`diffusion_pytorch_model.safetensors` for
diffusers models, `model.safetensors` for transformers models; `.bin` pickles are read with
`torch.load(weights_only=True)`; fp16 `variant` files `*.fp16.*` are used when the plain file is
missing; sharded weights through their `*.index.json`). Names are mapped to daguerre's by the
per-component tables in `unet_keys`, `vae_keys` and `text_keys`.

Text encoder layers: diffusers ships SD v2 with 23 OpenCLIP layers used to the last, SD v2 single files
hold 24 and use the penultimate. daguerre's canonical form is the single-file one: importing a gelu
(OpenCLIP-type) text encoder with skip_layers 0 appends an identity layer and sets skip_layers 1;
exporting drops the skipped layers and sets skip 0. Both directions are exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..components import Components, build_components, state_dicts
from ..config import LIMITS, ModelConfig, ScheduleConfig, check_model_config
from ..fileio import atomic_dir, atomic_save_safetensors, atomic_write_text
from ..untrusted import read_json
from ..weights.io import read_shapes, read_state_dict
from .detect import check_prediction_type, match_preset

DIFFUSERS_FORMAT_VERSION = "0.30.0"  # written as `_diffusers_version`: the layout is that of diffusers >= 0.30
MODEL_WEIGHTS = "diffusion_pytorch_model"  # diffusers models' weight file stem
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")  # transformers' stems (safetensors, legacy .bin)
FP16_VARIANT = "fp16"
PIPELINES = {None: "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
SCHEDULER_CLASS = "DDIMScheduler"
OPENCLIP_ACTIVATION = "gelu"
# ScheduleConfig.beta_schedule <-> diffusers beta_schedule
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it
DEFAULT_PREDICTION = "epsilon"  # diffusers' scheduler default when prediction_type is absent


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent.parent} a complete diffusers folder?")
    return read_json(path, "diffusers config")


def _config(path: Path, convert: Callable[[dict[str, Any]], Any]) -> Any:
    """`convert(config)` of the JSON file `path`; any error it raises on odd values names the file."""
    config = _read_json(path)
    try:
        return convert(config)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        message = str(e) if isinstance(e, ValueError) else f"unusable value ({type(e).__name__}: {e})"
        raise ValueError(f"{path}: {message}") from None


def _shard_file(folder: Path, name: Any, index: Path) -> Path:
    """The shard `name` of a weight_map: a plain file name in `folder`, not a path or a symlink out of it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{index}: the weight_map names the shard {name!r}, which is not a file name in {folder}; "
                         "refusing to read outside the model folder")
    shard = folder / name
    target = shard.resolve()
    if not (target.is_relative_to(folder.resolve()) or _in_hf_cache_blobs(folder, target)):
        raise ValueError(f"{index}: the shard {name} is a symlink to {target}, outside {folder}; refusing "
                         "to read outside the model folder (copy the file into the folder)")
    return shard


def _in_hf_cache_blobs(folder: Path, target: Path) -> bool:
    """A Hugging Face cache snapshot (`models--X/snapshots/<rev>/...`) keeps its files as symlinks into its own
    `models--X/blobs/`: a shard may lead there, and nowhere else."""
    parts = folder.resolve().parts
    if "snapshots" not in parts:
        return False
    repo = Path(*parts[:len(parts) - 1 - parts[::-1].index("snapshots")])
    return repo.name.startswith("models--") and target.parent == repo / "blobs"


def _weights_candidates(stem: str) -> list[str]:
    """Weight file names in order of preference: plain, then the fp16 variant; single files, then shard indexes."""
    out = []
    for ext in (".safetensors", ".bin"):
        out += [f"{stem}{ext}", f"{stem}{ext}.index.json"]
    for ext in (".safetensors", ".bin"):
        out += [f"{stem}.{FP16_VARIANT}{ext}", f"{stem}{ext}.index.{FP16_VARIANT}.json"]
    return out


def read_component_weights(
    folder: Path, stems: tuple[str, ...], shapes_only: bool = False, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of one component folder: plain weights first, then the fp16 variant, shards via index.

    With `shapes_only` the tensors are meta tensors (names, shapes and dtypes; safetensors headers only).
    """
    read = (lambda f: read_shapes(f)[0]) if shapes_only else (lambda f: read_state_dict(f, dtype)[0])
    for stem in stems:
        for name in _weights_candidates(stem):
            f = folder / name
            if not f.is_file():
                continue
            if name.endswith(".json"):  # a shard index: weight_map name -> shard file
                index = _read_json(f).get("weight_map")
                if not isinstance(index, dict):
                    raise ValueError(f"{f}: no weight_map")
                shards = [_shard_file(folder, shard, f) for shard in index.values()]  # all checked before reading
                sd: dict[str, torch.Tensor] = {}
                for shard in sorted(set(shards)):
                    sd.update(read(shard))
                return sd
            return read(f)
    tried = ", ".join(_weights_candidates(stems[0])[:3])
    raise FileNotFoundError(f"no weights in {folder} (looked for {tried}, ...)")


def schedule_from_diffusers(config: dict[str, Any]) -> ScheduleConfig:
    """ScheduleConfig from a diffusers scheduler_config.json (any of the DDPM-family schedulers)."""
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json has trained_betas: custom beta tables are not supported")
    theirs = config.get("beta_schedule", "linear")
    ours = {v: k for k, v in BETA_SCHEDULES.items()}.get(theirs)
    if ours is None:
        raise ValueError(
            f"unsupported beta_schedule {theirs!r} in scheduler_config.json; use {sorted(BETA_SCHEDULES.values())}"
        )
    defaults = ScheduleConfig()
    return ScheduleConfig(
        num_train_timesteps=int(config.get("num_train_timesteps", defaults.num_train_timesteps)),
        beta_schedule=ours,
        beta_start=float(config.get("beta_start", defaults.beta_start)),
        beta_end=float(config.get("beta_end", defaults.beta_end)),
        prediction_type=check_prediction_type(config.get("prediction_type") or DEFAULT_PREDICTION),
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )


def schedule_to_diffusers(cfg: ScheduleConfig) -> dict[str, Any]:
    """A DDIMScheduler scheduler_config.json for `cfg` (PNDM/Euler/DPM schedulers read the same fields)."""
    return {
        "_class_name": SCHEDULER_CLASS,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": BETA_SCHEDULES[cfg.beta_schedule],
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "trained_betas": None,
        "prediction_type": cfg.prediction_type,
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def load_diffusers(
    folder: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Components from a diffusers Stable Diffusion folder (text-to-image or inpainting)."""
    return load_diffusers_folder(folder, device=device, dtype=dtype, prediction_type=prediction_type)[0]


def load_diffusers_folder(
    folder: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    shapes_only: bool = False,
) -> tuple[Components, Counter]:
    """`load_diffusers` plus the count of stored tensor dtypes; `shapes_only` reads headers, builds on meta."""
    from ..models.tokenizer import CLIPTokenizer
    from .text_keys import text_config_from_transformers, text_state_dict_from_transformers, with_identity_layer
    from .unet_keys import unet_config_from_diffusers, unet_state_dict_from_diffusers
    from .vae_keys import vae_config_from_diffusers, vae_state_dict_from_diffusers

    folder = Path(folder)
    check_prediction_type(prediction_type)
    index = _read_json(folder / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES.values():
        raise ValueError(
            f"{folder}: a {pipeline} folder; daguerre reads {' and '.join(PIPELINES.values())} folders only"
        )
    # every config first, checked (sizes, channel and layer counts within sane bounds) before any weights are read
    unet_json = folder / "unet" / "config.json"
    unet_cfg = _config(unet_json, unet_config_from_diffusers)
    vae_cfg = _config(folder / "vae" / "config.json", vae_config_from_diffusers)
    text_entry = index.get("text_encoder")
    has_text = isinstance(text_entry, list) and bool(text_entry) and text_entry[0] is not None
    text_cfg = _config(folder / "text_encoder" / "config.json", text_config_from_transformers) if has_text else None
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule = _config(sched_path, schedule_from_diffusers) if sched_path.exists() else ScheduleConfig()
    if prediction_type is not None:
        schedule.prediction_type = prediction_type
    latent_side = _read_json(unet_json).get("sample_size")
    sample_size = latent_side * vae_cfg.downsample_factor if isinstance(latent_side, int) else 512
    if not LIMITS["sample_size"][0] <= sample_size <= LIMITS["sample_size"][1]:
        raise ValueError(f"{unet_json}: sample_size {latent_side} ({sample_size} px) is out of range "
                         f"(at most {LIMITS['sample_size'][1]} px)")
    if unet_cfg.in_channels == unet_cfg.out_channels:
        concat = None
    elif unet_cfg.in_channels == 2 * unet_cfg.out_channels + 1:
        concat = "inpaint"
    else:
        raise ValueError(f"{folder}: unsupported U-Net with {unet_cfg.in_channels} input channels")
    cfg = ModelConfig(
        name="custom", unet=unet_cfg, vae=vae_cfg, text_encoder=text_cfg, schedule=schedule,
        conditioning="text" if text_cfg is not None else "none", concat=concat, sample_size=sample_size,
    )
    try:
        check_model_config(cfg)
    except ValueError as e:
        raise ValueError(f"{folder}: {e} (from its config.json files)") from None

    stored: Counter = Counter()

    def weights(name: str, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
        sd = read_component_weights(folder / name, stems, shapes_only, dtype or torch.float32)
        stored.update(str(t.dtype).removeprefix("torch.") for t in sd.values())
        return sd

    unet_sd = unet_state_dict_from_diffusers(weights("unet", (MODEL_WEIGHTS,)), unet_cfg)
    vae_sd = vae_state_dict_from_diffusers(weights("vae", (MODEL_WEIGHTS,)), vae_cfg)
    text_sd, tokenizer = None, None
    if text_cfg is not None:
        text_sd = text_state_dict_from_transformers(weights("text_encoder", TRANSFORMERS_WEIGHTS), text_cfg)
        tokenizer = CLIPTokenizer.from_dir(folder / "tokenizer")
        text_cfg.pad_token_id = tokenizer.pad_token_id  # the tokenizer folder is the authority on padding
        if text_cfg.activation == OPENCLIP_ACTIVATION and text_cfg.skip_layers == 0:
            text_cfg, text_sd = with_identity_layer(text_cfg, text_sd)
        cfg.text_encoder = text_cfg
    cfg.name = match_preset(cfg) or "custom"
    cfg.provenance = {"imported_from": folder.name, "variant": f"diffusers {pipeline}"}
    if shapes_only:
        device = "meta"
    components = build_components(cfg, (unet_sd, vae_sd, text_sd), tokenizer=tokenizer, device=device, dtype=dtype)
    return components, stored


def save_diffusers(components: Components, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write `components` as a diffusers StableDiffusion(Inpaint)Pipeline folder, atomically (a folder swap).

    `dtype` converts the floating-point tensors (default: as they are in memory).
    """
    from .text_keys import text_config_to_transformers, text_state_dict_to_transformers
    from .unet_keys import unet_config_to_diffusers, unet_state_dict_to_diffusers
    from .vae_keys import vae_class_name, vae_config_to_diffusers, vae_state_dict_to_diffusers

    tcfg = components.config.text_encoder
    if tcfg is not None and tcfg.frozen:
        raise ValueError(f"a model with the frozen {tcfg.kind!r} text encoder has no diffusers StableDiffusionPipeline "
                         "form (its text encoder is a BERT); save it as a daguerre checkpoint (.safetensors) instead")
    if tcfg is not None and not tcfg.causal:
        raise ValueError("a model whose text encoder is bidirectional (model.text_encoder.causal = false) has no "
                         "diffusers form (transformers' CLIPTextModel is causal); save it as a daguerre checkpoint "
                         "(.safetensors) instead")
    if components.text_encoder is not None and components.text_encoder.config.token_ids is not None:
        components = with_full_vocabulary(components)  # transformers' CLIPTextModel has a row per id
    cfg = components.config
    if cfg.unet.class_embedding == "context" or cfg.unet.attention_block == "adm":
        what = "whose class label is the cross-attention context (CompVis ClassEmbedder)" \
            if cfg.unet.class_embedding == "context" else "with ADM attention blocks (a CompVis unconditional LDM)"
        raise ValueError(f"a model {what} has no diffusers UNet2DConditionModel form; save it as a daguerre "
                         "checkpoint (.safetensors)")
    if cfg.unet.layout is not None or cfg.unet.gligen is not None:  # issue 18: daguerre's own layout networks
        raise ValueError(f"a layout model (conditioning {cfg.conditioning!r}) has no diffusers form daguerre can "
                         "write; save it as a daguerre checkpoint (.safetensors)")
    if cfg.concat not in PIPELINES:
        raise ValueError(f"a model with concat={cfg.concat!r} has no diffusers pipeline daguerre can write")
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ValueError(f"{folder}: a diffusers export is a folder; use save_model for a .safetensors file")
    unet_sd, vae_sd, text_sd = state_dicts(components)  # converted to `dtype` while writing
    meta = {"_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    with atomic_dir(folder) as tmp:
        parts: dict[str, tuple[dict, dict, str]] = {
            "unet": (
                {"_class_name": "UNet2DConditionModel", **meta,
                 **unet_config_to_diffusers(cfg.unet, cfg.sample_size // cfg.vae.downsample_factor)},
                unet_state_dict_to_diffusers(unet_sd, cfg.unet), MODEL_WEIGHTS,
            ),
            "vae": (
                {"_class_name": vae_class_name(cfg.vae), **meta, **vae_config_to_diffusers(cfg.vae, cfg.sample_size)},
                vae_state_dict_to_diffusers(vae_sd, cfg.vae), MODEL_WEIGHTS,
            ),
        }
        del unet_sd, vae_sd
        if cfg.text_encoder is not None and text_sd is not None:
            parts["text_encoder"] = (
                text_config_to_transformers(cfg.text_encoder, drop_skipped_layers=True),
                text_state_dict_to_transformers(text_sd, cfg.text_encoder, drop_skipped_layers=True),
                TRANSFORMERS_WEIGHTS[0],
            )
        for name in list(parts):
            config, tensors, stem = parts.pop(name)
            (tmp / name).mkdir()
            atomic_write_text(tmp / name / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            atomic_save_safetensors(tensors, tmp / name / f"{stem}.safetensors", SAFETENSORS_METADATA, dtype=dtype)
            del tensors
        has_text = cfg.text_encoder is not None and components.tokenizer is not None
        if has_text:
            components.tokenizer.save_dir(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        atomic_write_text(
            tmp / "scheduler" / "scheduler_config.json",
            json.dumps(schedule_to_diffusers(cfg.schedule), indent=2, sort_keys=True) + "\n",
        )
        index = {
            "_class_name": PIPELINES[cfg.concat],
            **meta,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", vae_class_name(cfg.vae)],
            "text_encoder": ["transformers", "CLIPTextModel"] if has_text else [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"] if has_text else [None, None],
            "scheduler": ["diffusers", SCHEDULER_CLASS],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def with_full_vocabulary(components: Components) -> Components:
    """`components` with a pruned text encoder expanded to one embedding row per token id (same outputs)."""
    from ..models.text_encoder import expand_vocabulary

    text_encoder = expand_vocabulary(components.text_encoder)
    config = dataclasses.replace(components.config, text_encoder=text_encoder.config)
    return dataclasses.replace(components, config=config, text_encoder=text_encoder)
