"""Autoencoder configs and weights between daguerre (CompVis / SD single-file naming) and diffusers.

daguerre's `AutoencoderKL` uses the parameter names of the Stable Diffusion single-file format with
the `first_stage_model.` prefix stripped. diffusers folders (`vae/config.json` + weights) name the
same tensors differently; the table built by `_key_table` lists every pair for a given config, so
conversion is a renaming in either direction, plus one reshape: the attention projections are
1x1 convolutions (C, C, 1, 1) in CompVis and Linear layers (C, C) in diffusers. A VQ autoencoder
(diffusers `VQModel`, CompVis `VQModel`) has the same networks with a one-latent encoder output and
the codebook `quantize.embedding.weight`, named alike in both.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import VAEConfig
from .detect import CODEBOOK_KEY, VQ_SCALE_FACTOR

# diffusers `AutoencoderKL.__init__` defaults: what a config.json that omits a field means
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
DOWN_BLOCK, ATTN_DOWN_BLOCK = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
UP_BLOCK, ATTN_UP_BLOCK = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function under two names
IGNORED_FIELDS = ("sample_size", "force_upcast")  # tiling size and a precision hint: no effect on the weights
# fields daguerre supports with one value only: field -> that value
FIXED_FIELDS: dict[str, Any] = {
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
}
# attention parameter names: CompVis 1x1 conv -> diffusers; and diffusers' legacy names -> current names
ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")  # stored as (C, C, 1, 1) here, (C, C) in diffusers
RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
PARAMS = ("weight", "bias")
MAX_LISTED_KEYS = 5  # keys named in an error message
# diffusers `VQModel.__init__` defaults, where they differ from AutoencoderKL's or are its own
VQ_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in DIFFUSERS_DEFAULTS.items() if k not in ("shift_factor", "latents_mean", "latents_std",
                                                                 "use_quant_conv", "use_post_quant_conv")},
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "vq_embed_dim": None,
    "norm_type": "group",
    "lookup_from_codebook": False,
    "force_upcast": False,
}
# (VQModel's lookup_from_codebook only changes decode with force_not_quantize=True, which daguerre never calls:
# read and ignored, as sample_size and force_upcast)


def is_vq_config(config: dict[str, Any]) -> bool:
    """Whether a diffusers autoencoder config.json dict is a `VQModel`'s (its class name, or its VQ fields)."""
    return config.get("_class_name") == "VQModel" or "num_vq_embeddings" in config


def vae_config_from_diffusers(config: dict[str, Any]) -> VAEConfig:
    """A `VAEConfig` from a diffusers `vae/config.json` dict (AutoencoderKL, or VQModel: `vq_config_from_diffusers`);
    ValueError for anything daguerre cannot build."""
    if is_vq_config(config):
        return vq_config_from_diffusers(config)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"unsupported fields {unknown} in the diffusers VAE config: is it an AutoencoderKL config?")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, value in FIXED_FIELDS.items():
        if c[name] != value:
            raise ValueError(f"unsupported diffusers VAE config value {name}={c[name]!r}: daguerre needs {value!r}")
    return _blocks_config(c, scale=float(c["scaling_factor"]),
                          shift=float(c["shift_factor"]) if c["shift_factor"] is not None else 0.0)


