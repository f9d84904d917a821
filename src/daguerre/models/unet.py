"""The cross-attention U-Net of latent diffusion (Rombach et al. 2022, section 3.3 and appendix E.2).

A time-conditioned U-Net (Ronneberger et al. 2015; the ADM variant of Dhariwal & Nichol 2021) whose
ResNet blocks receive the sinusoidal timestep embedding and whose spatial transformers attend to a
conditioning sequence tau_theta(y) (cross-attention, LDM eq. 3). Module names are those of CompVis
`ldm/modules/diffusionmodules/openaimodel.py`, so `state_dict()` keys are exactly the Stable Diffusion
single-file keys without the `model.diffusion_model.` prefix and an SD v1.x / v2.x U-Net loads with a
plain `load_state_dict(strict=True)`.

Layout for SD 1.5 (channel_mult (1, 2, 4, 4), two ResNet blocks per level, attention at levels 0-2):
    input_blocks.0            conv_in                                  (B, 320, H, W)
    input_blocks.1-2          [ResBlock, SpatialTransformer] x 2       (B, 320, H, W)
    input_blocks.3            Downsample                               (B, 320, H/2, W/2)
    ...                       one group per level, no Downsample after the last
    middle_block              ResBlock, SpatialTransformer, ResBlock   (B, 1280, H/8, W/8)
    output_blocks.0-11        [ResBlock(cat skip), SpatialTransformer?, Upsample?] x 3 per level
    out                       GroupNorm, SiLU, conv_out                (B, 4, H, W)

Feature reuse (DeepCache, Ma et al., CVPR 2024): a `FeatureCache` passed to `forward` splits the network at a
skip branch into a shallow path (the first `depth` input blocks and the last `depth` output blocks) and the
deep part between them. Every `interval`-th call runs everything and caches the deep part's output (the input
of the shallowest `depth` output blocks, before its skip is concatenated); the calls between run only the
shallow path and take the deep features from the cache. The cache belongs to one sampling run, never to the
model, so concurrent runs do not share it.

Token merging (ToMe for SD, Bolya & Hoffman 2023): `forward(..., tome=ratio)` runs the self-attention of the
transformers at the highest resolution that has attention (the latent's full resolution in Stable Diffusion)
on the tokens left after merging `ratio` of them (`daguerre.nn.tome`), and unmerges its output; 0 (the
default) is the exact path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import GligenConfig, UNetConfig
from ..nn.attention import attention
from ..nn.embeddings import timestep_embedding
from ..nn.tome import Merge, bipartite_merge
from .gligen import GatedSelfAttention, Grounding, GroundingNet
from .layout import LayoutEncoder

TIME_EMBED_MULT = 4  # time embedding width = TIME_EMBED_MULT * model_channels
FF_MULT = 4  # transformer feed-forward inner width = FF_MULT * width
RESNET_NORM_EPS = 1e-5  # GroupNorm eps in ResNet blocks and the output head (torch default, CompVis GroupNorm32)
TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm eps in front of each spatial transformer (CompVis `Normalize`)
LAYER_NORM_EPS = 1e-5  # LayerNorm eps inside the transformer blocks


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (LDM `zero_module`): residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """A pre-activation ResNet block whose bias is shifted by the projected timestep embedding (DDPM, ADM)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=RESNET_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=RESNET_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, 1, 1) broadcast over space
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of a sequence to itself or to a context (LDM eq. 3: Q from x, K and V from tau(y)).

    `recorder` (None, the default, costs nothing) is called as `recorder(q, k, context, heads)` at every call
    with a context, before the attention: a reader of the cross-attention probabilities
    (`daguerre.explain.attention`), which it computes itself, since the fused attention does not return them."""

    recorder: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None] | None = None

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, dropout: float, upcast: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        record = self.recorder is not None and context is not None
        context = x if context is None else context  # self-attention
        q = self.to_q(x)  # (B, T, heads*d)
        k, v = self.to_k(context), self.to_v(context)  # (B, S, heads*d)
        if record:
            self.recorder(q, k, context, self.heads)
        return self.to_out(attention(q, k, v, self.heads, upcast=self.upcast))  # (B, T, dim)


class GEGLU(nn.Module):
    """Gated GELU unit x W * GELU(x V) (Shazeer 2020, "GLU variants improve transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, dim_out) each
        if torch.is_grad_enabled():
            return h * F.gelu(gate)
        # without gradients the product goes into GELU's output: the same values (a product is commutative), one
        # (B, T, dim_out) tensor fewer at once (SD 1.5 at 512x512: 20 MiB, 75 MiB off the int8 sampling peak)
        return F.gelu(gate).mul_(h)


class FeedForward(nn.Module):
    """The transformer MLP with a GEGLU input layer (CompVis `FeedForward(glu=True)`)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        inner = FF_MULT * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gated_layer(dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool, g: GligenConfig
                ) -> GatedSelfAttention:
    """A GLIGEN gated layer `dim` wide for the adapter `g` (models/gligen.py): its own self-attention, and its
    feed-forward with `attend = "all"`, gated by tanh(alpha) = 0 at first; visual and in-box positions if `g` asks."""
    return GatedSelfAttention(dim, context_dim, CrossAttention(dim, dim, heads, head_dim, 0.0, upcast),
                              FeedForward(dim, 0.0) if g.attend == "all" else None,
                              g.fourier_freqs if g.visual_positions else 0, g.attend, g.shape_freqs)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context (if any), feed-forward; with
    `gligen`, GLIGEN's gated self-attention over the image and the grounding tokens between the first two."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float, upcast: bool,
                 gligen: GligenConfig | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, dropout, upcast)
        if gligen is not None:  # a GLIGEN adapter's gated layer between the self- and the cross-attention
            self.fuser = gated_layer(dim, heads, head_dim, context_dim, upcast, gligen)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout, upcast) if context_dim else None
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS) if context_dim else None
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None,
                merge: Callable[[torch.Tensor], Merge] | None = None, objs: Grounding | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        y = self.norm1(x)
        if merge is None:
            x = x + self.attn1(y)  # (B, HW, dim)
        else:  # token merging: self-attention on the merged tokens (B, HW - r, dim), unmerged after
            plan = merge(y)
            x = x + plan.unmerge(self.attn1(plan.merge(y)))
        if objs is not None:  # GLIGEN: the grounding tokens (B, N, context_dim), read by the gated self-attention
            x = self.fuser(x, objs, grid)  # grid: the map's (h, w), for visual positions and box masks
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer over the H*W positions of a feature map, added back as a residual (LDM appendix E.2)."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        heads, head_dim = cfg.heads_at(channels)
        inner = heads * head_dim
        self.use_linear = cfg.use_linear_proj
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if self.use_linear:  # SD v2
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = _zero_(nn.Linear(inner, channels))
        else:  # SD v1: 1x1 convolutions
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = _zero_(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, cfg.context_dim, cfg.dropout, cfg.upcast_attention,
                                  cfg.gligen)
            for _ in range(cfg.transformer_depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, tome: TokenMerging | None = None,
                objs: Grounding | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        merge = tome.planner(h, w) if tome is not None else None  # None but at the latent's full resolution
        y = self.norm(x)  # (B, C, H, W)
        if not self.use_linear:
            y = self.proj_in(y)  # (B, inner, H, W)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C or inner)
        if self.use_linear:
            y = self.proj_in(y)  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context, merge, objs, (h, w))
        if self.use_linear:
            y = self.proj_out(y)  # (B, HW, C)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C or inner, H, W), channels-last strides
        if not self.use_linear:
            y = self.proj_out(y)  # (B, C, H, W)
        return x + y


class GroundingLayer(nn.Module):
    """A GLIGEN gated layer on its own (`GligenConfig.extra_levels`), after a ResNet block of a level without a
    transformer: the map's positions as visual tokens, the grounding tokens read by `GatedSelfAttention` (its
    gates at 0 at first: the identity), added back as a residual; without a layout it does not run."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.fuser = gated_layer(channels, *cfg.heads_at(channels), cfg.context_dim, cfg.upcast_attention, cfg.gligen)

    def forward(self, x: torch.Tensor, objs: Grounding | None) -> torch.Tensor:
        if objs is None:
            return x
        b, c, h, w = x.shape
        y = self.fuser(x.permute(0, 2, 3, 1).reshape(b, h * w, c), objs, (h, w))  # (B, HW, C)
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides


