"""The VAE-only file of `daguerre train vae` (RUN/vae.safetensors), which `daguerre train ldm --vae` reads.

A daguerre checkpoint that holds only the autoencoder: its `first_stage_model.*` tensors (float32, the
names of the SD single-file layout) and the ModelConfig JSON in the safetensors metadata
(`daguerre_config`, with `format` = "daguerre-vae"). `load_vae` also takes the autoencoder out of any
daguerre or SD single-file checkpoint (the config then comes from that file, or from the tensors'
shapes), and loads it strictly (`weights.strict.instantiate`), as every other loader does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..config import ModelConfig
from ..fileio import atomic_save_safetensors
from ..models.autoencoder import AutoencoderKL
from ..weights.io import read_state_dict
from ..weights.strict import instantiate
from .detect import VAE_PREFIX, infer_vae_config, is_ignored
from .single_file import CONFIG_KEY

VAE_FORMAT = "daguerre-vae"  # safetensors metadata "format" of a VAE-only file


def save_vae(vae: AutoencoderKL, config: ModelConfig, path: Path) -> None:
    """Write a VAE-only daguerre checkpoint (module docstring), float32, atomically."""
    tensors = {VAE_PREFIX + k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
    meta = {CONFIG_KEY: config.to_json(), "format": VAE_FORMAT, "daguerre_version": __version__}
    atomic_save_safetensors(tensors, path, meta)


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[AutoencoderKL, ModelConfig]:
    """The autoencoder of a VAE-only file or of any daguerre / SD single-file checkpoint, float32, in eval mode
    and without gradients; a missing, unexpected or misshapen tensor is a ValueError that names it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such VAE checkpoint: {path} (train one with `daguerre train vae`)")
    sd, meta = read_state_dict(path)
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX) and not is_ignored(k)}
    if not vae_sd:
        raise ValueError(f"{path} holds no autoencoder weights ({VAE_PREFIX}*): not a VAE checkpoint")
    if CONFIG_KEY in meta:
        try:
            config = ModelConfig.from_json(meta[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: the {CONFIG_KEY} metadata is not a valid ModelConfig: {e}") from None
    else:
        config = ModelConfig(name="imported-vae", vae=infer_vae_config(vae_sd))
    vae = instantiate(lambda: AutoencoderKL(config.vae), vae_sd, f"{path}: the autoencoder", device=device,
                      dtype=torch.float32, prefix=VAE_PREFIX)
    return vae.requires_grad_(False), config
