"""U-Net configs and weights between diffusers' `UNet2DConditionModel` and daguerre / Stable Diffusion naming.

daguerre's U-Net uses the CompVis names (`input_blocks.{n}.{j}`, `middle_block.{0,1,2}`,
`output_blocks.{n}.{j}`), which are the SD single-file keys without `model.diffusion_model.`. diffusers
groups the same modules by level (`down_blocks.{i}.resnets.{j}`, `.attentions.{j}`, `.downsamplers.0`,
`mid_block`, `up_blocks.{i}`). The mapping is a table of module prefixes generated from the config
(`_prefix_table`) plus the ResNet-block renames; the tensors themselves are passed through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import UNetConfig

DIFFUSERS_CLASS_NAME = "UNet2DConditionModel"
CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
NORM_EPS = 1e-5  # the only GroupNorm eps daguerre's ResNet blocks use

# diffusers UNet2DConditionModel fields daguerre reads, with diffusers' defaults for absent fields
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN),
    "up_block_types": (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,  # historically misnamed: the head COUNT (int, SD 1) or per-level head counts (SD 2)
    "use_linear_projection": False,
    "num_class_embeds": None,
    "upcast_attention": False,
}

# fields of features daguerre's U-Net does not have: each must hold the plain Stable Diffusion value
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": MID_BLOCK,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": NORM_EPS,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers itself refuses it for this class
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_IGNORED = {"sample_size", "addition_embed_type_num_heads"}  # no effect on the network's weights or function

# ResNet block sub-module names: daguerre / CompVis -> diffusers
RESNET_RENAMES = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


# --- configs -------------------------------------------------------------------------------------------

def _is_fixed_value(name: str, value: Any) -> bool:
    fixed = _FIXED[name]
    if isinstance(value, (list, tuple)) and not isinstance(fixed, (list, tuple)):
        return all(_is_fixed_value(name, v) for v in value)  # per-level form of a scalar field
    if name == "mid_block_only_cross_attention":
        return value in (None, False)
    return value == fixed


def _one_value(config: dict[str, Any], name: str, n_levels: int) -> Any:
    """A field that diffusers allows per level but daguerre needs equal across levels."""
    value = config.get(name, _DEFAULTS[name])
    if isinstance(value, (list, tuple)):
        if len(value) != n_levels or any(isinstance(v, (list, tuple)) for v in value) or len(set(value)) != 1:
            raise ValueError(f"diffusers U-Net config: {name}={value} varies per level; daguerre needs one value")
        value = value[0]
    return value


def unet_config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """The UNetConfig of a diffusers `unet/config.json` (UNet2DConditionModel), or ValueError naming the field."""
    if config.get("_class_name", DIFFUSERS_CLASS_NAME) != DIFFUSERS_CLASS_NAME:
        raise ValueError(
            f"diffusers U-Net config: _class_name={config['_class_name']!r}, expected {DIFFUSERS_CLASS_NAME}"
        )
    for name, value in config.items():
        if name.startswith("_") or name in _IGNORED or name in _DEFAULTS:
            continue
        if name not in _FIXED:
            raise ValueError(f"diffusers U-Net config: unknown field {name}={value!r}; daguerre cannot load this U-Net")
        if not _is_fixed_value(name, value):
            raise ValueError(
                f"diffusers U-Net config: {name}={value!r} is not supported (daguerre supports only {_FIXED[name]!r})"
            )
    get = lambda name: config.get(name, _DEFAULTS[name])  # noqa: E731

    widths = list(get("block_out_channels"))
    n = len(widths)
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if len(down) != n or any(t not in (CROSS_ATTN_DOWN, PLAIN_DOWN) for t in down):
        raise ValueError(
            f"diffusers U-Net config: down_block_types={down}: expected {n} of {CROSS_ATTN_DOWN}/{PLAIN_DOWN}"
        )
    attention_levels = tuple(i for i, t in enumerate(down) if t == CROSS_ATTN_DOWN)
    expected_up = [CROSS_ATTN_UP if t == CROSS_ATTN_DOWN else PLAIN_UP for t in reversed(down)]
    if up != expected_up:
        raise ValueError(
            f"diffusers U-Net config: up_block_types={up} does not mirror down_block_types (expected {expected_up})"
        )
    if any(w % widths[0] for w in widths):
        raise ValueError(f"diffusers U-Net config: block_out_channels={widths} are not multiples of the first width")
    if get("norm_num_groups") is None:
        raise ValueError("diffusers U-Net config: norm_num_groups=None (no normalisation) is not supported")

    num_heads, head_dim = _heads_from_diffusers(get("attention_head_dim"), widths, attention_levels)
    context_dim = _one_value(config, "cross_attention_dim", n)
    if context_dim is None:
        raise ValueError("diffusers U-Net config: cross_attention_dim=None is not a UNet2DConditionModel")
    return UNetConfig(
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=_one_value(config, "layers_per_block", n),
        attention_levels=attention_levels,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=_one_value(config, "transformer_layers_per_block", n),
        context_dim=context_dim,
        use_linear_proj=bool(get("use_linear_projection")),
        num_classes=get("num_class_embeds"),
        norm_groups=get("norm_num_groups"),
        dropout=float(get("dropout")),
        upcast_attention=bool(get("upcast_attention")),
    )


def _heads_from_diffusers(
    heads: Any, widths: list[int], attention_levels: tuple[int, ...]
) -> tuple[int | None, int | None]:
    """(num_heads, head_dim) from diffusers' `attention_head_dim`, which holds head COUNTS (one, or one per level)."""
    if isinstance(heads, int):
        return heads, None  # SD 1: a fixed head count
    if not isinstance(heads, (list, tuple)) or len(heads) != len(widths):
        raise ValueError(f"diffusers U-Net config: attention_head_dim={heads!r}: expected an int or {len(widths)} ints")
    used = sorted(set(attention_levels) | {len(widths) - 1})  # levels with transformers (the last: the mid block)
    counts = [heads[i] for i in used]
    dims = {widths[i] // heads[i] for i in used if heads[i] and widths[i] % heads[i] == 0}
    if all(counts) and len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in used):
        return None, dims.pop()  # SD 2: a fixed head width (64), head counts 5, 10, 20, 20
    if len(set(counts)) == 1 and isinstance(counts[0], int):
        return counts[0], None
    raise ValueError(
        f"diffusers U-Net config: attention_head_dim={list(heads)} gives neither one head count nor one head width"
    )


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """The diffusers `unet/config.json` dict of `cfg` (sample_size: latent side, e.g. 64 for SD 1.5 at 512 px)."""
    if cfg.context_dim is None:
        raise ValueError("UNetConfig.context_dim=None (no cross-attention) has no diffusers UNet2DConditionModel form")
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"UNetConfig.channel_mult={cfg.channel_mult}: diffusers needs the first multiplier to be 1")
    n = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    if cfg.num_heads is not None:
        heads: int | list[int] = cfg.num_heads
    else:
        bad = [w for w in widths if w % cfg.head_dim]
        if bad:
            raise ValueError(f"UNetConfig.head_dim={cfg.head_dim} does not divide the level widths {bad}")
        heads = [w // cfg.head_dim for w in widths]
    down = [CROSS_ATTN_DOWN if i in cfg.attention_levels else PLAIN_DOWN for i in range(n)]
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "mid_block_type": MID_BLOCK,
        "up_block_types": [CROSS_ATTN_UP if t == CROSS_ATTN_DOWN else PLAIN_UP for t in reversed(down)],
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_proj,
        "upcast_attention": cfg.upcast_attention,
        "num_class_embeds": cfg.num_classes,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": NORM_EPS,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "only_cross_attention": False,
        "dual_cross_attention": False,
    }