class AttentionBlock(nn.Module):
    """ADM's self-attention block (Dhariwal & Nichol 2021; CompVis `AttentionBlock` with the legacy head order):
    x + proj_out(attention(qkv(GN(x)))) over the H*W positions, `qkv` and `proj_out` 1-D convolutions, the
    channels of qkv grouped per head as [q, k, v]; the unconditional CompVis LDMs use it (no context)."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads_at(channels)
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=RESNET_NORM_EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat)).reshape(b, self.heads, 3, self.head_dim, h * w)  # per head: q, k, v
        q, k, v = (qkv[:, :, i].reshape(b, c, h * w).transpose(1, 2) for i in range(3))  # (B, HW, C)
        out = attention(q, k, v, self.heads, upcast=True).transpose(1, 2)  # (B, C, HW)
        return (flat + self.proj_out(out)).reshape(b, c, h, w)


def _attention_layer(channels: int, cfg: UNetConfig) -> nn.Module:
    """The attention of a level: a spatial transformer, or ADM's attention block (`cfg.attention_block`)."""
    return AttentionBlock(channels, cfg) if cfg.attention_block == "adm" else SpatialTransformer(channels, cfg)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Double the resolution (or match `size`, the skip connection's, for odd sizes): nearest, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: the time embedding, the context, an output size, the
    token merging of a run."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, size: torch.Size | None = None,
        tome: TokenMerging | None = None, objs: Grounding | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, tome, objs)
            elif isinstance(layer, GroundingLayer):
                x = layer(x, objs)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclasses.dataclass(frozen=True)