def vq_config_from_diffusers(config: dict[str, Any]) -> VAEConfig:
    """A VQ `VAEConfig` from a diffusers `VQModel` config.json dict; ValueError naming what daguerre cannot build.

    The codebook's vectors are the latent channels (`vq_embed_dim` unset or equal to `latent_channels`);
    a config without `scaling_factor` means 1.0 (`VQ_SCALE_FACTOR`: LDM's VQ latents are not rescaled, and
    diffusers' LDMPipeline does not rescale them), not VQModel's default 0.18215."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in VQ_DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"unsupported fields {unknown} in the diffusers VQModel config")
    c = {**VQ_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["norm_type"] != "group":
        raise ValueError(f"unsupported diffusers VQModel config value norm_type={c['norm_type']!r}: daguerre "
                         "needs 'group' (the MoVQ 'spatial' decoder is not supported)")
    if c["vq_embed_dim"] is not None and c["vq_embed_dim"] != c["latent_channels"]:
        raise ValueError(f"unsupported diffusers VQModel config: vq_embed_dim={c['vq_embed_dim']} differs from "
                         f"latent_channels={c['latent_channels']}; daguerre's codebook is latent_channels wide")
    if not c["mid_block_add_attention"]:
        raise ValueError("unsupported diffusers VQModel config value mid_block_add_attention=False: daguerre "
                         "needs True")
    scale = float(config["scaling_factor"]) if "scaling_factor" in config else VQ_SCALE_FACTOR
    cfg = _blocks_config(c, scale=scale, shift=0.0)
    cfg.regularizer, cfg.codebook_size = "vq", int(c["num_vq_embeddings"])
    return cfg


def _blocks_config(c: dict[str, Any], *, scale: float, shift: float) -> VAEConfig:
    """The networks' shape from a diffusers autoencoder config with its defaults filled in."""
    if c["act_fn"] not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported diffusers VAE config value act_fn={c['act_fn']!r}: daguerre needs 'silu'")
    widths = [int(w) for w in c["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"unsupported block_out_channels={widths}: each width must be a multiple of the first")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(widths) or len(up) != len(widths):
        raise ValueError(
            f"diffusers VAE config has {len(widths)} block_out_channels but {len(down)} down_block_types "
            f"and {len(up)} up_block_types: they must match"
        )
    for name, types, allowed in (("down", down, (DOWN_BLOCK, ATTN_DOWN_BLOCK)), ("up", up, (UP_BLOCK, ATTN_UP_BLOCK))):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"unsupported {name}_block_types {bad}: daguerre supports {' and '.join(allowed)}")
    attn_levels = tuple(i for i, t in enumerate(down) if t == ATTN_DOWN_BLOCK)
    up_attn_levels = tuple(sorted(len(up) - 1 - i for i, t in enumerate(up) if t == ATTN_UP_BLOCK))
    if attn_levels != up_attn_levels:
        raise ValueError(
            f"unsupported diffusers VAE config: attention at encoder levels {attn_levels} but decoder levels "
            f"{up_attn_levels}; daguerre needs the same levels in both"
        )
    return VAEConfig(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(c["layers_per_block"]),
        attn_levels=attn_levels,
        latent_channels=int(c["latent_channels"]),
        norm_groups=int(c["norm_num_groups"]),
        scale_factor=scale,
        shift_factor=shift,
    )


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int) -> dict[str, Any]:
    """The keyword arguments of diffusers `AutoencoderKL(**config)` for `cfg` (what `vae/config.json` holds).

    A zero shift is written as null, as in the Stable Diffusion v1/v2 configs. A VQ autoencoder gets the
    config of diffusers `VQModel` (`_class_name` included, as `vae_class_name` gives it).
    """
    n = len(cfg.channel_mult)
    blocks = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [ATTN_DOWN_BLOCK if i in cfg.attn_levels else DOWN_BLOCK for i in range(n)],
        "up_block_types": [ATTN_UP_BLOCK if i in cfg.attn_levels else UP_BLOCK for i in reversed(range(n))],
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
    }
    if cfg.regularizer == "vq":
        if cfg.shift_factor != 0.0:
            raise ValueError(f"a VQ autoencoder with shift_factor {cfg.shift_factor} has no diffusers VQModel form")
        return {**blocks, "num_vq_embeddings": cfg.codebook_size, "vq_embed_dim": cfg.latent_channels,
                "norm_type": "group", "force_upcast": False}
    return {**blocks, "shift_factor": cfg.shift_factor if cfg.shift_factor != 0.0 else None}


def vae_class_name(cfg: VAEConfig) -> str:
    """The diffusers class of the autoencoder: `AutoencoderKL` or `VQModel`."""
    return "VQModel" if cfg.regularizer == "vq" else "AutoencoderKL"


def _resnet_pairs(ours: str, theirs: str, has_shortcut: bool) -> list[tuple[str, str, bool]]:
    names = [n for n in RESNET_NAMES if n != "nin_shortcut" or has_shortcut]
    return [(f"{ours}.{n}.{p}", f"{theirs}.{RESNET_NAMES[n]}.{p}", False) for n in names for p in PARAMS]


