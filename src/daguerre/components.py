"""`Components`: the loaded networks of one model, what pipelines run on (shared/DESIGN.md), and the one
`build_components` that makes them: fresh from a config, or strictly from state dicts (`weights.strict`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:  # imported for annotations only: keep `import daguerre` light
    import torch

    from .models.autoencoder import AutoencoderKL
    from .models.bert import BertTextEncoder
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel
    from .models.wordpiece import WordPieceTokenizer

    StateDicts = tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]


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


def build_components(
    config: ModelConfig,
    weights: StateDicts | None = None,
    *,
    seed: int = 0,
    tokenizer=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefixes: tuple[str, str, str] = ("", "", ""),
) -> Components:
    """The networks of `config`: with `weights` = (U-Net, autoencoder, text encoder) daguerre-named state dicts
    (text in transformers layout; what `state_dicts` returns), each network loaded strictly (`instantiate`:
    every key and shape checked, errors name keys with `prefixes`); without, freshly initialised from `seed`
    (training starts here; tests use it). Floating tensors become `dtype` (default float32) on `device`.

    A frozen pretrained text encoder (kind "minilm") is always loaded from its package: its weights are never
    stored, and the returned config records their sha256. `tokenizer` replaces the default CLIP tokenizer.
    """
    import dataclasses

    import torch

    from .models.autoencoder import AutoencoderKL
    from .models.text_encoder import CLIPTextEncoder
    from .models.tokenizer import CLIPTokenizer
    from .models.unet import UNetModel
    from .quantize import int8_loading_active
    from .weights.strict import instantiate

    tcfg = config.text_encoder
    frozen = tcfg is not None and tcfg.frozen  # a frozen pretrained encoder: weights from its package
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNetModel(config.unet)
            vae = AutoencoderKL(config.vae)
            text_encoder = CLIPTextEncoder(tcfg) if tcfg is not None and not frozen else None
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    else:
        unet_sd, vae_sd, text_sd = weights
        int8 = int8_loading_active()  # inside quantize.int8_loading: the U-Net and text encoder are built int8
        unet = instantiate(lambda: UNetModel(config.unet), unet_sd, "U-Net", device=device, dtype=dtype,
                           prefix=prefixes[0], quantize=int8)
        vae = instantiate(lambda: AutoencoderKL(config.vae), vae_sd, "autoencoder", device=device, dtype=dtype,
                          prefix=prefixes[1])
        text_encoder = None
        if frozen and text_sd:
            raise ValueError(f"the checkpoint holds {len(text_sd)} text-encoder tensors, but its config uses the "
                             f"frozen pretrained {tcfg.kind!r} text encoder, whose weights are never stored")
        if tcfg is None and text_sd:
            raise ValueError(f"the config has no text encoder but the checkpoint holds {len(text_sd)} text-encoder "
                             "tensors")
        if tcfg is not None and not frozen:
            if text_sd is None:
                raise ValueError("the config has a text encoder but the checkpoint holds no text-encoder weights")
            text_encoder = instantiate(lambda: CLIPTextEncoder(tcfg), text_sd, "text encoder", device=device,
                                       dtype=dtype, prefix=prefixes[2], quantize=int8)
    if frozen:
        from .models.bert import load_minilm, minilm_tokenizer

        text_encoder = load_minilm(tcfg, device=device, dtype=dtype)
        tokenizer = minilm_tokenizer(tcfg.max_length)
        config = dataclasses.replace(config, text_encoder=text_encoder.config)  # with the weights' sha256
    elif tcfg is not None:
        if tokenizer is None:
            tokenizer = CLIPTokenizer(max_length=tcfg.max_length, pad_token_id=tcfg.pad_token_id)
    else:
        tokenizer = None
    return Components(config=config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def state_dicts(components: Components, dtype: torch.dtype | None = None) -> tuple[dict, dict, dict | None]:
    """(U-Net, autoencoder, text encoder) state dicts (detached, on their device), floating ones in `dtype` if given;
    the inverse of `build_components(config, weights)`.

    Without `dtype` the tensors are the networks' own (no copy): the writers convert them one at a time.
    """

    def grab(model) -> dict | None:
        if model is None:
            return None
        out = {}
        for k, v in model.state_dict().items():
            v = v.detach()
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return out

    return grab(components.unet), grab(components.vae), grab(components.text_encoder)
