"""The VAE-only file of `daguerre train vae` (RUN/vae.safetensors), which `daguerre train ldm --vae` reads,
and the other forms of a first stage alone.

A daguerre checkpoint that holds only the autoencoder: its `first_stage_model.*` tensors (float32, the
names of the SD single-file layout) and the ModelConfig JSON in the safetensors metadata
(`daguerre_config`, with `format` = "daguerre-vae"). `load_vae` also takes the autoencoder out of any
daguerre or SD single-file checkpoint (the config then comes from that file, or from the tensors'
shapes), out of a CompVis / taming first-stage checkpoint (`model.ckpt` of `models/first_stage_models/`:
the autoencoder's keys without prefix, its training loss `loss.*` left out; KL or VQ from the keys), and
out of a diffusers `AutoencoderKL` or `VQModel` folder (config.json + diffusion_pytorch_model.safetensors);
it loads strictly (`weights.strict.instantiate`), as every other loader does. `save_vae_diffusers` writes
such a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import ModelConfig
from ..fileio import atomic_dir, atomic_save_safetensors, atomic_write_text
from ..models.autoencoder import AutoencoderKL
from ..untrusted import read_json
from ..weights.io import read_shapes, read_state_dict
from ..weights.strict import instantiate
from .detect import UNET_PREFIX, VAE_PREFIX, infer_vae_config, is_ignored
from .diffusers_folder import (
    DIFFUSERS_FORMAT_VERSION,
    MODEL_WEIGHTS,
    SAFETENSORS_METADATA,
    _config,
    read_component_weights,
)
from .single_file import CONFIG_KEY
from .vae_keys import (
    vae_class_name,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)

VAE_FORMAT = "daguerre-vae"  # safetensors metadata "format" of a VAE-only file
BARE_MARKER = "encoder.conv_in.weight"  # a first-stage checkpoint without prefix (CompVis `model.ckpt`)
BARE_IGNORED = "loss."  # its training loss (LPIPS, discriminator): not part of the model
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_CLASSES = ("AutoencoderKL", "VQModel")


def save_vae(vae: AutoencoderKL, config: ModelConfig, path: Path) -> None:
    """Write a VAE-only daguerre checkpoint (module docstring), float32, atomically."""
    tensors = {VAE_PREFIX + k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
    meta = {CONFIG_KEY: config.to_json(), "format": VAE_FORMAT, "daguerre_version": __version__}
    atomic_save_safetensors(tensors, path, meta)


def is_diffusers_autoencoder(path: Path) -> bool:
    """A diffusers model folder of an `AutoencoderKL` or `VQModel` alone (config.json, no model_index.json)."""
    config = path / DIFFUSERS_CONFIG
    if not (path.is_dir() and config.is_file()) or (path / "model_index.json").exists():
        return False
    return read_json(config, "diffusers config").get("_class_name") in DIFFUSERS_CLASSES


def is_autoencoder(path: str | Path) -> bool:
    """Whether `path` holds a first stage alone: a VAE-only daguerre file, a CompVis first-stage checkpoint, or a
    diffusers AutoencoderKL / VQModel folder (`daguerre info` and `convert` then treat it as an autoencoder)."""
    path = Path(path)
    if path.is_dir():
        return is_diffusers_autoencoder(path)
    if not path.is_file():
        return False
    try:
        shapes, meta, _ = read_shapes(path)
    except ValueError:
        return False
    if meta.get("format") == VAE_FORMAT:
        return True
    return BARE_MARKER in shapes and not any(k.startswith(UNET_PREFIX) for k in shapes)


def _from_diffusers(folder: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    vae_cfg = _config(folder / DIFFUSERS_CONFIG, vae_config_from_diffusers)
    sd = vae_state_dict_from_diffusers(read_component_weights(folder, (MODEL_WEIGHTS,), dtype=torch.float32), vae_cfg)
    kind = read_json(folder / DIFFUSERS_CONFIG, "diffusers config").get("_class_name")
    config = ModelConfig(name="imported-vae", vae=vae_cfg, provenance={"imported_from": folder.name,
                                                                         "variant": f"diffusers {kind}"})
    return sd, config


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[AutoencoderKL, ModelConfig]:
    """The autoencoder of a VAE-only file, of any daguerre / SD single-file checkpoint, of a CompVis first-stage
    checkpoint or of a diffusers AutoencoderKL / VQModel folder, float32, in eval mode and without gradients; a
    missing, unexpected or misshapen tensor is a ValueError that names it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such VAE checkpoint: {path} (train one with `daguerre train vae`)")
    if path.is_dir():
        if not is_diffusers_autoencoder(path):
            raise ValueError(f"{path} is a folder but not a diffusers AutoencoderKL or VQModel folder (a "
                             f"{DIFFUSERS_CONFIG} with one of those _class_name values, and no model_index.json)")
        vae_sd, config = _from_diffusers(path)
        prefix = ""
    else:
        sd, meta = read_state_dict(path)
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in sd) else ""
        if prefix:
            vae_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not is_ignored(k)}
        elif BARE_MARKER in sd and not any(k.startswith(UNET_PREFIX) for k in sd):
            vae_sd = {k: v for k, v in sd.items() if not k.startswith(BARE_IGNORED)}
        else:
            raise ValueError(f"{path} holds no autoencoder weights ({VAE_PREFIX}*, or a first stage's "
                             f"{BARE_MARKER}): not a VAE checkpoint")
        if CONFIG_KEY in meta:
            try:
                config = ModelConfig.from_json(meta[CONFIG_KEY])
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: the {CONFIG_KEY} metadata is not a valid ModelConfig: {e}") from None
        else:
            config = ModelConfig(name="imported-vae", vae=infer_vae_config(vae_sd))
    vae = instantiate(lambda: AutoencoderKL(config.vae), vae_sd, f"{path}: the autoencoder", device=device,
                      dtype=torch.float32, prefix=prefix)
    return vae.requires_grad_(False), config


