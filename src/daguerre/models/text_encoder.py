"""The CLIP text transformer, tau_theta of Stable Diffusion (Radford et al. 2021; Rombach et al. 2022, Sec. 3.3).

A pre-LayerNorm causal transformer over token + position embeddings (GPT-2 style, Radford et al. 2019).
Stable Diffusion conditions its U-Net on the per-token hidden states: SD v1 on the last layer of OpenAI
CLIP ViT-L/14, SD v2 on the penultimate layer of OpenCLIP ViT-H/14, both followed by the final
LayerNorm. The pooled output is the final-layer state at the first end-of-text token, optionally
projected by `text_projection`. Module names are those of transformers' `CLIPTextModel`, which is
also the SD v1 single-file layout after stripping `cond_stage_model.transformer.`.
"""

from __future__ import annotations

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
    """Causal multi-head self-attention with separate q, k, v projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, width)
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
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
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


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
        skip = cfg.skip_layers if skip_layers is None else skip_layers
        if not 0 <= skip < cfg.layers:
            raise ValueError(f"skip_layers {skip} must be in 0..{cfg.layers - 1}")
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_length:
            raise ValueError(f"input_ids must be (batch, <= {cfg.max_length}) token ids, got {tuple(input_ids.shape)}")
        model = self.text_model
        x = model.embeddings(input_ids)  # (B, T, width)
        stop = cfg.layers - skip  # hidden = output of layer `stop` (1-based)
        hidden = None
        for i, layer in enumerate(model.encoder.layers[: cfg.layers if output_pooled else stop]):
            x = self._run_layer(layer, x)
            if i + 1 == stop:
                hidden = model.final_layer_norm(x)
        if not output_pooled:
            return TextEncoderOutput(hidden, None)
        last = hidden if skip == 0 else model.final_layer_norm(x)  # (B, T, width)
        is_end = input_ids == cfg.eos_token_id  # pool at the first end token; the last position if none
        first_end = torch.where(is_end.any(1), is_end.int().argmax(1), input_ids.shape[1] - 1)
        pooled = last[torch.arange(last.shape[0], device=last.device), first_end]  # (B, width)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, projection_dim)
        return TextEncoderOutput(hidden, pooled)
