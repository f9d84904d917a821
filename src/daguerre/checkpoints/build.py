"""Networks from configs and state dicts: strict key and shape checks, dtype conversion, no partial loads.

Every importer (daguerre / SD single files, diffusers folders) ends here with daguerre-named state
dicts. Each network is first built on the `meta` device (no memory, no random init), its expected keys
and shapes are compared with what the file provides, and only when everything matches are the file's
tensors, converted to the requested dtype and device, assigned as the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..components import Components
from ..config import ModelConfig, TextEncoderConfig

MAX_LISTED_KEYS = 4  # keys named in an error message before "... and N more"
IDENTITY_LN_WEIGHT = 1.0  # an appended identity text-encoder layer: unit layer norms ...
IDENTITY_FILL = 0.0  # ... and zero biases / out-projections, so that x + 0 = x


def few(keys, n: int = MAX_LISTED_KEYS) -> str:
    """'a, b, c (and 7 more)' for an error message."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str, prefix: str = ""
) -> None:
    """ValueError naming missing / unexpected keys (with counts) and shape mismatches; keys shown with `prefix`."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {few(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {few(prefix + k for k in unexpected)}")
    bad = [
        f"{prefix}{k} is {tuple(given[k].shape)}, expected {tuple(t.shape)}"
        for k, t in expected.items()
        if k in given and tuple(given[k].shape) != tuple(t.shape)
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatches: {few(bad)}")
    if problems:
        raise ValueError(f"{what} weights do not match its config: {'; '.join(problems)}")


def instantiate(
    factory: Callable[[], nn.Module],
    sd: Mapping[str, torch.Tensor],
    what: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = "",
) -> nn.Module:
    """Build `factory()` and load `sd` into it strictly; floating tensors become `dtype` (default float32)."""
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    check_state_dict(expected, sd, what, prefix)
    if any(True for _ in model.buffers()) and set(dict(model.named_buffers())) - set(expected):
        # non-persistent buffers are computed in __init__: build the module for real so they exist
        model = factory().to(device)
    converted = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    model.to(dtype=dtype)
    return model.eval()


def with_identity_layer(cfg: TextEncoderConfig, sd: dict[str, torch.Tensor]) -> tuple[TextEncoderConfig, dict]:
    """Append a text-encoder layer that returns its input exactly; use the penultimate layer (skip_layers + 1).

    Zero attention and MLP out-projections (and biases) make both residual branches add 0; unit layer
    norms keep the layer well defined. The hidden states and pooled output are unchanged (SD v2 in
    diffusers holds 23 OpenCLIP layers and uses the last; SD v2 single files hold 24 and use the 23rd).
    """
    src = f"text_model.encoder.layers.{cfg.layers - 1}."
    dst = f"text_model.encoder.layers.{cfg.layers}."
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith(src):
            name = k[len(src):]
            fill = IDENTITY_LN_WEIGHT if ("layer_norm" in name and name.endswith("weight")) else IDENTITY_FILL
            out[dst + name] = torch.full_like(v, fill)
    return dataclasses.replace(cfg, layers=cfg.layers + 1, skip_layers=cfg.skip_layers + 1), out


def without_skipped_layers(cfg: TextEncoderConfig, sd: dict[str, torch.Tensor]) -> tuple[TextEncoderConfig, dict]:
    """Drop the `skip_layers` last layers (never used for the hidden states) and set skip_layers=0."""
    n = cfg.layers - cfg.skip_layers
    dropped = tuple(f"text_model.encoder.layers.{i}." for i in range(n, cfg.layers))
    out = {k: v for k, v in sd.items() if not k.startswith(dropped)} if dropped else dict(sd)
    return dataclasses.replace(cfg, layers=n, skip_layers=0), out


def build_components(
    config: ModelConfig,
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_sd: Mapping[str, torch.Tensor] | None,
    *,
    tokenizer=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefixes: tuple[str, str, str] = ("", "", ""),
) -> Components:
    """Components from daguerre-named state dicts (text in transformers layout); every network loaded strictly."""
    from ..models.autoencoder import AutoencoderKL
    from ..models.text_encoder import CLIPTextEncoder
    from ..models.tokenizer import CLIPTokenizer
    from ..models.unet import UNetModel

    unet = instantiate(lambda: UNetModel(config.unet), unet_sd, "U-Net", device=device, dtype=dtype, prefix=prefixes[0])
    vae = instantiate(lambda: AutoencoderKL(config.vae), vae_sd, "autoencoder", device=device, dtype=dtype,
                      prefix=prefixes[1])
    text_encoder = None
    tcfg = config.text_encoder
    if tcfg is not None and tcfg.kind != "clip":  # a frozen pretrained encoder: weights from its package
        if text_sd:
            raise ValueError(f"the checkpoint holds {len(text_sd)} text-encoder tensors, but its config uses the "
                             f"frozen pretrained {tcfg.kind!r} text encoder, whose weights are never stored")
        from ..models.bert import load_minilm, minilm_tokenizer

        text_encoder = load_minilm(tcfg, device=device, dtype=dtype)
        tokenizer = minilm_tokenizer(tcfg.max_length)
        config = dataclasses.replace(config, text_encoder=text_encoder.config)  # with the weights' sha256
    elif tcfg is not None:
        if text_sd is None:
            raise ValueError("the config has a text encoder but the checkpoint holds no text-encoder weights")
        text_encoder = instantiate(lambda: CLIPTextEncoder(tcfg), text_sd, "text encoder", device=device, dtype=dtype,
                                   prefix=prefixes[2])
        if tokenizer is None:
            tokenizer = CLIPTokenizer(max_length=tcfg.max_length, pad_token_id=tcfg.pad_token_id)
    elif text_sd:
        raise ValueError(f"the config has no text encoder but the checkpoint holds {len(text_sd)} text-encoder tensors")
    else:
        tokenizer = None
    return Components(config=config, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def state_dicts(components: Components, dtype: torch.dtype | None = None) -> tuple[dict, dict, dict | None]:
    """(U-Net, autoencoder, text encoder) state dicts (detached, on their device), floating ones in `dtype` if given.

    Without `dtype` the tensors are the networks' own (no copy): the writers convert them one at a time.
    """

    def grab(model: nn.Module | None) -> dict | None:
        if model is None:
            return None
        out = {}
        for k, v in model.state_dict().items():
            v = v.detach()
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return out

    return grab(components.unet), grab(components.vae), grab(components.text_encoder)
