"""`Components`: the loaded networks of one model, what pipelines run on (shared/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:  # imported for annotations only: keep `import daguerre` light
    from .models.autoencoder import AutoencoderKL
    from .models.bert import BertTextEncoder
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel
    from .models.wordpiece import WordPieceTokenizer


@dataclass
class Components:
    """A latent diffusion model in memory: its config, the three networks and the tokenizer.

    `text_encoder` and `tokenizer` are None for class-conditional and unconditional models; a model whose
    `config.text_encoder.kind` is "minilm" holds the frozen BERT all-MiniLM-L6-v2 and its WordPiece tokenizer.
    """

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder | BertTextEncoder | None = None
    tokenizer: CLIPTokenizer | WordPieceTokenizer | None = None


def build_components(config: ModelConfig, *, seed: int = 0) -> Components:
    """Fresh networks for `config`, randomly initialised from `seed` (training starts here; tests use it).

    A frozen pretrained text encoder (kind "minilm") is loaded from its package instead of initialised.
    """
    import dataclasses

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
        if config.text_encoder is not None and config.text_encoder.kind != "clip":
            from .models.bert import load_minilm, minilm_tokenizer

            text_encoder = load_minilm(config.text_encoder)
            tokenizer = minilm_tokenizer(config.text_encoder.max_length)
            config = dataclasses.replace(config, text_encoder=text_encoder.config)  # with the weights' sha256
        elif config.text_encoder is not None:
            text_encoder = CLIPTextEncoder(config.text_encoder)
            te = config.text_encoder
            tokenizer = CLIPTokenizer(max_length=te.max_length, pad_token_id=te.pad_token_id)
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.eval()
    return Components(config=config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
