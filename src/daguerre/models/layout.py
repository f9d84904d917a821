"""The layout encoder: tau_theta of a layout-to-image model (LDM, Rombach et al. 2022, Sec. 4.3.1).

LDM turns a bounding-box layout into a token sequence, each object its class and its box's corners
quantised on a grid, and reads it with a transformer whose outputs the U-Net's cross-attention attends to.
Here each object is `phrase_words` word tokens (its phrase, padded) and four corner tokens (x0, y0, x1, y1
on `grid` cells; `data.layout.encode_layout`); a token's embedding is its word's (or its corner cell's)
plus a learned embedding of its place in the object (word k, corner x0, ...) and of the object's slot.
The slot embedding only tells which tokens belong together: a bidirectional transformer reads them all.
Empty slots are the empty object (word 0, corner `grid`), learned like CLIP's padding tokens. The output
(B, max_objects * (phrase_words + 4), width) follows the prompt's context in the U-Net's cross-attention
(`UNetModel.layout_net`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayoutConfig
from ..nn.attention import attention

CORNERS = 4  # x0, y0, x1, y1
LAYER_NORM_EPS = 1e-5


class LayoutBlock(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); attention over every token."""

    def __init__(self, cfg: LayoutConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # (B, T, width) each
        x = x + self.proj(attention(q, k, v, self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LayoutEncoder(nn.Module):
    """(B, max_objects, phrase_words + 4) layout tokens -> (B, max_objects * (phrase_words + 4), width)."""

    def __init__(self, cfg: LayoutConfig):
        super().__init__()
        self.cfg = cfg
        tokens = cfg.phrase_words + CORNERS
        self.word_embedding = nn.Embedding(len(cfg.vocabulary) + 1, cfg.width)  # row 0: no word
        self.corner_embedding = nn.Embedding(cfg.grid + 1, cfg.width)  # row `grid`: no box
        self.place_embedding = nn.Parameter(torch.randn(tokens, cfg.width) * 0.02)  # word k / corner x0, ...
        self.slot_embedding = nn.Parameter(torch.randn(cfg.max_objects, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(LayoutBlock(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, n, t = layout.shape
        if (n, t) != (cfg.max_objects, cfg.phrase_words + CORNERS):
            raise ValueError(f"layout tokens of shape {tuple(layout.shape)}; this encoder reads (B, {cfg.max_objects}, "
                             f"{cfg.phrase_words + CORNERS})")
        words = self.word_embedding(layout[..., :cfg.phrase_words])  # (B, N, P, width)
        corners = self.corner_embedding(layout[..., cfg.phrase_words:])  # (B, N, 4, width)
        x = torch.cat([words, corners], dim=2) + self.place_embedding + self.slot_embedding[:, None]  # (B, N, T, w)
        x = x.reshape(b, n * t, -1)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)  # (B, N*T, width)