class TokenMerging:
    """Token merging (ToMe for SD, Bolya & Hoffman 2023; `daguerre.nn.tome`) in the self-attention of the
    transformers of resolution `size` (h, w), the highest that has attention: `ratio` of their tokens merged away."""

    ratio: float
    size: tuple[int, int]

    def planner(self, h: int, w: int) -> Callable[[torch.Tensor], Merge] | None:
        """How the transformers of an h x w map merge their tokens (None: they do not)."""
        if self.ratio <= 0 or (h, w) != self.size:
            return None
        return lambda y: bipartite_merge(y, h, w, self.ratio)


@dataclasses.dataclass
class FeatureCache:
    """The state of DeepCache feature reuse for one sampling run (module docstring): the deep part of the U-Net
    runs on every `interval`-th call, the shallow path of `depth` input and output blocks on every call.

    A call whose input differs in shape from the cached one's (the batch of classifier-free guidance changing
    size under guidance truncation, the two separate calls of prompts of different lengths) runs everything
    and starts the count again, so features are only reused for the same batch rows. `max_t` limits reuse to
    the calls whose timesteps all lie below it (the low-noise end of sampling; None: every call may reuse).
    `deep_calls` counts the calls that ran the deep part; `calls` all of them."""

    interval: int
    depth: int = 1
    max_t: float | None = None
    calls: int = 0
    deep_calls: int = 0
    age: int = 0  # calls since the cached features were computed
    key: tuple | None = None  # the shapes and dtypes the features were computed for
    features: torch.Tensor | None = None

    def __post_init__(self):
        if self.interval < 1 or self.depth < 1:
            raise ValueError(f"DeepCache interval and depth must be >= 1, got {self.interval} and {self.depth}")

    def reuse(self, key: tuple, t: torch.Tensor) -> bool:
        """Whether this call (of shapes `key`, timesteps `t`) takes the cached deep features (else it runs the
        deep part and stores them)."""
        self.calls += 1
        allowed = self.max_t is None or bool((t < self.max_t).all())
        if allowed and self.features is not None and key == self.key and self.age + 1 < self.interval:
            self.age += 1
            return True
        self.deep_calls += 1
        self.key, self.age, self.features = key, 0, None
        return False


def fewer_calls_args(interval: int, depth: int, tome_ratio: float = 0.0, max_t: float | None = None
                     ) -> dict[str, Any]:
    """The `forward` keyword arguments of one new sampling run with DeepCache at `interval` (1: off; reusing
    only below timestep `max_t` if given) and token merging at `tome_ratio` (0: off); none when both are off."""
    args: dict[str, Any] = {} if interval == 1 else {"cache": FeatureCache(interval, depth, max_t)}
    if tome_ratio > 0:
        args["tome"] = tome_ratio
    return args


def _class_context(cfg: UNetConfig) -> bool:
    """Whether the class label's embedding is the cross-attention context (CompVis `ClassEmbedder`)."""
    return cfg.num_classes is not None and cfg.class_embedding == "context"


