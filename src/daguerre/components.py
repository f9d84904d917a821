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