def _attn_pairs(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    return [
        (f"{ours}.{n}.{p}", f"{theirs}.{ATTN_NAMES[n]}.{p}", n in ATTN_PROJECTIONS and p == "weight")
        for n in ATTN_NAMES
        for p in PARAMS
    ]


def _conv_pairs(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    return [(f"{ours}.{p}", f"{theirs}.{p}", False) for p in PARAMS]


def _key_table(cfg: VAEConfig) -> list[tuple[str, str, bool]]:
    """(daguerre key, diffusers key, is an attention projection weight) for every parameter of `cfg`'s VAE."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    n = len(widths)
    rows = _conv_pairs("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        in_width = widths[max(i - 1, 0)]
        for j in range(cfg.num_res_blocks):
            shortcut = j == 0 and in_width != widths[i]
            rows += _resnet_pairs(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", shortcut)
            if i in cfg.attn_levels:
                rows += _attn_pairs(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
        if i != n - 1:
            rows += _conv_pairs(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for part in ("encoder", "decoder"):
        rows += _resnet_pairs(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        rows += _attn_pairs(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        rows += _resnet_pairs(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
    rows += _conv_pairs("encoder.norm_out", "encoder.conv_norm_out")
    rows += _conv_pairs("encoder.conv_out", "encoder.conv_out")
    rows += _conv_pairs("quant_conv", "quant_conv")
    if cfg.regularizer == "vq":
        rows.append((CODEBOOK_KEY, CODEBOOK_KEY, False))
    rows += _conv_pairs("post_quant_conv", "post_quant_conv")
    rows += _conv_pairs("decoder.conv_in", "decoder.conv_in")
    for i in range(n):
        k = n - 1 - i  # diffusers numbers the up blocks in the order they run, CompVis by resolution level
        in_width = widths[min(i + 1, n - 1)]
        for j in range(cfg.num_res_blocks + 1):
            shortcut = j == 0 and in_width != widths[i]
            rows += _resnet_pairs(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", shortcut)
            if i in cfg.attn_levels:
                rows += _attn_pairs(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{k}.attentions.{j}")
        if i != 0:
            rows += _conv_pairs(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    rows += _conv_pairs("decoder.norm_out", "decoder.conv_norm_out")
    rows += _conv_pairs("decoder.conv_out", "decoder.conv_out")
    return rows


def _modern_name(key: str) -> str:
    """diffusers' legacy attention names (`query`, `key`, `value`, `proj_attn`) -> current ones."""
    *path, name, param = key.split(".")
    if name in LEGACY_ATTN_NAMES and ".attentions." in key:
        return ".".join([*path, LEGACY_ATTN_NAMES[name], param])
    return key


def _check_keys(given: set[str], expected: set[str], source: str) -> None:
    unknown, missing = sorted(given - expected), sorted(expected - given)
    if unknown or missing:
        raise ValueError(
            f"{source} VAE state dict does not match the config: {len(unknown)} unknown keys "
            f"{unknown[:MAX_LISTED_KEYS]}, {len(missing)} missing keys {missing[:MAX_LISTED_KEYS]}; "
            "check the config (channels, levels, attention) or the key prefix"
        )


def vae_state_dict_from_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` weights -> daguerre (CompVis) keys; ValueError on unknown or missing keys."""
    renamed = {_modern_name(k): v for k, v in sd.items()}
    if len(renamed) != len(sd):
        raise ValueError("diffusers VAE state dict holds both legacy and current names of the same attention weights")
    table = _key_table(cfg)
    _check_keys(set(renamed), {theirs for _, theirs, _ in table}, "diffusers")
    out = {}
    for ours, theirs, is_proj in table:
        t = renamed[theirs]
        out[ours] = t.reshape(*t.shape, 1, 1) if is_proj and t.ndim == 2 else t  # Linear (C, C) -> conv (C, C, 1, 1)
    return out


def vae_state_dict_to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """daguerre (CompVis) weights -> diffusers `AutoencoderKL` keys; ValueError on unknown or missing keys."""
    table = _key_table(cfg)
    _check_keys(set(sd), {ours for ours, _, _ in table}, "daguerre")
    out = {}
    for ours, theirs, is_proj in table:
        t = sd[ours]
        out[theirs] = t.reshape(t.shape[0], t.shape[1]) if is_proj and t.ndim == 4 else t  # conv -> Linear
    return out
