"""`Components`: the loaded networks of one model, what pipelines run on (shared/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:  # imported for annotations only: keep `import daguerre` light
    from .models.autoencoder import AutoencoderKL
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel


@dataclass
class Components:
    """A latent diffusion model in memory: its config, the three networks and the tokenizer.

    `text_encoder` and `tokenizer` are None for class-conditional and unconditional models.
    """

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder | None = None
    tokenizer: CLIPTokenizer | None = None


def build_components(config: ModelConfig, *, seed: int = 0) -> Components:
    """Fresh networks for `config`, randomly initialised from `seed` (training starts here; tests use it)."""
    import torch

    from .models.autoencoder import AutoencoderKL
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(config.unet)
        vae = AutoencoderKL(config.vae)
        text_encoder = tokenizer = None
        if config.text_encoder is not None:
            text_encoder = CLIPTextEncoder(config.text_encoder)
            te = config.text_encoder
            tokenizer = CLIPTokenizer(max_length=te.max_length, pad_token_id=te.pad_token_id)
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.eval()
    return Components(config=config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
