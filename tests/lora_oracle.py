"""Small Stable Diffusion 1.5- and 2.1-architecture models built twice, as diffusers / transformers reference
networks and as daguerre `Components` with the same weights, for the LoRA and embedding tests.

The configs are the published ones (tests/sd_configs.py) with narrower channels and fewer text layers, so every
module keeps its real name (and SD 2.1 its linear `proj_in`, its per-level head counts); the text encoder keeps
its real width (768 / 1024), which embeddings are made for.
"""

from __future__ import annotations

import dataclasses

import torch

from daguerre.checkpoints.text_keys import text_config_from_transformers, text_state_dict_from_transformers
from daguerre.checkpoints.unet_keys import unet_config_from_diffusers, unet_state_dict_from_diffusers
from daguerre.components import build_components
from daguerre.config import preset
from sd_configs import real_config

CHANNELS = [32, 64, 64, 64]
HEADS = {"sd15": 8, "sd21": [2, 4, 4, 4]}
TEXT_LAYERS = 2


def small_configs(model: str) -> tuple[dict, dict]:
    """(U-Net config, text-encoder config) of `model` ("sd15" / "sd21"), shrunk (module docstring)."""
    unet = real_config(model, "unet")
    unet.update(block_out_channels=CHANNELS, attention_head_dim=HEADS[model], sample_size=8)
    text = real_config(model, "text_encoder")
    text.update(num_hidden_layers=TEXT_LAYERS, intermediate_size=256)
    return unet, text


def reference_models(model: str, seed: int = 0):
    """(diffusers UNet2DConditionModel, transformers CLIPTextModel) with random weights (no zero layers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg = small_configs(model)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items() if not k.startswith("_")}))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in [*unet.parameters(), *text.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return unet.eval(), text.eval()


def daguerre_components(model: str, unet, text):
    """daguerre `Components` holding the weights of the reference `unet` and `text` (a random tiny VAE)."""
    unet_cfg, text_cfg = small_configs(model)
    ucfg = unet_config_from_diffusers(unet_cfg)
    tcfg = text_config_from_transformers(text_cfg)
    base = preset("tiny")
    cfg = dataclasses.replace(preset(model), unet=ucfg, text_encoder=tcfg, vae=base.vae, name=f"small-{model}")
    comps = build_components(cfg)
    comps.unet.load_state_dict(unet_state_dict_from_diffusers(dict(unet.state_dict()), ucfg))
    comps.text_encoder.load_state_dict(text_state_dict_from_transformers(dict(text.state_dict()), tcfg))
    return comps
