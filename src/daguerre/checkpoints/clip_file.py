"""The daguerre CLIP file: a CLIP model's tensors (transformers' `CLIPModel` key names) in safetensors, with
its `CLIPConfig` JSON in the metadata (`daguerre_clip_config`, `format` = "daguerre-clip").

`save_clip` writes it atomically (`daguerre.fileio`); `load_clip` reads it back strictly (every tensor the
config's network has, of its shape, and nothing else), as every other loader does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..config import CLIPConfig
from ..fileio import atomic_save_safetensors
from ..models.clip import CLIPModel
from ..weights.io import read_state_dict
from ..weights.strict import instantiate

CLIP_FORMAT = "daguerre-clip"  # safetensors metadata "format" of a CLIP file
CLIP_CONFIG_KEY = "daguerre_clip_config"  # safetensors metadata key holding the CLIPConfig JSON


def save_clip(model: CLIPModel, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `model` (its state dict, floating-point tensors cast to `dtype` if given) and its config, atomically."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {CLIP_CONFIG_KEY: model.clip_config.to_json(), "format": CLIP_FORMAT, "daguerre_version": __version__}
    atomic_save_safetensors(tensors, path, meta, dtype=dtype)


def load_clip(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CLIPModel:
    """The CLIP model of a daguerre CLIP file, in eval mode and without gradients; a file that is not one, or
    whose tensors do not fit its config, is a ValueError that names it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such CLIP file: {path}")
    sd, meta = read_state_dict(path)
    if CLIP_CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no {CLIP_CONFIG_KEY} metadata: not a daguerre CLIP file")
    try:
        config = CLIPConfig.from_json(meta[CLIP_CONFIG_KEY])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: the {CLIP_CONFIG_KEY} metadata is not a valid CLIPConfig: {e}") from None
    model = instantiate(lambda: CLIPModel(config), sd, f"{path}: the CLIP model", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
