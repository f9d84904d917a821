"""Key tables and configs for the CLIP text encoder: transformers (SD v1, diffusers) and OpenCLIP (SD v2) layouts.

daguerre's `CLIPTextEncoder` uses transformers' `CLIPTextModel` key names (`text_model.*`, plus
`text_projection.weight`), which is also the SD v1 single-file layout after stripping
`cond_stage_model.transformer.`. SD v2 single files store OpenCLIP's names after
`cond_stage_model.model.`: fused q/k/v (`attn.in_proj_weight`), `positional_embedding` as a bare
tensor and `text_projection` as a (width, proj) matrix applied as x @ P. Every mapping here is a
pure rename / split / transpose, so import followed by export gives back each tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import TextEncoderConfig

PREFIX = "text_model."
LAYER = "text_model.encoder.layers.{}."
POSITION_IDS = "embeddings.position_ids"  # a buffer transformers may save: derived, never imported
CLIP_HEAD_DIM = 64  # every CLIP / OpenCLIP text tower uses 64-wide heads
OPENAI_PAD_ID = 49407  # OpenAI CLIP (SD v1) pads with <|endoftext|>
OPENCLIP_PAD_ID = 0  # OpenCLIP (SD v2) pads with "!"
LEGACY_EOS_ID = 2  # old transformers configs store bos 0 / eos 2 / pad 1, which are not CLIP's ids
# transformers `CLIPTextConfig` defaults, for fields a config.json leaves out
_HF_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5, "projection_dim": 512}
_ACTIVATIONS = ("quick_gelu", "gelu")
IDENTITY_LN_WEIGHT = 1.0  # an appended identity text-encoder layer: unit layer norms ...
IDENTITY_FILL = 0.0  # ... and zero biases / out-projections, so that x + 0 = x

# OpenCLIP name -> transformers name, outside and inside the residual blocks
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENCLIP_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # -> self_attn.{q,k,v}_proj.*
_OPENCLIP_DROPPED = ("logit_scale", "attn_mask")  # image-text similarity temperature; a derived causal mask
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def expected_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key of `CLIPTextEncoder(cfg).state_dict()` with its shape, without building the model."""
    w, m = cfg.width, cfg.mlp_dim
    shapes = {
        "text_model.embeddings.token_embedding.weight": (cfg.embedding_rows, w),
        "text_model.embeddings.position_embedding.weight": (cfg.max_length, w),
    }
    for i in range(cfg.layers):
        p = LAYER.format(i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (w, w)
            shapes[f"{p}self_attn.{proj}.bias"] = (w,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (w,)
            shapes[f"{p}{norm}.bias"] = (w,)
        shapes.update({f"{p}mlp.fc1.weight": (m, w), f"{p}mlp.fc1.bias": (m,), f"{p}mlp.fc2.weight": (w, m),
                       f"{p}mlp.fc2.bias": (w,)})
    shapes["text_model.final_layer_norm.weight"] = (w,)
    shapes["text_model.final_layer_norm.bias"] = (w,)
    if cfg.projection_dim:
        shapes["text_projection.weight"] = (cfg.projection_dim, w)
    return shapes


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _check(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig, what: str) -> None:
    """ValueError unless `sd` has exactly the keys and shapes of `CLIPTextEncoder(cfg)`."""
    shapes = expected_shapes(cfg)
    missing, unknown = set(shapes) - set(sd), set(sd) - set(shapes)
    if missing or unknown:
        raise ValueError(
            f"{what} does not match the text encoder config (width {cfg.width}, {cfg.layers} layers, "
            f"projection {cfg.projection_dim}): missing {_few(missing) or 'none'}; unknown {_few(unknown) or 'none'}"
        )
    wrong = [f"{k} {tuple(sd[k].shape)} != {shapes[k]}" for k in shapes if tuple(sd[k].shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not match the config: {_few(wrong)}")


# --- transformers ------------------------------------------------------------------------------------

def text_config_from_transformers(config: dict[str, Any], skip_layers: int = 0) -> TextEncoderConfig:
    """TextEncoderConfig of a transformers `CLIPTextConfig` dict (diffusers `text_encoder/config.json`).

    A projection is kept only for `CLIPTextModelWithProjection`. Old configs carry bos/eos/pad ids 0/2/1,
    which are not CLIP's: then the CLIP ids are used and the pad id follows the family (0 for gelu =
    OpenCLIP, <|endoftext|> otherwise); the tokenizer folder is the authority on padding. Note that
    diffusers ships SD 2.x with the last layer already removed (23 layers, used with skip_layers 0).
    """
    if "text_config" in config:  # a full CLIPConfig: take its text tower
        config = {**config["text_config"], "architectures": config.get("architectures", [])}
    c = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if c.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"model_type {c['model_type']!r} is not a CLIP text model")
    if c["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported: use one of {_ACTIVATIONS}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"hidden_size {c['hidden_size']} is not divisible by num_attention_heads "
                         f"{c['num_attention_heads']}")
    if not 0 <= skip_layers < c["num_hidden_layers"]:
        raise ValueError(f"skip_layers {skip_layers} must be in 0..{c['num_hidden_layers'] - 1}")
    defaults = TextEncoderConfig()
    vocab = c["vocab_size"]
    bos, eos = c.get("bos_token_id"), c.get("eos_token_id")
    if not (isinstance(bos, int) and isinstance(eos, int) and eos != LEGACY_EOS_ID and 0 <= bos < vocab
            and 0 <= eos < vocab):
        bos, eos = defaults.bos_token_id, defaults.eos_token_id
    pad = c.get("pad_token_id")
    if pad not in (OPENCLIP_PAD_ID, eos):  # the only pad ids CLIP text towers are trained with
        pad = OPENCLIP_PAD_ID if c["hidden_act"] == "gelu" else eos
    with_projection = "CLIPTextModelWithProjection" in (c.get("architectures") or [])
    return TextEncoderConfig(
        vocab_size=vocab, max_length=c["max_position_embeddings"], width=c["hidden_size"],
        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
        activation=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"], skip_layers=skip_layers,
        projection_dim=c["projection_dim"] if with_projection else None,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )


def text_config_to_transformers(cfg: TextEncoderConfig, drop_skipped_layers: bool = False) -> dict[str, Any]:
    """A `CLIPTextConfig` dict (with `architectures`) that transformers builds the same network from.

    transformers has no notion of skipped layers: with `drop_skipped_layers` the config describes only
    the first `layers - skip_layers` layers and no projection, the way diffusers ships SD 2.x, so that
    its `last_hidden_state` is our `hidden` (the pooled output is then not CLIP's).
    """
    dropping = drop_skipped_layers and cfg.skip_layers > 0
    projection = cfg.projection_dim and not dropping
    d = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_length, "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.layers - (cfg.skip_layers if dropping else 0),
        "num_attention_heads": cfg.heads, "hidden_act": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0, "dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if projection:
        d["projection_dim"] = cfg.projection_dim
    return d


def text_state_dict_from_transformers(
    sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig
) -> dict[str, torch.Tensor]:
    """daguerre keys from a transformers `CLIPTextModel(WithProjection)` state dict (near identity).

    Accepts the hub layout (`text_model.*`) and transformers 5's unprefixed `CLIPTextModel` files; drops
    the derived `position_ids` buffer; ValueError listing keys that are missing or unknown.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = PREFIX + key
        if key == PREFIX + POSITION_IDS:
            continue
        out[key] = value
    _check(out, cfg, "transformers text encoder state dict")
    return out


def text_state_dict_to_transformers(
    sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig, drop_skipped_layers: bool = False
) -> dict[str, torch.Tensor]:
    """transformers (hub layout) keys of a daguerre text encoder state dict; see `text_config_to_transformers`."""
    _check(sd, cfg, "text encoder state dict")
    if not (drop_skipped_layers and cfg.skip_layers > 0):
        return dict(sd)
    keep = cfg.layers - cfg.skip_layers
    out = {}
    for key, value in sd.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", key)
        if key == "text_projection.weight" or (m and int(m.group(1)) >= keep):
            continue
        out[key] = value
    return out


# --- OpenCLIP ----------------------------------------------------------------------------------------

def text_state_dict_from_openclip(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """daguerre keys from an OpenCLIP text tower (SD v2 single file after stripping `cond_stage_model.model.`).

    `attn.in_proj_weight/bias` (q, k, v stacked) are split; `text_projection` (width, proj), applied as
    x @ P, becomes a Linear weight P^T. `logit_scale` is dropped: it is the temperature of CLIP's
    image-text similarity, which nothing in a diffusion model uses (and `attn_mask`, if stored, is the
    causal mask, rebuilt at run time). ValueError on any other unknown key, or on missing ones.
    """
    out, unknown = {}, []
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key in _OPENCLIP_DROPPED:
            continue
        elif (m := _BLOCK_RE.fullmatch(key)) and (m.group(2) in _OPENCLIP_BLOCK or m.group(2) in _OPENCLIP_FUSED):
            p, name = LAYER.format(m.group(1)), m.group(2)
            if name in _OPENCLIP_BLOCK:
                out[p + _OPENCLIP_BLOCK[name]] = value
            else:
                if value.shape[0] % 3:
                    raise ValueError(f"{key} has {value.shape[0]} rows, not 3 x width (q, k, v stacked)")
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{p}self_attn.{proj}.{_OPENCLIP_FUSED[name]}"] = part.clone()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown OpenCLIP text encoder keys: {_few(unknown)}")
    _check(out, cfg, "OpenCLIP text encoder state dict")
    return out


def text_state_dict_to_openclip(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP keys (SD v2 single-file layout without `cond_stage_model.model.`) of a daguerre state dict.

    The inverse of `text_state_dict_from_openclip`; `logit_scale` is not written (see there).
    """
    _check(sd, cfg, "text encoder state dict")
    out = {src: sd[dst] for src, dst in _OPENCLIP_TOP.items()}
    for i in range(cfg.layers):
        p, q = LAYER.format(i), f"transformer.resblocks.{i}."
        for src, dst in _OPENCLIP_BLOCK.items():
            out[q + src] = sd[p + dst]
        for src, kind in _OPENCLIP_FUSED.items():
            out[q + src] = torch.cat([sd[f"{p}self_attn.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")])
    if cfg.projection_dim:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    return out


# --- configs from tensors ----------------------------------------------------------------------------

def text_config_from_state_dict(sd: Mapping[str, torch.Tensor], layout: str) -> TextEncoderConfig:
    """Infer the text encoder config from tensor shapes.

    `layout` "transformers" (SD v1 single file, stripped of `cond_stage_model.transformer.`): OpenAI
    CLIP, quick_gelu, last layer, pad <|endoftext|>. "openclip" (SD v2, stripped of
    `cond_stage_model.model.`): gelu, penultimate layer, pad "!" (0). Heads are width / 64.
    """
    if layout == "transformers":
        sd = {(PREFIX + k if k.startswith(("embeddings.", "encoder.")) else k): v for k, v in sd.items()}
        names = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                 "text_model.encoder.layers.0.mlp.fc1.weight")
        block_re, proj_key = re.compile(r"text_model\.encoder\.layers\.(\d+)\."), "text_projection.weight"
        family = {"activation": "quick_gelu", "skip_layers": 0, "pad_token_id": OPENAI_PAD_ID}
    elif layout == "openclip":
        names = ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight")
        block_re, proj_key = re.compile(r"transformer\.resblocks\.(\d+)\."), "text_projection"
        family = {"activation": "gelu", "skip_layers": 1, "pad_token_id": OPENCLIP_PAD_ID}
    else:
        raise ValueError(f"unknown text encoder layout {layout!r}: use 'transformers' or 'openclip'")
    missing = [k for k in names if k not in sd]
    if missing:
        raise ValueError(f"not a {layout} CLIP text encoder state dict: missing {_few(missing)}")
    tokens, positions, fc1 = (sd[k] for k in names)
    vocab, width = tokens.shape
    if width % CLIP_HEAD_DIM:
        raise ValueError(f"text encoder width {width} is not a multiple of the CLIP head width {CLIP_HEAD_DIM}")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := block_re.match(k)))
    projection = None
    if proj_key in sd:
        projection = sd[proj_key].shape[0] if layout == "transformers" else sd[proj_key].shape[1]
    family["skip_layers"] = min(family["skip_layers"], layers - 1)
    return TextEncoderConfig(
        vocab_size=vocab, max_length=positions.shape[0], width=width, layers=layers, heads=width // CLIP_HEAD_DIM,
        mlp_dim=fc1.shape[0], projection_dim=projection, **family,
    )


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