def save_vae_diffusers(vae: AutoencoderKL, config: ModelConfig, folder: str | Path) -> None:
    """Write the autoencoder as a diffusers model folder (`AutoencoderKL` or `VQModel`: config.json +
    diffusion_pytorch_model.safetensors, float32), atomically (a folder swap)."""
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ValueError(f"{folder}: a diffusers export is a folder; save_vae writes a .safetensors file")
    cfg = config.vae
    conf = {"_class_name": vae_class_name(cfg), "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            **vae_config_to_diffusers(cfg, config.sample_size)}
    tensors = vae_state_dict_to_diffusers({k: v.detach().float().cpu() for k, v in vae.state_dict().items()}, cfg)
    with atomic_dir(folder) as tmp:
        atomic_write_text(tmp / DIFFUSERS_CONFIG, json.dumps(conf, indent=2, sort_keys=True) + "\n")
        atomic_save_safetensors(tensors, tmp / f"{MODEL_WEIGHTS}.safetensors", SAFETENSORS_METADATA)


def describe_vae(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a first stage alone (what `daguerre info` prints for one): its regulariser
    (kl / vq, the codebook's size and dimension), shape, latent scale and parameters. Loads the weights."""
    vae, config = load_vae(path)
    v = config.vae
    return {
        "path": str(path), "name": config.name, "regularizer": v.regularizer,
        "codebook_size": v.codebook_size if v.regularizer == "vq" else None,
        "codebook_dim": v.latent_channels if v.regularizer == "vq" else None,
        "downsample_factor": v.downsample_factor, "latent_channels": v.latent_channels,
        "channels": [v.base_channels * m for m in v.channel_mult], "attn_levels": list(v.attn_levels),
        "in_channels": v.in_channels, "scale_factor": v.scale_factor, "shift_factor": v.shift_factor,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "variant": config.provenance.get("variant"), "holdout_metrics": config.provenance.get("holdout_metrics"),
    }


def regularizer_text(v: dict[str, Any]) -> str:
    """"kl (diagonal Gaussian)" or "vq, codebook 8192 x 3" from a summary's VAE fields."""
    if v.get("regularizer", "kl") == "vq":
        return f"vq, codebook {v['codebook_size']} x {v['codebook_dim']}"
    return "kl (diagonal Gaussian)"


def format_vae_info(info: dict[str, Any], human_count) -> str:
    """The human-readable form of `describe_vae`'s result."""
    lines = [
        f"model:           {info['path']}",
        f"format:          autoencoder alone ({info['variant'] or info['name']})",
        f"regulariser:     {regularizer_text(info)}",
        f"VAE:             factor {info['downsample_factor']}, {info['latent_channels']} latent channels, channels "
        f"{info['channels']}, attention at levels {info['attn_levels']}, {info['in_channels']} image channels, "
        f"scale factor {info['scale_factor']}" + (f", shift {info['shift_factor']}" if info["shift_factor"] else ""),
        f"parameters:      {human_count(info['parameters'])} ({info['parameters']:,})",
    ]
    if info.get("holdout_metrics"):
        lines.append("held-out:        " + ", ".join(f"{k} {v:.4g}" for k, v in info["holdout_metrics"].items()))
    return "\n".join(lines)
