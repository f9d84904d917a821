"""What a Stable Diffusion single-file checkpoint is, from its keys and tensor shapes alone.

The CompVis layout names every tensor by the module that owns it (`model.diffusion_model.*` for the
U-Net, `first_stage_model.*` for the autoencoder, `cond_stage_model.*` for the text encoder), so the
architecture is recovered by reading shapes: widths from convolution weights, levels from where the
`Downsample` convolutions (`op`) sit, attention levels from which blocks own a spatial transformer,
context width from the cross-attention key projection. What shapes cannot tell is fixed by the Stable
Diffusion conventions, written down here and in docs/formats.md:

- heads: 1x1-conv transformer projections (SD v1) -> 8 heads per layer; linear projections (SD v2) -> 64-wide heads;
- text encoder: OpenAI CLIP layout (`cond_stage_model.transformer.*`) -> last layer, pad with <|endoftext|>;
  OpenCLIP layout (`cond_stage_model.model.*`, SD v2) -> penultimate layer (skip_layers=1), pad with "!" (id 0);
- prediction type (SD v2 only; SD v1 is epsilon): the caller's choice, else a `parameterization: "v"` line in
  a YAML file beside the checkpoint (AUTOMATIC1111 convention), else the ComfyUI heuristic that the last
  transformer's `norm1.bias` has std > 0.09 in v-prediction models;
- SD v2 with v-prediction is the 768-pixel model with float32 attention scores (upcast_attention), else 512.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from ..untrusted import parse_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX_CLIP = "cond_stage_model.transformer."  # OpenAI CLIP (SD v1), transformers CLIPTextModel layout
TEXT_PREFIX_OPENCLIP = "cond_stage_model.model."  # OpenCLIP (SD v2)
EMA_PREFIX = "model_ema."  # LitEma copies of the U-Net: f"model_ema.{('diffusion_model.' + key).replace('.', '')}"
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
EMA_OWNER = "diffusion_model."  # the U-Net's name inside the CompVis DiffusionWrapper, part of the EMA names

# Keys a Stable Diffusion file may hold that daguerre does not load, with the reason (docs/formats.md).
IGNORED_KEYS: tuple[tuple[str, str], ...] = (
    ("betas", "diffusion schedule buffer: recomputed from ScheduleConfig"),
    ("alphas_cumprod", "diffusion schedule buffer"),
    ("alphas_cumprod_prev", "diffusion schedule buffer"),
    ("sqrt_*", "diffusion schedule buffers (sqrt_alphas_cumprod, sqrt_recip..., ...)"),
    ("log_one_minus_alphas_cumprod", "diffusion schedule buffer"),
    ("posterior_*", "diffusion schedule buffers (posterior_variance, posterior_mean_coef1, ...)"),
    ("logvar", "learned-variance buffer of the CompVis training wrapper (unused at inference)"),
    ("scale_factor", "latent scale buffer of a CompVis LDM trained with scale_by_std: read into the VAE config"),
    ("model_ema.decay", "EMA bookkeeping"),
    ("model_ema.num_updates", "EMA bookkeeping"),
    ("model_ema.*", "EMA copy of the U-Net: used only with use_ema=True / --ema"),
    ("first_stage_model.loss.*", "autoencoder training loss (LPIPS discriminator): not part of the model"),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "constant arange(77) buffer"),
    ("cond_stage_model.model.logit_scale", "CLIP contrastive temperature: unused by a text encoder"),
    ("cond_stage_model.model.attn_mask", "OpenCLIP causal mask: rebuilt at run time"),
)

CODEBOOK_KEY = "quantize.embedding.weight"  # a VQ autoencoder's codebook (n_embed, embed_dim), prefix stripped
CLASS_EMBEDDER_KEY = "cond_stage_model.embedding.weight"  # CompVis ClassEmbedder (n_classes, context_dim)
SAMPLE_SIZE_CLASS_LDM = 256  # pixels: the CompVis ImageNet LDMs (64 x f4, 32 x f8)
VQ_SCALE_FACTOR = 1.0  # CompVis LatentDiffusion's default scale_factor, which its VQ-based LDMs keep
V_HEURISTIC_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # in the U-Net, without prefix
V_HEURISTIC_STD = 0.09  # ComfyUI `model_detection`: std above this -> v-prediction (SD v2.x 768-v)
SD1_HEADS = 8  # SD v1 attention: 8 heads at every level
SD2_HEAD_DIM = 64  # SD v2 attention: 64-wide heads at every level
OPENCLIP_PAD_TOKEN_ID = 0  # OpenCLIP pads with "!" (id 0)
OPENCLIP_SKIP_LAYERS = 1  # SD v2 conditions on the penultimate OpenCLIP layer
SAMPLE_SIZE_V1, SAMPLE_SIZE_V2_V = 512, 768  # native image sizes in pixels
_YAML_PARAM = re.compile(r"""^\s*parameterization\s*:\s*["']?([A-Za-z_]+)["']?\s*(#.*)?$""")
_YAML_VALUES = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def is_ignored(key: str) -> bool:
    """True if `key` is in the IGNORED_KEYS table."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern, _ in IGNORED_KEYS)


def is_ignored_bookkeeping(key: str) -> bool:
    """True for the EMA counters (`model_ema.decay`, `model_ema.num_updates`), which are not weights."""
    return key in EMA_BOOKKEEPING


def ema_key(unet_key: str) -> str:
    """The LitEma name of a U-Net parameter (key without `model.diffusion_model.`)."""
    return EMA_PREFIX + (EMA_OWNER + unet_key).replace(".", "")


def strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `sd` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted integers i for which some key starts with f"{prefix}{i}."."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"cannot read the {what}: key {key!r} is missing; is this a Stable Diffusion checkpoint?")
    return sd[key]


def infer_unet_config(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The UNetConfig of a CompVis U-Net state dict (keys without `model.diffusion_model.`), from shapes."""
    w_in = _need(sd, "input_blocks.0.0.weight", "U-Net")
    mc, in_ch = int(w_in.shape[0]), int(w_in.shape[1])
    out_ch = int(_need(sd, "out.2.weight", "U-Net").shape[0])
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (width, has a spatial transformer) per ResNet block
    attn_block = None
    for i in _indices(sd, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
            continue
        width = int(_need(sd, f"input_blocks.{i}.0.out_layers.3.weight", "U-Net").shape[0])
        has_attn = f"input_blocks.{i}.1.norm.weight" in sd
        attn_block = attn_block or (f"input_blocks.{i}.1." if has_attn else None)
        levels[-1].append((width, has_attn))
    counts = {len(lv) for lv in levels}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"unsupported U-Net layout: levels with different numbers of ResNet blocks {sorted(counts)}")
    mults = []
    for lv in levels:
        if len({w for w, _ in lv}) != 1 or lv[0][0] % mc:
            raise ValueError(f"unsupported U-Net layout: level widths {[w for w, _ in lv]} for model_channels {mc}")
        mults.append(lv[0][0] // mc)
    attention_levels = tuple(i for i, lv in enumerate(levels) if all(a for _, a in lv))
    if any(any(a for _, a in lv) and not all(a for _, a in lv) for lv in levels):
        raise ValueError("unsupported U-Net layout: a level where only some ResNet blocks have attention")
    block = attn_block or "middle_block.1."  # the middle block always has attention
    label = sd.get("label_emb.weight")
    if block + "qkv.weight" in sd:  # ADM's attention block (the unconditional CompVis LDMs): heads from elsewhere
        return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mults),
                          num_res_blocks=counts.pop(), attention_levels=attention_levels, num_heads=SD1_HEADS,
                          head_dim=None, context_dim=None, attention_block="adm",
                          num_classes=None if label is None else int(label.shape[0]))
    proj_in = _need(sd, block + "proj_in.weight", "U-Net attention")
    depth = len(_indices(sd, block + "transformer_blocks."))
    k2 = sd.get(block + "transformer_blocks.0.attn2.to_k.weight")
    linear = proj_in.ndim == 2
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=counts.pop(),
        attention_levels=attention_levels,
        num_heads=None if linear else SD1_HEADS,
        head_dim=SD2_HEAD_DIM if linear else None,
        transformer_depth=depth,
        context_dim=None if k2 is None else int(k2.shape[1]),
        use_linear_proj=linear,
        num_classes=None if label is None else int(label.shape[0]),
    )


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """The VAEConfig of a CompVis autoencoder state dict (keys without `first_stage_model.`), from shapes."""
    w_in = _need(sd, "encoder.conv_in.weight", "autoencoder")
    ch, in_ch = int(w_in.shape[0]), int(w_in.shape[1])
    levels = _indices(sd, "encoder.down.")
    if not levels:
        raise ValueError("cannot read the autoencoder: no encoder.down.* keys")
    mults, attn = [], []
    for i in levels:
        width = int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", "autoencoder").shape[0])
        if width % ch:
            raise ValueError(f"unsupported autoencoder layout: level {i} width {width} for base channels {ch}")
        mults.append(width // ch)
        if _indices(sd, f"encoder.down.{i}.attn."):
            attn.append(i)
    quant = _need(sd, "quant_conv.weight", "autoencoder")
    shape = dict(
        in_channels=in_ch,
        out_channels=int(_need(sd, "decoder.conv_out.weight", "autoencoder").shape[0]),
        base_channels=ch,
        channel_mult=tuple(mults),
        num_res_blocks=len(_indices(sd, "encoder.down.0.block.")),
        attn_levels=tuple(attn),
    )
    codebook = sd.get(CODEBOOK_KEY)
    if codebook is None:
        return VAEConfig(**shape, latent_channels=int(quant.shape[0]) // 2)
    # a VQ autoencoder (CompVis / taming VQModel): its LDMs do not rescale the latents (scale_factor 1)
    size, dim = (int(n) for n in codebook.shape)
    if tuple(quant.shape[:2]) != (dim, dim):
        raise ValueError(f"unsupported VQ autoencoder: quant_conv maps {int(quant.shape[1])} to {int(quant.shape[0])} "
                         f"channels for {dim}-channel codes; daguerre needs z_channels = embed_dim")
    return VAEConfig(**shape, latent_channels=dim, regularizer="vq", codebook_size=size, scale_factor=VQ_SCALE_FACTOR)


def text_layout(keys) -> str | None:
    """'transformers' (SD v1, OpenAI CLIP), 'openclip' (SD v2) or None (no text encoder) from the key names."""
    has_clip = any(k.startswith(TEXT_PREFIX_CLIP) for k in keys)
    has_open = any(k.startswith(TEXT_PREFIX_OPENCLIP) for k in keys)
    if has_clip and has_open:
        raise ValueError("checkpoint holds both an OpenAI CLIP and an OpenCLIP text encoder: not a SD v1/v2 file")
    return "transformers" if has_clip else "openclip" if has_open else None


def infer_text_config(sd: Mapping[str, torch.Tensor], layout: str) -> TextEncoderConfig:
    """The TextEncoderConfig of a text-encoder state dict (prefix stripped) in the given layout."""
    from .text_keys import text_config_from_state_dict

    cfg = text_config_from_state_dict(sd, layout)
    if layout == "openclip":  # SD v2 convention: penultimate layer, pad with "!"
        cfg = dataclasses.replace(cfg, skip_layers=OPENCLIP_SKIP_LAYERS, pad_token_id=OPENCLIP_PAD_TOKEN_ID)
    return cfg


YAML_MAX_BYTES = 1 << 20


def check_original_config(checkpoint: str | Path, yaml: str | Path) -> Path:
    """`yaml` (a CompVis inference config, e.g. v1-inference.yaml; `--config FILE`), checked to go with the
    checkpoint file `checkpoint`. It is read as if it were CHECKPOINT.yaml beside it by the load it is passed to
    (`original_config`), and by no other: it travels with the load call, never in a table of this process."""
    checkpoint, yaml = Path(checkpoint).expanduser(), Path(yaml).expanduser()
    if not checkpoint.is_file():
        raise ValueError(f"--config goes with a checkpoint file, and {checkpoint} is not one")
    if not yaml.is_file():
        raise FileNotFoundError(f"no such config file: {yaml}")
    return yaml


def config_yaml(checkpoint: Path | None, original_config: Path | None = None) -> Path | None:
    """The CompVis inference YAML of a checkpoint: `original_config` when given (`--config FILE`), else
    CHECKPOINT.yaml or .yml beside it (AUTOMATIC1111's convention), else None."""
    if original_config is not None:
        return original_config
    if checkpoint is None:
        return None
    return next((y for y in (checkpoint.with_suffix(".yaml"), checkpoint.with_suffix(".yml")) if y.is_file()), None)


def sd_heads_from_yaml(unet: UNetConfig, checkpoint: Path | None,
                       original_config: Path | None = None) -> tuple[UNetConfig, Path | None]:
    """The U-Net's heads: its CompVis YAML's (`num_head_channels`, else `num_heads`; `config_yaml`) when it has
    one, else the SD conventions `infer_unet_config` applied (8 heads with 1x1-conv projections, 64-wide heads
    with linear ones). A width those heads do not divide is a ValueError that asks for the YAML: the weights
    cannot tell the heads (a head count that divides but is wrong cannot be seen: such a file needs its YAML)."""
    found, y = yaml_scalars(checkpoint, ("num_head_channels", "num_heads"), original_config)
    channels = _yaml_int(found, "num_head_channels", y) if y is not None else None
    heads = _yaml_int(found, "num_heads", y) if y is not None else None
    if channels is not None and channels > 0:
        unet = dataclasses.replace(unet, num_heads=None, head_dim=channels)
    elif heads is not None and heads > 0:
        unet = dataclasses.replace(unet, num_heads=heads, head_dim=None)
    for level in (*unet.attention_levels, len(unet.channel_mult) - 1):  # the middle block is at the last level
        width = unet.model_channels * unet.channel_mult[level]
        split = unet.head_dim if unet.head_dim is not None else unet.num_heads
        if split <= 0 or width % split:
            what = f"{unet.head_dim}-wide heads" if unet.head_dim is not None else f"{unet.num_heads} heads"
            source = f"its config {y}" if y is not None and (channels or heads) else "the Stable Diffusion convention"
            raise ValueError(f"the U-Net's attention at width {width} cannot be cut into {what} ({source}): this "
                             "checkpoint's head widths cannot be inferred from its weights; put its CompVis inference "
                             f"YAML beside it ({checkpoint.with_suffix('.yaml').name if checkpoint else 'NAME.yaml'}) "
                             "or give it with --config FILE (num_heads or num_head_channels in unet_config)")
    return unet, y if (channels or heads) else None


def prediction_from_yaml(checkpoint: Path | None, original_config: Path | None = None) -> tuple[str, Path] | None:
    """(prediction type, yaml path) from a `parameterization:` line in the checkpoint's YAML (`config_yaml`).

    Only that one line is read (no YAML parser); None when there is no such file or line.
    """
    for y in [y for y in [config_yaml(checkpoint, original_config)] if y is not None]:
        with open(y, "rb") as f:  # an inference YAML is a few kB: the first MiB is plenty
            text = f.read(YAML_MAX_BYTES).decode("utf-8", errors="replace")
        for line in text.splitlines():
            m = _YAML_PARAM.match(line)
            if m:
                value = m.group(1)
                if value not in _YAML_VALUES:
                    raise ValueError(f"{y}: unknown parameterization {value!r}; expected one of {sorted(_YAML_VALUES)}")
                return _YAML_VALUES[value], y
    return None


_YAML_SCALAR = re.compile(r"""^\s*([A-Za-z_]+)\s*:\s*["']?(-?[0-9.eE+-]+|[A-Za-z_]+)["']?\s*(#.*)?$""")


def yaml_scalars(checkpoint: Path | None, names: tuple[str, ...],
                 original_config: Path | None = None) -> tuple[dict[str, str], Path | None]:
    """The first value of each of `names` written as a `name: value` line in the checkpoint's YAML (`config_yaml`:
    `original_config`, given with --config, else CHECKPOINT.yaml / .yml beside it; no YAML parser: single lines
    only), and that file; ({}, None) without one."""
    for y in [y for y in [config_yaml(checkpoint, original_config)] if y is not None]:
        with open(y, "rb") as f:
            text = f.read(YAML_MAX_BYTES).decode("utf-8", errors="replace")
        found: dict[str, str] = {}
        for line in text.splitlines():
            m = _YAML_SCALAR.match(line)
            if m and m.group(1) in names and m.group(1) not in found:
                found[m.group(1)] = m.group(2)
        return found, y
    return {}, None


def _yaml_int(found: dict[str, str], name: str, y: Path) -> int | None:
    if name not in found:
        return None
    try:
        return int(found[name])
    except ValueError:
        raise ValueError(f"{y}: {name}: {found[name]!r} is not an integer") from None


def _schedule_from_betas(betas: torch.Tensor) -> ScheduleConfig:
    """The ScheduleConfig of a CompVis `betas` buffer: LDM's "linear" schedule (linspace of sqrt(beta), squared:
    daguerre's "scaled_linear") from linear_start = betas[0] to linear_end = betas[-1]."""
    b = betas.double().flatten()
    if len(b) < 2:
        raise ValueError(f"the checkpoint's betas buffer has {len(b)} values: not a diffusion schedule")
    start, end = float(b[0]), float(b[-1])
    expect = torch.linspace(start**0.5, end**0.5, len(b), dtype=torch.float64) ** 2
    if not torch.allclose(b, expect, rtol=1e-4, atol=1e-9):
        raise ValueError("the checkpoint's betas are not LDM's linear schedule (linspace of sqrt(beta), squared)")
    return ScheduleConfig(num_train_timesteps=len(b), beta_schedule="scaled_linear", beta_start=start, beta_end=end)


def detect_compvis_ldm(
    sd: Mapping[str, torch.Tensor], path: Path | None, prediction_type: str | None,
    value_of: Callable[[str], torch.Tensor] | None, original_config: Path | None = None,
) -> tuple[ModelConfig, str, str]:
    """(config, variant, the prediction type's source) of a CompVis LDM without a text encoder, on a KL or VQ
    first stage: class-conditional, with a ClassEmbedder (`cond_stage_model.embedding.weight`, one row per
    class, the last the null class of guidance when the model was trained with one) whose row is the U-Net's
    one-token cross-attention context; or unconditional (no `cond_stage_model.*`), its U-Net attending with
    ADM's attention blocks (`attention_block = "adm"`).

    What the weights cannot tell comes from the model's YAML (`original_config`, else CHECKPOINT.yaml beside the
    checkpoint, as AUTOMATIC1111 reads it): the heads (`num_head_channels`, else `num_heads`; required), the latent side
    `image_size` (default SAMPLE_SIZE_CLASS_LDM pixels) and `parameterization`. The schedule comes from the
    `betas` buffer, the latent scale from the `scale_factor` buffer (LDM's default 1 without one)."""

    def tensor(key: str) -> torch.Tensor:
        t = sd[key]
        return value_of(key) if t.is_meta and value_of is not None else t

    unet = infer_unet_config(strip(sd, UNET_PREFIX))
    vae = infer_vae_config(strip(sd, VAE_PREFIX))
    n_classes = None
    if CLASS_EMBEDDER_KEY in sd:
        n_classes, width = (int(n) for n in sd[CLASS_EMBEDDER_KEY].shape)
        if unet.context_dim != width:
            raise ValueError(f"the ClassEmbedder's {width}-wide rows do not match the U-Net's cross-attention "
                             f"context width {unet.context_dim}")
    elif unet.attention_block != "adm" or unet.num_classes is not None:
        raise ValueError("no text encoder (cond_stage_model.*) and no ClassEmbedder, but a U-Net with spatial "
                         "transformers: neither a Stable Diffusion checkpoint (which needs its text encoder) nor an "
                         "unconditional CompVis LDM (ADM attention blocks); its autoencoder alone loads "
                         "(daguerre train ldm --vae, info, convert)")
    found, y = yaml_scalars(path, ("num_head_channels", "num_heads", "image_size", "parameterization"),
                            original_config)
    head_dim, heads = _yaml_int(found, "num_head_channels", y), _yaml_int(found, "num_heads", y)
    if head_dim is not None and head_dim > 0:
        unet.num_heads, unet.head_dim = None, head_dim
    elif heads is not None and heads > 0:
        unet.num_heads, unet.head_dim = heads, None
    else:
        beside = path.with_suffix(".yaml").name if path is not None else "CHECKPOINT.yaml"
        raise ValueError(f"a CompVis LDM: its attention heads are not in its weights; put the "
                         f"model's config YAML beside it as {beside} (daguerre reads its num_head_channels or "
                         "num_heads line)")
    if n_classes is not None:
        unet.num_classes, unet.class_embedding = n_classes, "context"
    if "betas" in sd and (not sd["betas"].is_meta or value_of is not None):
        schedule = _schedule_from_betas(tensor("betas"))
    else:
        raise ValueError("a CompVis LDM without its betas buffer: its diffusion schedule is unknown")
    if "scale_factor" in sd and (not sd["scale_factor"].is_meta or value_of is not None):
        vae.scale_factor = float(tensor("scale_factor"))
    elif vae.regularizer == "kl":
        vae.scale_factor = VQ_SCALE_FACTOR  # LatentDiffusion's default for a KL first stage too
    if prediction_type is not None:
        pred, source = prediction_type, "argument"
    elif "parameterization" in found:
        pred, source = _YAML_VALUES.get(found["parameterization"], ""), f"yaml {y.name}"
        if not pred:
            raise ValueError(f"{y}: unknown parameterization {found['parameterization']!r}")
    else:
        pred, source = "epsilon", "LDM default"
    schedule.prediction_type = pred
    latent_side = _yaml_int(found, "image_size", y)
    sample_size = latent_side * vae.downsample_factor if latent_side else SAMPLE_SIZE_CLASS_LDM
    cfg = ModelConfig(name="custom", unet=unet, vae=vae, text_encoder=None, schedule=schedule,
                      conditioning="none" if n_classes is None else "class", sample_size=sample_size)
    first = f"VQ-f{vae.downsample_factor}" if vae.regularizer == "vq" else f"KL-f{vae.downsample_factor}"
    kind = "unconditional LDM" if n_classes is None else \
        f"class-conditional LDM ({n_classes} classes, ClassEmbedder)"
    return cfg, f"CompVis {kind} on a {first} first stage, {pred}", source


def v_prediction_heuristic(norm1_bias: torch.Tensor) -> bool:
    """ComfyUI's test: the last U-Net transformer's norm1 bias is spread wider in v-prediction SD v2 models."""
    return float(norm1_bias.float().std()) > V_HEURISTIC_STD


def check_prediction_type(value: str | None) -> str | None:
    if value is not None and value not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {value!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    return value


def match_preset(cfg: ModelConfig) -> str | None:
    """The name of the preset whose architecture, schedule and text settings equal `cfg`'s, if any.

    Ignored in the comparison: the name, provenance and the pooled-output projection (diffusers'
    CLIPTextModel has none, SD v2 single files have one; Stable Diffusion never uses it).
    """

    def canon(c: ModelConfig) -> dict:
        d = c.to_dict()
        d.pop("name"), d.pop("provenance")
        if d["text_encoder"] is not None:
            d["text_encoder"].pop("projection_dim")
        return d

    mine = canon(cfg)
    for name in PRESETS:
        if canon(preset(name)) == mine:
            return name
    return None


@dataclass
class Detection:
    """What `detect` found in a single-file checkpoint, for loading and for `daguerre info`."""

    config: ModelConfig
    variant: str  # e.g. "SD v2.x (OpenCLIP ViT-H text encoder), v-prediction"
    preset: str | None  # the matching preset name, if any
    text_layout: str | None  # "transformers", "openclip" or None
    is_daguerre: bool  # the file carries its own ModelConfig
    has_ema: bool  # the file has a separate EMA copy of the U-Net (model_ema.*)
    use_ema: bool
    prediction_source: str  # "argument", "daguerre metadata", "yaml <path>", "heuristic (...)", "SD v1 default"
    stored_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of tensors
    ignored: list[str] = field(default_factory=list)  # keys present and deliberately not loaded


def detect_checkpoint(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    path: Path | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    value_of: Callable[[str], torch.Tensor] | None = None,
    original_config: Path | None = None,
) -> Detection:
    """Work out the ModelConfig of a single-file checkpoint (tensors may be on the meta device: shapes suffice).

    `value_of(key)` returns the real tensor of `key` when `sd` holds only shapes (used by the
    v-prediction heuristic). `original_config` is the checkpoint's CompVis YAML given for this load
    (`check_original_config`); without it, CHECKPOINT.yaml beside `path` is read if there is one.
    Raises ValueError for files that are not SD-layout checkpoints.
    """
    check_prediction_type(prediction_type)
    keys = list(sd)
    layout = text_layout(keys)
    has_ema = any(k.startswith(EMA_PREFIX) and not is_ignored_bookkeeping(k) for k in keys)
    if use_ema and not has_ema:
        raise ValueError(
            "use_ema: this checkpoint has no separate EMA weights (model_ema.*); it is probably EMA-only "
            "already (e.g. *-emaonly): load it without --ema"
        )
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in sd.values())
    ignored = sorted(k for k in keys if is_ignored(k) and not (use_ema and k.startswith(EMA_PREFIX)))

    if "daguerre_config" in metadata:
        source = f"{path}: the daguerre_config metadata" if path is not None else "the daguerre_config metadata"
        data = parse_json(metadata["daguerre_config"], source)  # ValueError for bad or absurdly nested JSON
        try:
            cfg = ModelConfig.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source} is not a valid ModelConfig: {e}") from None
        source = "daguerre metadata"
        if prediction_type is not None and prediction_type != cfg.schedule.prediction_type:
            cfg.schedule.prediction_type, source = prediction_type, "argument"
        found = match_preset(cfg)
        return Detection(cfg, f"daguerre checkpoint ({cfg.name})", found, layout, True, has_ema, use_ema, source,
                         dict(dtypes), ignored)

    if not any(k.startswith(UNET_PREFIX) for k in keys):
        sample = ", ".join(keys[:3]) or "no tensors"
        raise ValueError(
            f"not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys ({len(keys)} tensors, e.g. {sample}); "
            "a U-Net-only or LoRA file cannot be loaded as a model"
        )
    conditioned = any(k.startswith("cond_stage_model.") for k in keys)
    if layout is None and (CLASS_EMBEDDER_KEY in sd or not conditioned):  # a CompVis class or unconditional LDM
        cfg, variant, source = detect_compvis_ldm(sd, path, prediction_type, value_of, original_config)
        variant += ", full (with EMA)" if has_ema else ""
        return Detection(cfg, variant, None, None, False, has_ema, use_ema, source, dict(dtypes), ignored)
    unet, heads_yaml = sd_heads_from_yaml(infer_unet_config(strip(sd, UNET_PREFIX)), path, original_config)
    vae = infer_vae_config(strip(sd, VAE_PREFIX))
    if layout is None:
        raise ValueError("not a Stable Diffusion checkpoint: no text encoder (cond_stage_model.*) keys")
    prefix = TEXT_PREFIX_CLIP if layout == "transformers" else TEXT_PREFIX_OPENCLIP
    text = infer_text_config(strip(sd, prefix), layout)
    if unet.context_dim != text.width and unet.context_dim != text.projection_dim:
        raise ValueError(
            f"U-Net cross-attention context width {unet.context_dim} does not match the text encoder width {text.width}"
        )
    if unet.in_channels == unet.out_channels:
        concat = None
    elif unet.in_channels == 2 * unet.out_channels + 1:
        concat = "inpaint"  # latent + mask + masked-image latent
    else:
        raise ValueError(
            f"unsupported U-Net: {unet.in_channels} input channels for {unet.out_channels} output channels "
            "(only text-to-image and 9-channel inpainting models are supported)"
        )

    v2 = layout == "openclip"
    if prediction_type is not None:
        pred, source = prediction_type, "argument"
    elif (from_yaml := prediction_from_yaml(path, original_config)) is not None:
        pred, source = from_yaml[0], f"yaml {from_yaml[1].name}"
    elif v2 and (key := UNET_PREFIX + V_HEURISTIC_KEY) in sd and (not sd[key].is_meta or value_of is not None):
        is_v = v_prediction_heuristic(value_of(key) if sd[key].is_meta else sd[key])
        pred = "v_prediction" if is_v else "epsilon"
        source = f"heuristic (std of {V_HEURISTIC_KEY} {'>' if is_v else '<='} {V_HEURISTIC_STD})"
    else:
        pred, source = "epsilon", "SD v1 default" if not v2 else "default (the heuristic needs an SD-size U-Net)"
    big_v2 = v2 and pred == "v_prediction"
    unet.upcast_attention = big_v2
    cfg = ModelConfig(
        name="custom",
        unet=unet,
        vae=vae,
        text_encoder=text,
        schedule=ScheduleConfig(prediction_type=pred),
        conditioning="text",
        concat=concat,
        sample_size=SAMPLE_SIZE_V2_V if big_v2 else SAMPLE_SIZE_V1,
    )
    found = match_preset(cfg)
    cfg.name = found or "custom"
    family = "SD v2.x (OpenCLIP text encoder)" if v2 else "SD v1.x (OpenAI CLIP text encoder)"
    reference = preset("sd21" if v2 else "sd15")
    if (unet.model_channels, unet.channel_mult, unet.context_dim) != (
        reference.unet.model_channels, reference.unet.channel_mult, reference.unet.context_dim
    ) or text.layers != reference.text_encoder.layers:
        family = f"latent diffusion, {'OpenCLIP' if v2 else 'OpenAI CLIP'} text encoder, non-standard size"
    variant = family + (", inpainting" if concat else "") + f", {pred}"
    variant += f", heads from {heads_yaml.name}" if heads_yaml is not None else ""
    variant += ", full (with EMA)" if has_ema else ""
    return Detection(cfg, variant, found, layout, False, has_ema, use_ema, source, dict(dtypes), ignored)