class UNetModel(nn.Module):
    """The LDM / Stable Diffusion U-Net eps_theta(z_t, t, tau(y)) (Rombach et al. 2022, eq. 2-3) of a UNetConfig.

    `forward(x, timesteps, context, y)`: x (B, in_channels, H, W) latents; timesteps (B,) or a scalar,
    integer or fractional; context (B, T, context_dim) when `cfg.context_dim` is set; y (B,) integer
    labels when `cfg.num_classes` is set; `layout` (B, objects, tokens) layout tokens when `cfg.layout` is
    set, encoded by `layout_net` and appended to the context, or with `cfg.gligen` (B, objects, 5 + phrase_dim)
    grounding inputs (models/gligen.py; None: the base model) -> (B, out_channels, H, W) in the parameters'
    dtype. Inputs are cast to the parameters' dtype. Set `gradient_checkpointing = True` to recompute each block in the
    backward pass while training (less memory, about a third more compute).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.transformer_depth < 1 or cfg.num_res_blocks < 1 or not cfg.channel_mult:
            raise ValueError(f"UNetConfig: transformer_depth, num_res_blocks and channel_mult must be positive: {cfg}")
        bad = [lv for lv in cfg.attention_levels if not 0 <= lv < len(cfg.channel_mult)]
        if bad:
            raise ValueError(f"UNetConfig.attention_levels {bad} outside the {len(cfg.channel_mult)} levels")
        cfg.heads_at(cfg.model_channels)  # raises unless exactly one of num_heads / head_dim is set
        self.cfg = dataclasses.replace(cfg)  # a copy: later edits to the caller's config do not reach the model
        self.gradient_checkpointing = False
        mc, groups, drop = cfg.model_channels, cfg.norm_groups, cfg.dropout
        emb_dim = TIME_EMBED_MULT * mc

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:  # added to the time embedding, or (class_embedding "context") the context
            self.label_emb = nn.Embedding(cfg.num_classes, cfg.context_dim if _class_context(cfg) else emb_dim)
        if cfg.layout is not None:  # a layout model: the layout's tokens join the context (models/layout.py)
            if cfg.layout.width != cfg.context_dim:
                raise ValueError(f"UNetConfig.layout.width {cfg.layout.width} must be the context_dim "
                                 f"({cfg.context_dim}): the layout's tokens are read by cross-attention")
            self.layout_net = LayoutEncoder(cfg.layout)
        if cfg.gligen is not None:  # a GLIGEN adapter: each object one grounding token (models/gligen.py)
            self.position_net = GroundingNet(cfg.gligen, cfg.context_dim)

        extra_levels = cfg.gligen.extra_levels if cfg.gligen is not None else ()
        # encoder: conv_in, then num_res_blocks x [ResBlock, SpatialTransformer?] per level, Downsample between levels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # channels of every input block's output, consumed by the decoder in reverse
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups, drop)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(_attention_layer(ch, cfg))
                if level in extra_levels:  # GLIGEN's gated layer where there is no transformer to hold it
                    layers.append(GroundingLayer(ch, cfg))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups, drop),
            _attention_layer(ch, cfg),
            ResBlock(ch, emb_dim, ch, groups, drop),
        )

        # decoder: num_res_blocks + 1 x [ResBlock(cat skip), SpatialTransformer?] per level, Upsample between levels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups, drop)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(_attention_layer(ch, cfg))
                if level in extra_levels:
                    layers.append(GroundingLayer(ch, cfg))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=RESNET_NORM_EPS),
            nn.SiLU(),
            _zero_(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        cache: FeatureCache | None = None,
        tome: float = 0.0,
        layout: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg, dtype, b = self.cfg, self.dtype, x.shape[0]
        objs = None
        if cfg.gligen is not None and layout is not None:  # GLIGEN: the objects' grounding tokens; none: the base
            layout = layout.to(x.device)
            objs = Grounding(self.position_net(layout).to(dtype), layout[..., :4], layout[..., 4])  # (B, N, ...)
            layout = None
        elif (layout is None) != (cfg.layout is None):
            raise ValueError(f"UNetModel with layout={cfg.layout is not None}: pass layout tokens exactly when the "
                             "model reads layouts")
        if (context is None) != (cfg.context_dim is None or _class_context(cfg)):
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"UNetModel with context_dim={cfg.context_dim} got context={got}: "
                "pass a (B, T, context_dim) context exactly when context_dim is set (and the context is no class's)"
            )
        if (y is None) != (cfg.num_classes is None):
            raise ValueError(
                f"UNetModel with num_classes={cfg.num_classes}: pass class labels y exactly when num_classes is set"
            )
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.reshape(1).expand(b) if t.numel() == 1 else t  # (B,)
        if t.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or of shape ({b},), got {tuple(t.shape)}")

        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))  # (B, 4*mc)
        if y is not None and _class_context(cfg):  # CompVis ClassEmbedder: the label is the context
            context = self.label_emb(y.to(x.device))[:, None, :]  # (B, 1, context_dim)
        elif y is not None:
            emb = emb + self.label_emb(y.to(x.device))
        if context is not None:
            context = context.to(dtype)  # (B, T, context_dim)
        if layout is not None:  # the layout's tokens after the prompt's: (B, T + objects * tokens, context_dim)
            context = torch.cat([context, self.layout_net(layout.to(x.device)).to(dtype)], dim=1)

        h = x.to(dtype)  # (B, C_in, H, W)
        if not 0.0 <= tome < 1.0:
            raise ValueError(f"token merging ratio must be in [0, 1), got {tome}")
        merging = None
        if tome > 0 and cfg.attention_levels:
            size = tuple(h.shape[-2:])
            for _ in range(min(cfg.attention_levels)):  # each Downsample: ceil(n / 2)
                size = tuple(-(-n // 2) for n in size)
            merging = TokenMerging(tome, size)
        shallow = 0  # blocks at each end that run on every call (DeepCache); 0: no split
        reuse = False
        if cache is not None:
            if not 1 <= cache.depth < len(self.input_blocks):
                raise ValueError(f"DeepCache depth {cache.depth} must be in [1, {len(self.input_blocks) - 1}] for "
                                 f"this U-Net of {len(self.input_blocks)} input blocks")
            shallow = cache.depth
            key = (tuple(h.shape), None if context is None else tuple(context.shape), dtype, objs is None)
            reuse = cache.reuse(key, t)
        skips = []
        for block in self.input_blocks[:shallow] if reuse else self.input_blocks:
            h = self._run(block, h, emb, context, None, merging, objs)
            skips.append(h)
        deep = len(self.output_blocks) - shallow
        if reuse:
            h = cache.features  # (B, C, h, w): the deep part's output of the last full call
        else:
            h = self._run(self.middle_block, h, emb, context, None, merging, objs)  # (B, C_max, H/f, W/f)
            h = self._up(self.output_blocks[:deep], h, skips, emb, context, merging, objs)
            if cache is not None:
                cache.features = h
        h = self._up(self.output_blocks[deep:], h, skips, emb, context, merging, objs)
        return self.out(h)  # (B, C_out, H, W)

    def _up(self, blocks, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
            context: torch.Tensor | None, merging: TokenMerging | None, objs: Grounding | None = None
            ) -> torch.Tensor:
        """Run decoder `blocks`, each on h concatenated with the last of `skips` (popped)."""
        for block in blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            size = skips[-1].shape[-2:] if skips else None  # an Upsample must land on the next skip's size
            h = self._run(block, h, emb, context, size, merging, objs)
        return h


def cross_attention_layers(unet: nn.Module) -> dict[str, CrossAttention]:
    """The U-Net's cross-attention layers (each transformer block's `attn2`) by the name of their transformer
    (e.g. "output_blocks.3.1", SD's CompVis names; a transformer of depth > 1: ".transformer_blocks.i" added)."""
    found = {}
    for name, m in unet.named_modules():
        if isinstance(m, CrossAttention) and name.endswith(".attn2"):
            block = name.removesuffix(".attn2")
            found[block.removesuffix(".transformer_blocks.0")] = m
    return found


def layers_named(found: Iterable[str], names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the layers of `found` that `names` pick, each name a layer's or its prefix at a dot: "output_blocks" is every
    decoder layer; the names that pick none)."""
    found, names = list(found), list(names)
    picks = [n for n in found if any(n == p or n.startswith(p + ".") for p in names)]
    return picks, [p for p in names if not any(n == p or n.startswith(p + ".") for n in found)]