# --- weights --------------------------------------------------------------------------------------------

def _prefix_table(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(daguerre prefix, diffusers prefix, is_resnet) for every module of the U-Net, in CompVis build order."""
    n_levels, r = len(cfg.channel_mult), cfg.num_res_blocks
    rows = [
        ("time_embed.0.", "time_embedding.linear_1.", False),
        ("time_embed.2.", "time_embedding.linear_2.", False),
        ("input_blocks.0.0.", "conv_in.", False),
        ("out.0.", "conv_norm_out.", False),
        ("out.2.", "conv_out.", False),
    ]
    if cfg.num_classes is not None:
        rows.append(("label_emb.", "class_embedding.", False))
    n = 1
    for level in range(n_levels):
        for j in range(r):
            rows.append((f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", True))
            if level in cfg.attention_levels:
                rows.append((f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}.", False))
            n += 1
        if level != n_levels - 1:
            rows.append((f"input_blocks.{n}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False))
            n += 1
    rows += [
        ("middle_block.0.", "mid_block.resnets.0.", True),
        ("middle_block.1.", "mid_block.attentions.0.", False),
        ("middle_block.2.", "mid_block.resnets.1.", True),
    ]
    n = 0
    for i, level in enumerate(reversed(range(n_levels))):
        for j in range(r + 1):
            rows.append((f"output_blocks.{n}.0.", f"up_blocks.{i}.resnets.{j}.", True))
            upsample_index = 1
            if level in cfg.attention_levels:
                rows.append((f"output_blocks.{n}.1.", f"up_blocks.{i}.attentions.{j}.", False))
                upsample_index = 2
            if level != 0 and j == r:
                rows.append((f"output_blocks.{n}.{upsample_index}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", False))
            n += 1
    return rows


def _expected_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    """daguerre key -> tensor shape, from a parameter-free (meta device) model."""
    from ..models.unet import UNetModel  # deferred: the model module imports this package's siblings

    with torch.device("meta"):
        model = UNetModel(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _key_table(cfg: UNetConfig) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """daguerre key -> diffusers key for every tensor of the U-Net of `cfg`, and the daguerre shapes."""
    shapes = _expected_shapes(cfg)
    rows = _prefix_table(cfg)
    table = {}
    for key in shapes:
        matches = [(d, f, res) for d, f, res in rows if key.startswith(d)]
        if len(matches) != 1:
            raise RuntimeError(f"internal error: U-Net key {key} matches {len(matches)} rows of the key table")
        ours, theirs, is_resnet = matches[0]
        rest = key[len(ours):]
        if is_resnet:
            for old, new in RESNET_RENAMES.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
        table[key] = theirs + rest
    return table, shapes


def _few(keys: set[str] | list[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _rename(
    sd: dict[str, torch.Tensor], table: dict[str, str], shapes: dict[str, torch.Size], source: str
) -> dict[str, torch.Tensor]:
    """Rename `sd` by `table` (source key -> target key), checking the key set and shapes (given per source key)."""
    unknown, missing = set(sd) - set(table), set(table) - set(sd)
    if unknown or missing:
        msg = f"{source} U-Net state dict does not match the config:"
        if unknown:
            msg += f" {len(unknown)} unexpected keys: {_few(unknown)};"
        if missing:
            msg += f" {len(missing)} missing keys: {_few(missing)};"
        raise ValueError(msg + " check the checkpoint variant / UNetConfig")
    out, bad = {}, []
    for key, target in table.items():
        t, shape = sd[key], shapes[key]
        if t.shape != shape:
            # proj_in / proj_out: Linear (out, in) vs 1x1 conv (out, in, 1, 1) layouts of the same weights
            if key.endswith(("proj_in.weight", "proj_out.weight")) and t.numel() == shape.numel():
                t = t.reshape(shape)
            else:
                bad.append(f"{key} {tuple(t.shape)} != {tuple(shape)}")
                continue
        out[target] = t
    if bad:
        raise ValueError(f"{source} U-Net tensors with the wrong shape for the config: {_few(bad)}")
    return out


def unet_state_dict_from_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> daguerre / SD names (no prefix); the tensors are not copied."""
    table, shapes = _key_table(cfg)
    inverse = {theirs: ours for ours, theirs in table.items()}
    return _rename(sd, inverse, {theirs: shapes[ours] for ours, theirs in table.items()}, "diffusers")


def unet_state_dict_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """daguerre / SD U-Net weights (no prefix) -> diffusers UNet2DConditionModel names; the tensors are not copied."""
    table, shapes = _key_table(cfg)
    return _rename(sd, table, shapes, "daguerre")
