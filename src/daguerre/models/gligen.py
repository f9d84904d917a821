"""The GLIGEN adapter (Li et al., "GLIGEN: Open-Set Grounded Text-to-Image Generation", CVPR 2023): boxes and their
phrases read by gated self-attention layers added to a frozen text-to-image U-Net (issue 18's second layout route,
docs/layout.md).

Each object of a layout is one grounding token: the Fourier features of its box (x0, y0, x1, y1 in [0, 1]; sin and
cos at `fourier_freqs` frequencies 100^(k / fourier_freqs) per coordinate, GLIGEN's `FourierEmbedder`)
concatenated with its phrase embedding (the base model's own text encoder, pooled as GLIGEN pools CLIP: the
final-layer state at the end-of-text token, `phrase_embeddings`; or, daguerre's option `phrase_pool`, also or
instead the last token's state or the tokens' mean), through an MLP to the context width
(`GroundingNet`, GLIGEN's `PositionNet`). A padding object (mask 0) takes the learned null features instead
(GLIGEN's null positive and null position features), so a layout always has `max_objects` tokens.

Every transformer block of the U-Net gets a `GatedSelfAttention` (GLIGEN's `GatedSelfAttentionDense`) between its
self-attention and its cross-attention: self-attention over [visual tokens; grounding tokens projected to the
block's width], only the visual outputs kept, added as x + tanh(alpha_attn) attn(...), then a feed-forward added
as x + tanh(alpha_dense) ff(...). Both gates start at 0, so a fresh adapter leaves the base model's output exactly
unchanged, and without a layout the layers do not run at all (the model is the base model).

With `visual_positions` (daguerre's option, off for GLIGEN's own checkpoints), each visual token the gated
self-attention reads also carries its position: the Fourier features of its own cell as a box (`cell_boxes`), in
the grounding tokens' coordinates, through a linear layer (`fuser.position`). GLIGEN relies on
the position that SD's deep features carry implicitly; at a small model's 8x8 and 4x4 maps they hardly do, and a
box must then be matched to the positions it covers by the attention alone. With `attend = "objects"` (also
daguerre's), each image token attends to the grounding tokens and to itself only, and there is no feed-forward
branch: the adapter can change the image only through the objects (GLIGEN's self-attention over the image and
its feed-forward also let it fine-tune the frozen model whatever the boxes say, docs/layout.md). With
`shape_freqs` (daguerre's, with "objects" or "boxes"), what an object gives a position also depends on where in
its box the position lies (`in_box_features`, through a small MLP with the object's token, `fuser.shape`): an
object's value is otherwise one vector over its whole box, which places an object but hardly draws its outline.

A layout reaches the U-Net as one float tensor (B, max_objects, GROUNDING_FIELDS + phrase_dim): per object its
box (4), its mask (1: an object, 0: padding) and its phrase embedding (`grounding_tensor`), the `layout`
argument of `UNetModel.forward` for a model with `unet.gligen`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import GligenConfig
from .text_encoder import end_positions

GROUNDING_FIELDS = 5  # box (x0, y0, x1, y1) and mask, before the phrase embedding
FOURIER_TEMPERATURE = 100.0  # GLIGEN's FourierEmbedder: frequencies temperature^(k / n), k = 0..n-1
ADAPTER_PREFIXES = ("position_net.",)  # U-Net parameter names of the adapter (and every `.fuser.`)
FUSER = ".fuser."


def fourier_features(boxes: torch.Tensor, freqs: int) -> torch.Tensor:
    """(..., 4) box coordinates -> (..., 4 * 2 * freqs): sin and cos of each coordinate at `freqs` frequencies
    100^(k / freqs), grouped per frequency as [sin(f x), cos(f x)] over the 4 coordinates (GLIGEN's order)."""
    bands = FOURIER_TEMPERATURE ** (torch.arange(freqs, dtype=torch.float32, device=boxes.device) / freqs)
    x = boxes.float()[..., None, :] * bands[:, None]  # (..., freqs, 4)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)  # (..., freqs * 8)


class GroundingNet(nn.Module):
    """GLIGEN's `PositionNet`: (B, N, 5 + phrase_dim) objects -> (B, N, width) grounding tokens; padding objects
    (mask 0) take the learned null phrase and null position features."""

    def __init__(self, cfg: GligenConfig, width: int):
        super().__init__()
        self.freqs = cfg.fourier_freqs
        position_dim = 8 * cfg.fourier_freqs  # sin and cos of x0, y0, x1, y1
        self.linears = nn.Sequential(
            nn.Linear(cfg.phrase_dim + position_dim, cfg.hidden), nn.SiLU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(),
            nn.Linear(cfg.hidden, width),
        )
        self.null_positive_feature = nn.Parameter(torch.zeros(cfg.phrase_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        boxes, mask, phrases = layout[..., :4], layout[..., 4:5], layout[..., GROUNDING_FIELDS:]
        dtype = self.linears[0].weight.dtype
        mask = mask.to(dtype)  # (B, N, 1)
        position = fourier_features(boxes, self.freqs).to(dtype)  # (B, N, 8 freqs)
        position = position * mask + (1 - mask) * self.null_position_feature
        phrases = phrases.to(dtype) * mask + (1 - mask) * self.null_positive_feature
        return self.linears(torch.cat([phrases, position], dim=-1))  # (B, N, width)


class Grounding(NamedTuple):
    """What the gated self-attention layers read of a layout: the grounding tokens and the objects' boxes."""

    tokens: torch.Tensor  # (B, N, context_dim): GroundingNet's output
    boxes: torch.Tensor  # (B, N, 4): x0, y0, x1, y1 in [0, 1]
    mask: torch.Tensor  # (B, N): 1 an object, 0 padding


def box_overlaps(boxes: torch.Tensor, mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, 4) boxes, (B, N) mask -> (B, h * w, N) bool: whether object n's box overlaps the cell of each
    position of an h x w map (row by row; overlap of positive area: a box ending on a cell's edge does not mark it)."""
    cells = cell_boxes(h, w, boxes.device)  # (HW, 4)
    b = boxes.float()[:, None]  # (B, 1, N, 4)
    c = cells[None, :, None]  # (1, HW, 1, 4)
    inside = ((b[..., 0] < c[..., 2]) & (b[..., 2] > c[..., 0]) &
              (b[..., 1] < c[..., 3]) & (b[..., 3] > c[..., 1]))  # (B, HW, N)
    return inside & (mask[:, None] > 0)


def in_box_features(boxes: torch.Tensor, h: int, w: int, freqs: int) -> torch.Tensor:
    """(B, N, 4) boxes -> (B, h * w, N, 4 * freqs): where the centre of each position of an h x w map (row by row)
    lies in each box, as (u, v) = its coordinates relative to the box (0 at its left or top edge, 1 at its right
    or bottom; outside the box beyond), encoded as sin and cos of pi k u and pi k v, k = 1..freqs."""
    cells = cell_boxes(h, w, boxes.device)
    centre = (cells[:, :2] + cells[:, 2:]) / 2  # (HW, 2): x, y
    b = boxes.float()[:, None]  # (B, 1, N, 4)
    size = (b[..., 2:] - b[..., :2]).clamp(min=1e-3)  # a degenerate box: no division by zero
    rel = (centre[None, :, None] - b[..., :2]) / size  # (B, HW, N, 2)
    bands = math.pi * torch.arange(1, freqs + 1, dtype=torch.float32, device=boxes.device)
    x = rel[..., None, :] * bands[:, None]  # (B, HW, N, freqs, 2)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


def cell_boxes(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h * w, 4): each position of an h x w map, row by row, as the box (x0, y0, x1, y1) of its cell in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    return torch.stack([xs / w, ys / h, (xs + 1) / w, (ys + 1) / h], dim=-1).reshape(h * w, 4)


class GatedSelfAttention(nn.Module):
    """GLIGEN's gated self-attention (`GatedSelfAttentionDense`): x + tanh(alpha_attn) SA(LN([x; W objs]))[:visual],
    then x + tanh(alpha_dense) FF(LN(x)); both gates learned scalars that start at 0. `attn` (self-attention) and
    `ff` are the U-Net's own layers (models/unet.py builds them), `dim` wide. With `position_freqs` > 0 (the
    `visual_positions` option), the visual tokens read are x + P(fourier(cell)), P a linear layer."""

    def __init__(self, dim: int, context_dim: int, attn: nn.Module, ff: nn.Module | None, position_freqs: int = 0,
                 attend: str = "all", shape_freqs: int = 0):
        super().__init__()
        if (ff is None) != (attend != "all"):
            raise ValueError(f"attend = {attend!r}: a feed-forward branch exactly with 'all' (GLIGEN's layers)")
        self.linear = nn.Linear(context_dim, dim)  # grounding tokens to this block's width
        self.attn, self.ff = attn, ff  # the U-Net's own self-attention and GEGLU feed-forward, `dim` wide
        # GligenConfig.attend: "all" (GLIGEN's), "objects" (image -> itself and the objects, no ff), "boxes" (...
        # only the objects whose box overlaps its cell)
        self.attend = attend
        self.norm1 = nn.LayerNorm(dim)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        if ff is not None:  # (`attend = "objects"` has no feed-forward branch, so no parameters that would not train)
            self.norm2 = nn.LayerNorm(dim)
            self.alpha_dense = nn.Parameter(torch.zeros(()))
        if shape_freqs and attend == "all":
            raise ValueError(f"shape_freqs = {shape_freqs}: in-box positions need attend 'objects' or 'boxes'")
        self.shape_freqs = shape_freqs
        self.shape = None
        if shape_freqs:  # (the object's token, where the position lies in its box) -> added to the object's value
            self.shape = nn.Sequential(nn.Linear(dim + 4 * shape_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
            nn.init.zeros_(self.shape[-1].weight)  # at first every position of a box gets the object's value, as
            nn.init.zeros_(self.shape[-1].bias)  # without the option (the gates keep the base unchanged anyway)
        self.position_freqs = position_freqs
        self.position = None
        if position_freqs:  # initialised as the adapter's other layers: the closed gates keep the base unchanged,
            self.position = nn.Linear(8 * position_freqs, dim)  # and positions at 0 would give the attention no
            # place to match a box with (their gradient then comes only through that match: measured, nothing learnt)

    def forward(self, x: torch.Tensor, objs: Grounding, grid: tuple[int, int] | None = None) -> torch.Tensor:
        visual = x.shape[1]
        seen = x
        placed = self.position is not None or self.shape is not None or self.attend == "boxes"
        if placed and (grid is None or grid[0] * grid[1] != visual):
            raise ValueError(f"the gated self-attention's visual positions, in-box positions and box masks need the "
                             f"map's (h, w) for {visual} positions, got {grid}")
        if self.position is not None:
            cells = fourier_features(cell_boxes(*grid, device=x.device), self.position_freqs)
            seen = x + self.position(cells.to(self.position.weight.dtype)).to(x.dtype)  # (HW, dim), broadcast
        tokens = self.norm1(torch.cat([seen, self.linear(objs.tokens.to(x.dtype))], dim=1))  # (B, HW + N, dim)
        if self.attend != "all":
            allowed = box_overlaps(objs.boxes, objs.mask, *grid) if self.attend == "boxes" else None
            inside = self._in_box_values(tokens[:, visual:], objs.boxes, grid) if self.shape is not None else None
            return x + torch.tanh(self.alpha_attn).to(x.dtype) * self._to_objects(tokens, visual, allowed, inside)
        x = x + torch.tanh(self.alpha_attn).to(x.dtype) * self.attn(tokens)[:, :visual]
        return x + torch.tanh(self.alpha_dense).to(x.dtype) * self.ff(self.norm2(x))

    def _in_box_values(self, objects: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, dim) normalised object tokens -> (B, HW, N, dim): what each object adds to its value at each
        position, from its token and where the position lies in its box (`in_box_features`)."""
        where = in_box_features(boxes, *grid, self.shape_freqs).to(objects.dtype)  # (B, HW, N, 4 freqs)
        token = objects[:, None].expand(-1, where.shape[1], -1, -1)  # (B, HW, N, dim)
        return self.shape(torch.cat([token, where], dim=-1))

    def _to_objects(self, tokens: torch.Tensor, visual: int, allowed: torch.Tensor | None = None,
                    inside: torch.Tensor | None = None) -> torch.Tensor:
        """Each image token's attention over [itself; the N grounding tokens] (its own key the slot for "no
        object here"; `allowed` (B, HW, N): only those objects), with `attn`'s projections and heads:
        (B, HW + N, dim) -> (B, HW, dim). `inside` (B, HW, N, dim): added to each object's value per position."""
        attn, b = self.attn, tokens.shape[0]
        image, objects = tokens[:, :visual], tokens[:, visual:]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, heads * d) -> (B, heads, T, d)
            return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

        q, k_self, v_self = split(attn.to_q(image)), split(attn.to_k(image)), split(attn.to_v(image))
        k_obj, v_obj = split(attn.to_k(objects)), split(attn.to_v(objects))
        scale = q.shape[-1] ** -0.5
        logits = torch.cat([(q * k_self).sum(-1, keepdim=True), q @ k_obj.transpose(-1, -2)], dim=-1).float() * scale
        if allowed is not None:  # the self slot is always allowed, so no row is empty
            logits[..., 1:] = logits[..., 1:].masked_fill(~allowed[:, None], float("-inf"))
        w = torch.softmax(logits, dim=-1).to(q.dtype)  # (B, heads, HW, 1 + N)
        if inside is None:
            out = w[..., :1] * v_self + w[..., 1:] @ v_obj  # (B, heads, HW, d)
        else:  # each position's own value of each object: v_obj + inside, (B, heads, HW, N, d)
            inside = inside.reshape(b, visual, -1, heads, v_obj.shape[-1]).permute(0, 3, 1, 2, 4)
            per_position = v_obj[:, :, None] + inside
            out = w[..., :1] * v_self + torch.einsum("bhqn,bhqnd->bhqd", w[..., 1:], per_position)
        return attn.to_out(out.transpose(1, 2).reshape(b, visual, -1))


def adapter_parameters(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the GLIGEN adapter of a U-Net: its grounding net and every block's gated layer."""
    return [(n, p) for n, p in unet.named_parameters() if n.startswith(ADAPTER_PREFIXES) or FUSER in n]


def gate_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The adapter's scalar gates (every block's alpha_attn and alpha_dense)."""
    return [p for n, p in adapter_parameters(unet) if n.endswith(("alpha_attn", "alpha_dense"))]


def freeze_base(unet: nn.Module) -> list[nn.Parameter]:
    """Freeze every U-Net parameter but the adapter's (GLIGEN trains the adapter alone); returns the adapter's."""
    unet.requires_grad_(False)
    params = [p for _, p in adapter_parameters(unet)]
    if not params:
        raise ValueError("the U-Net has no GLIGEN adapter (unet.gligen) to train")
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def phrase_embeddings(text_encoder: nn.Module, tokenizer, phrases: Sequence[str],
                      pool: Sequence[str] = ("eot",)) -> torch.Tensor:
    """(N, phrase_dim) float32: each phrase through the model's text encoder (its final layer and final LayerNorm),
    pooled by each part of `pool` in turn and concatenated (`GligenConfig.phrase_pool`): "eot" as GLIGEN pools CLIP
    (its `pooler_output`: the state at the end-of-text token), "last" the state of the phrase's last token before
    it, "mean" the mean state of its tokens (start and end tokens excluded; an empty phrase: the start token's).
    Each part goes through the encoder's projection, if it has one. Phrases longer than the encoder's window are
    cut, as prompts are."""
    if not phrases:
        return torch.zeros(0, gligen_phrase_dim(text_encoder, pool))
    device = next(text_encoder.parameters()).device
    ids = tokenizer(list(phrases)).to(device)  # (N, max_length)
    out = text_encoder(ids, skip_layers=0, output_pooled=True)
    hidden = out.hidden  # (N, T, width): the final layer's states after the final LayerNorm
    last = (end_positions(ids, text_encoder.config.eos_token_id) - 1).clamp(min=0)  # the token before the end
    projection = getattr(text_encoder, "text_projection", None)
    parts = []
    for kind in pool:
        if kind == "eot":
            parts.append(out.pooled)
            continue
        if kind == "last":
            state = hidden[torch.arange(len(ids), device=device), last]
        elif kind == "mean":
            position = torch.arange(ids.shape[1], device=device)
            words = ((position >= 1) & (position <= last[:, None])) | ((position == 0) & (last[:, None] == 0))
            w = words.to(hidden.dtype)[..., None]
            state = (hidden * w).sum(1) / w.sum(1)
        else:
            raise ValueError(f"phrase pool {kind!r} is not one of 'eot', 'last', 'mean'")
        parts.append(projection(state) if projection is not None else state)
    return torch.cat(parts, dim=-1).float().cpu()


def gligen_phrase_dim(text_encoder: Any, pool: Sequence[str] = ("eot",)) -> int:
    """The width of a phrase embedding: the text encoder's pooled output (its projection's, else its own) for each
    part of `pool`; `text_encoder` a text encoder or its config (training derives the adapter's from the config)."""
    cfg = getattr(text_encoder, "config", text_encoder)
    return (cfg.projection_dim or cfg.width) * len(pool)


def grounding_tensor(boxes: Sequence[Sequence[float]], phrases: torch.Tensor, max_objects: int) -> torch.Tensor:
    """(max_objects, 5 + phrase_dim) float32: the objects' boxes, mask 1 and phrase embeddings (N, phrase_dim),
    then padding rows of zeros (mask 0: the null token)."""
    out = torch.zeros(max_objects, GROUNDING_FIELDS + phrases.shape[-1])
    n = len(boxes)
    if n > max_objects:
        raise ValueError(f"the layout has {n} objects; this model takes at most {max_objects}")
    if n:
        out[:n, :4] = torch.tensor([list(b) for b in boxes], dtype=torch.float32)
        out[:n, 4] = 1.0
        out[:n, GROUNDING_FIELDS:] = phrases.float()
    return out


def null_grounding(cfg: GligenConfig) -> torch.Tensor:
    """(max_objects, 5 + phrase_dim) zeros: no object (every token the null token)."""
    return torch.zeros(cfg.max_objects, GROUNDING_FIELDS + cfg.phrase_dim)
