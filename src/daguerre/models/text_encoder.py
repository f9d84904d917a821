"""The CLIP text transformer, tau_theta of Stable Diffusion (Radford et al. 2021; Rombach et al. 2022, Sec. 3.3).

A pre-LayerNorm causal transformer over token + position embeddings (GPT-2 style, Radford et al. 2019).
Stable Diffusion conditions its U-Net on the per-token hidden states: SD v1 on the last layer of OpenAI
CLIP ViT-L/14, SD v2 on the penultimate layer of OpenCLIP ViT-H/14, both followed by the final
LayerNorm. The pooled output is the final-layer state at the first end-of-text token, optionally
projected by `text_projection`. Module names are those of transformers' `CLIPTextModel`, which is
also the SD v1 single-file layout after stripping `cond_stage_model.transformer.`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextEncoderConfig
from ..nn.attention import attention

QUICK_GELU_SCALE = 1.702  # OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)
ACTIVATIONS = ("quick_gelu", "gelu")


class TextEncoderOutput(NamedTuple):
    """`hidden` (B, T, width): the conditioning sequence; `pooled` (B, width or projection_dim) or None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the activation OpenAI CLIP was trained with."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections; causal (CLIP) unless told otherwise."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, width)
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)): a pre-LN residual block."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, cfg.causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings. With a pruned vocabulary (`cfg.token_ids`), ids are first mapped to
    their rows; every id outside the kept set maps to the last row, which is zero (see `prune_vocabulary`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.embedding_rows, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        row_of = None  # token id -> row, derived from the config (not saved)
        if cfg.token_ids is not None:
            ids = cfg.token_ids
            if len(set(ids)) != len(ids) or not all(0 <= i < cfg.vocab_size for i in ids):
                raise ValueError(f"text encoder token_ids must be distinct ids in 0..{cfg.vocab_size - 1}")
            row_of = torch.full((cfg.vocab_size,), len(ids), dtype=torch.long)
            row_of[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        self.register_buffer("row_of", row_of, persistent=False)
        self.vocab_size = cfg.vocab_size
        # (n, width) vectors of ids vocab_size .. vocab_size + n - 1: textual-inversion embeddings
        # (daguerre.lora.embeddings); not a parameter or buffer, never saved
        self.extra: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        beyond = input_ids >= self.vocab_size
        ids = input_ids.clamp(max=self.vocab_size - 1) if self.extra is not None else input_ids
        rows = ids if self.row_of is None else self.row_of[ids]
        tokens = self.token_embedding(rows)
        if self.extra is not None and bool(beyond.any()):
            extra = self.extra[(input_ids - self.vocab_size).clamp(0, len(self.extra) - 1)].to(tokens.dtype)
            tokens = torch.where(beyond[..., None], extra, tokens)
        return tokens + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


def check_encoder_inputs(cfg: TextEncoderConfig, input_ids: torch.Tensor, skip_layers: int | None) -> int:
    """The layers to skip from the top (`skip_layers`, else the config's) once the inputs are checked."""
    skip = cfg.skip_layers if skip_layers is None else skip_layers
    if not 0 <= skip < cfg.layers:
        raise ValueError(f"skip_layers {skip} must be in 0..{cfg.layers - 1}")
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_length:
        raise ValueError(f"input_ids must be (batch, <= {cfg.max_length}) token ids, got {tuple(input_ids.shape)}")
    return skip


def run_layers(
    layers: nn.ModuleList, x: torch.Tensor, stop: int, run_all: bool,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of layer `stop`, 1-based; output of the last layer run): x through `layers` in turn, each as
    `call(layer, x)`, all of them when `run_all` (the pooled output needs the last), else the first `stop`."""
    hidden = x
    for i, layer in enumerate(layers if run_all else layers[:stop], start=1):
        x = call(layer, x)
        if i == stop:
            hidden = x
    return hidden, x


def end_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) the position of each row's first end token (where CLIP pools), the last position if it has none."""
    is_end = input_ids == eos_token_id
    return torch.where(is_end.any(1), is_end.int().argmax(1), input_ids.shape[1] - 1)


class CLIPTextEncoder(nn.Module):
    """CLIP text encoder: ids (B, T) -> hidden states of layer `layers - skip_layers` after the final LN.

    `skip_layers` 0 is the last layer (SD v1), 1 the penultimate (SD v2); A1111's "clip skip N" is N - 1.
    Set `gradient_checkpointing = True` to recompute each layer in the backward pass when training.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {cfg.activation!r} is not supported: use one of {ACTIVATIONS}")
        if cfg.width % cfg.heads:
            raise ValueError(f"text encoder width {cfg.width} is not divisible by heads {cfg.heads}")
        if not 0 <= cfg.skip_layers < cfg.layers:
            raise ValueError(f"skip_layers {cfg.skip_layers} must be in 0..{cfg.layers - 1}")
        self.config = cfg
        self.gradient_checkpointing = False
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None
        )

    def _run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def forward(
        self, input_ids: torch.Tensor, skip_layers: int | None = None, output_pooled: bool = True
    ) -> TextEncoderOutput:
        """Encode (B, T) token ids; T is at most `max_length`. `pooled` is None when `output_pooled` is False."""
        cfg = self.config
        skip = check_encoder_inputs(cfg, input_ids, skip_layers)
        model = self.text_model
        x = model.embeddings(input_ids)  # (B, T, width)
        hidden, x = run_layers(model.encoder.layers, x, cfg.layers - skip, output_pooled, self._run_layer)
        hidden = model.final_layer_norm(hidden)
        if not output_pooled:
            return TextEncoderOutput(hidden, None)
        last = hidden if skip == 0 else model.final_layer_norm(x)  # (B, T, width)
        pooled = last[torch.arange(last.shape[0], device=last.device), end_positions(input_ids, cfg.eos_token_id)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, projection_dim)
        return TextEncoderOutput(hidden, pooled)


def unknown_token_ids(encoder: CLIPTextEncoder, ids: list[int]) -> list[int]:
    """The ids in `ids` that `encoder`'s pruned vocabulary has no row for (empty for a full vocabulary)."""
    kept = encoder.config.token_ids
    if kept is None:
        return []
    known = set(kept)
    return sorted({i for i in ids if i not in known and i < encoder.config.vocab_size})  # beyond: embeddings


@torch.no_grad()
def prune_vocabulary(encoder: CLIPTextEncoder, keep: Iterable[int]) -> CLIPTextEncoder:
    """A copy of `encoder` whose token-embedding table keeps only the rows of `keep` (plus start, end and
    pad tokens), and one shared row of zeros that every other id maps to.

    A text encoder trained jointly on a small caption set only ever updates the rows of the tokens its
    captions contain; the other ~49k rows stay at their random initialisation, so they carry no meaning
    and dominate the file size. Pruning keeps outputs identical for every prompt made of kept tokens.
    """
    cfg = encoder.config
    old_rows = list(range(cfg.vocab_size)) if cfg.token_ids is None else list(cfg.token_ids)
    have = set(old_rows)
    ids = sorted(({int(i) for i in keep} | {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}) & have)
    new_cfg = dataclasses.replace(cfg, token_ids=tuple(ids))
    weight = encoder.text_model.embeddings.token_embedding.weight
    pruned = CLIPTextEncoder(new_cfg).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in encoder.state_dict().items() if not k.endswith("token_embedding.weight")}
    position = {row: i for i, row in enumerate(old_rows)}
    table = torch.zeros(len(ids) + 1, cfg.width, dtype=weight.dtype, device=weight.device)
    table[: len(ids)] = weight[[position[i] for i in ids]]
    state["text_model.embeddings.token_embedding.weight"] = table
    pruned.load_state_dict(state)
    pruned.train(encoder.training)
    return pruned


@torch.no_grad()
def expand_vocabulary(encoder: CLIPTextEncoder) -> CLIPTextEncoder:
    """The full-vocabulary equivalent of a pruned encoder (every unknown id gets the zero row), e.g. for
    export to transformers' CLIPTextModel, which has one row per id. A full encoder is returned as is."""
    cfg = encoder.config
    if cfg.token_ids is None:
        return encoder
    weight = encoder.text_model.embeddings.token_embedding.weight
    full = CLIPTextEncoder(dataclasses.replace(cfg, token_ids=None)).to(device=weight.device, dtype=weight.dtype)
    state = encoder.state_dict()
    state["text_model.embeddings.token_embedding.weight"] = weight[encoder.text_model.embeddings.row_of]
    full.load_state_dict(state)
    full.train(encoder.training)
    return full
