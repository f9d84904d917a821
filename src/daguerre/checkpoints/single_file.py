"""Stable Diffusion single-file checkpoints (and daguerre checkpoints, which are the same layout).

One state dict holds the whole model under three prefixes: `model.diffusion_model.` (U-Net),
`first_stage_model.` (autoencoder) and `cond_stage_model.transformer.` (OpenAI CLIP, SD v1) or
`cond_stage_model.model.` (OpenCLIP, SD v2). A daguerre checkpoint adds its `ModelConfig` as JSON in
the safetensors metadata (`daguerre_config`) so nothing has to be guessed when it is read back.
Loading is all-or-nothing: every tensor is either loaded, listed in `detect.IGNORED_KEYS`, or an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .. import __version__
from ..components import Components, build_components, state_dicts
from ..fileio import atomic_save_safetensors
from ..weights.strict import few
from . import detect as d

DAGUERRE_FORMAT = "daguerre"  # safetensors metadata "format" of daguerre checkpoints
CONFIG_KEY = "daguerre_config"  # safetensors metadata key holding the ModelConfig JSON
OPENCLIP_ACTIVATION = "gelu"  # text encoders with this activation are written in the OpenCLIP (SD v2) layout


def _unet_weights(sd: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor], use_ema: bool) -> dict:
    """The U-Net state dict: the `model.diffusion_model.*` tensors, or their `model_ema.*` copies."""
    unet = d.strip(kept, d.UNET_PREFIX)
    if not use_ema:
        return unet
    ema_names = {k for k in sd if k.startswith(d.EMA_PREFIX) and not d.is_ignored_bookkeeping(k)}
    wanted = {k: d.ema_key(k) for k in unet}
    missing = [k for k, e in wanted.items() if e not in sd]
    unused = ema_names - set(wanted.values())
    if missing or unused:
        raise ValueError(
            f"the EMA weights do not match the U-Net: {len(missing)} U-Net tensors without an EMA copy "
            f"({few(missing)}), {len(unused)} EMA tensors without a U-Net parameter ({few(unused)})"
        )
    return {k: sd[e] for k, e in wanted.items()}


def load_single(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    path: Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    value_of: Callable[[str], torch.Tensor] | None = None,
    original_config: Path | None = None,
) -> tuple[Components, d.Detection]:
    """Components from a single-file state dict (SD v1/v2, inpainting, daguerre): detect, split, load strictly;
    returns them with the Detection. With meta tensors and device="meta" it only validates. `original_config`:
    the checkpoint's CompVis YAML for this load (`detect.check_original_config`)."""
    from .text_keys import text_state_dict_from_openclip, text_state_dict_from_transformers

    det = d.detect_checkpoint(
        sd, metadata, path=path, prediction_type=prediction_type, use_ema=use_ema, value_of=value_of,
        original_config=original_config,
    )
    cfg = det.config
    kept = {k: v for k, v in sd.items() if not d.is_ignored(k)}
    prefixes = (d.UNET_PREFIX, d.VAE_PREFIX, d.TEXT_PREFIX_CLIP, d.TEXT_PREFIX_OPENCLIP)
    class_key = d.CLASS_EMBEDDER_KEY if not det.is_daguerre and cfg.unet.class_embedding == "context" else None
    stray = [k for k in kept if not k.startswith(prefixes) and k != class_key]
    if stray:
        raise ValueError(
            f"{len(stray)} unexpected keys outside the U-Net, autoencoder and text encoder: {few(stray)}; "
            "this is not a Stable Diffusion v1/v2 checkpoint daguerre knows"
        )
    unet_sd = _unet_weights(sd, kept, use_ema)
    if class_key is not None:  # a CompVis ClassEmbedder: the U-Net's label embedding, read as its context
        unet_sd["label_emb.weight"] = kept[class_key]
    vae_sd = d.strip(kept, d.VAE_PREFIX)
    frozen = cfg.text_encoder is not None and cfg.text_encoder.frozen  # weights from its own package
    if frozen and det.text_layout is not None:
        raise ValueError(f"the checkpoint holds text-encoder weights (cond_stage_model.*) but its config uses the "
                         f"frozen pretrained {cfg.text_encoder.kind!r} encoder, whose weights are never stored")
    text_sd, text_prefix = None, ""
    if det.text_layout == "transformers":
        text_prefix = d.TEXT_PREFIX_CLIP
        if cfg.text_encoder is not None:
            text_sd = text_state_dict_from_transformers(d.strip(kept, text_prefix), cfg.text_encoder)
    elif det.text_layout == "openclip":
        text_prefix = d.TEXT_PREFIX_OPENCLIP
        if cfg.text_encoder is not None:
            text_sd = text_state_dict_from_openclip(d.strip(kept, text_prefix), cfg.text_encoder)
    if cfg.text_encoder is not None and text_sd is None and not frozen:
        raise ValueError("the checkpoint has no text encoder (cond_stage_model.*) although its config needs one")
    if cfg.text_encoder is None and det.text_layout is not None:
        raise ValueError("the checkpoint holds text-encoder weights but its config has no text encoder")
    if not det.is_daguerre:
        cfg.provenance = {
            "imported_from": path.name if path is not None else "state dict",
            "variant": det.variant,
            "prediction_type_from": det.prediction_source,
            "ema": "model_ema" if use_ema else ("model (file also has EMA)" if det.has_ema else "model"),
        }
    components = build_components(
        cfg, (unet_sd, vae_sd, text_sd), device=device, dtype=dtype,
        prefixes=(d.UNET_PREFIX, d.VAE_PREFIX, text_prefix),
    )
    return components, det


def single_file_state_dict(components: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model in the SD single-file layout (OpenCLIP text layout for gelu text encoders); the weights
    of a frozen pretrained text encoder (MiniLM) are left out: the config names them by sha256."""
    from .text_keys import text_state_dict_to_openclip

    unet, vae, text = state_dicts(components, dtype)
    out = {d.UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({d.VAE_PREFIX + k: v for k, v in vae.items()})
    tcfg = components.config.text_encoder
    if text is not None and tcfg is not None and not tcfg.frozen:  # a frozen pretrained encoder is not stored
        if tcfg.activation == OPENCLIP_ACTIVATION:
            out.update({d.TEXT_PREFIX_OPENCLIP + k: v for k, v in text_state_dict_to_openclip(text, tcfg).items()})
        else:
            out.update({d.TEXT_PREFIX_CLIP + k: v for k, v in text.items()})
    return out


def save_model(components: Components, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write a daguerre checkpoint: SD single-file keys + the ModelConfig JSON in the metadata, atomically.

    `dtype` (e.g. torch.float16) converts the floating-point tensors; by default they are stored as they are.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a daguerre checkpoint is a .safetensors file: {path} has another extension")
    tensors = single_file_state_dict(components)  # the model's own tensors: converted while writing
    metadata = {
        CONFIG_KEY: components.config.to_json(),
        "format": DAGUERRE_FORMAT,
        "daguerre_version": __version__,
    }
    atomic_save_safetensors(tensors, path, metadata, dtype=dtype)
