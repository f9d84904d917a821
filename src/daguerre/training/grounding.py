"""Token grounding in stage 2 (issue 22): a loss on the cross-attention maps of the words that name objects.

TokenCompose (Wang et al., "TokenCompose: Text-to-Image Diffusion with Token-level Supervision", CVPR 2024,
sec. 3.2) supervises, while the diffusion model trains, the cross-attention of each object's noun token with the
object's segmentation mask. For a token and a cross-attention layer let A (h*w,) be the token's attention
probability at each position of the layer's map (softmax over the context's tokens, averaged over the heads) and
M the object's mask at that resolution (here the share of each cell the object covers). Then

    L_token = mean over (token, layer) of (1 - sum(A * M) / sum(A))^2,

0 when the token's attention lies inside its object, 1 when none does; with `loss.grounding_pixel_weight`, also
L_pixel = BCE(A / max(A), M) per position (TokenCompose's pixel term). The run's loss is the diffusion loss plus
`loss.grounding_weight` (L_token + pixel_weight * L_pixel).

The shapes world knows both sides: each training row's scene (`ShapesDataset.scene` of `data.train_pool[row]`, the
latent cache's order) gives the objects' masks (`data.shapes.object_masks`, flipped with a flipped view) and the
caption's words for each object (`data.shapes.object_words`), whose token positions in the text encoder's window
are found by tokenizing the caption word by word (`word_token_positions`; checked against the whole caption's ids).
The probabilities are computed differentiably from each layer's queries and keys by a recorder hung on the U-Net's
cross-attention layers (`CrossAttention.recorder`, None otherwise: off, the run is the old one bit for bit).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.shapes import SIZE_SYNONYMS, object_masks, object_words
from ..models.unet import CrossAttention, cross_attention_layers, layers_named
from .data import TrainData

PROB_EPS = 1e-6  # floors the attention sum of a token (a divisor) and clamps the BCE's normalised map
MAX_HALVINGS = 8  # a cross-attention map is the latent's size halved (rounding up) at most this many times
WORDS = ("nouns", "nouns+colours")  # loss.grounding_words: the shape nouns, or the colour words too
SIZE_WORDS = frozenset(w for words in SIZE_SYNONYMS.values() for w in words)  # name an object, but not its pixels


def rest_words(text: str, objects: Sequence[Any]) -> list[int]:
    """The white-space words of `text` (indices) that name no object (loss.grounding_rest): every word but the
    objects' colour and shape words (`objects`: `data.shapes.object_words`) and the size words: articles, relations,
    places, conjunctions, the background's words."""
    named = {i for o in objects for i in (o.colour, o.shape)}
    words = [w.strip(",.;:").lower() for w in text.split()]
    return [i for i, w in enumerate(words) if i not in named and w not in SIZE_WORDS]


def background(masks: torch.Tensor) -> torch.Tensor:
    """(h, w) float32: the share of each cell no object covers, given the objects' shares `masks` (n, h, w)."""
    return (1.0 - masks.sum(0)).clamp(0.0, 1.0) if len(masks) else torch.ones(masks.shape[-2:])


def word_token_positions(tokenizer: Any, text: str) -> list[list[int]]:
    """For each white-space word of `text`, the positions of its word tokens (punctuation alone left out) in the
    tokenizer's window `tokenizer([text])` (position 0 is the start token); words cut off by the window have none.

    Both of daguerre's tokenizers split at white space first, so a word tokenised alone gives its tokens in the
    whole text; ValueError if they do not line up with the window's ids."""
    window = tokenizer([text])[0].tolist()
    stop = window.index(tokenizer.eos_token_id, 1)  # the end token closes the text's tokens
    out: list[list[int]] = []
    at = 1
    for word in text.split():
        ids = tokenizer.encode(word)
        n = max(0, min(len(ids), stop - at))
        if window[at:at + n] != ids[:n]:
            raise ValueError(f"cannot match the word {word!r} of {text!r} to the tokenizer's ids")
        out.append([at + j for j in range(n) if any(c.isalnum() for c in tokenizer.decode([ids[j]]))])
        at += n
    return out


@dataclass(frozen=True)
class GroundingBatch:
    """The (token, object) pairs a micro-batch's grounding loss supervises: pair k is token `tokens[k]` of sample
    `samples[k]`, whose object is `masks[k]` (the share of each latent pixel it covers)."""

    samples: torch.Tensor  # (K,) int64 rows of the micro-batch
    tokens: torch.Tensor  # (K,) int64 positions in the context
    masks: torch.Tensor  # (K, h, w) float32 at the latent's resolution, on the device
    coarse_only: torch.Tensor | None = None  # (K,) bool: pairs grounded only at the layers of other heights than
    # loss.grounding_min_timestep_heights' (their sample is below loss.grounding_min_timestep); None: none

    def of_samples(self, keep: torch.Tensor) -> GroundingBatch:
        """The pairs whose sample `keep` (a (B,) bool over the micro-batch) marks."""
        k = keep.cpu()[self.samples]
        return GroundingBatch(self.samples[k], self.tokens[k], self.masks[k.to(self.masks.device)],
                              None if self.coarse_only is None else self.coarse_only[k])

    def fine_pairs(self) -> GroundingBatch:
        """The pairs not marked `coarse_only` (all when none is)."""
        if self.coarse_only is None:
            return self
        k = ~self.coarse_only
        return GroundingBatch(self.samples[k], self.tokens[k], self.masks[k.to(self.masks.device)])

    def marking(self, below: torch.Tensor) -> GroundingBatch:
        """The same pairs, those of the samples `below` (a (B,) bool) marked `coarse_only`."""
        return GroundingBatch(self.samples, self.tokens, self.masks, below.cpu()[self.samples])


class GroundingTargets:
    """Each training row's grounded tokens and object masks, computed when its micro-batch is drawn (a pure
    function of the row: the same on resume and on every process)."""

    def __init__(self, data: TrainData, captions: Sequence[str], tokenizer: Any, latent_size: tuple[int, int],
                 words: str, rest: bool = False) -> None:
        raw = getattr(data.dataset, "dataset", data.dataset)
        if not hasattr(raw, "scene"):
            raise ValueError("loss.grounding_weight needs scenes whose objects are known: data.kind = 'shapes'")
        if words not in WORDS:
            raise ValueError(f"loss.grounding_words: unknown {words!r}; choose one of {', '.join(WORDS)}")
        self.raw, self.pool, self.captions, self.tokenizer = raw, data.train_pool, captions, tokenizer
        self.latent_size, self.colours, self.rest = latent_size, words == "nouns+colours", rest

    def row(self, row: int) -> tuple[list[list[int]], torch.Tensor]:
        """(per object its token positions, (objects, h, w) float32 covered shares at the latent's resolution);
        with `rest` one more entry last: the tokens of the words that name no object and the background's share."""
        scene, text = self.raw.scene(int(self.pool[row])), self.captions[row]
        positions = word_token_positions(self.tokenizer, text)
        objects = object_words(scene, text)
        tokens = [positions[w.shape] + (positions[w.colour] if self.colours else []) for w in objects]
        masks = torch.from_numpy(object_masks(scene, self.raw.size)).float()[:, None]  # (objects, 1, H, W)
        masks = F.adaptive_avg_pool2d(masks, self.latent_size)[:, 0] if len(masks) else masks[:, 0]
        if self.rest:
            tokens.append([p for i in rest_words(text, objects) for p in positions[i]])
            masks = torch.cat([masks, background(masks)[None]])
        return tokens, masks

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, views: torch.Tensor,
              device: torch.device) -> GroundingBatch:
        """The pairs of a micro-batch's rows; a dropped caption (the empty prompt) has none, a flipped view (1)
        its masks flipped."""
        samples, tokens, masks = [], [], []
        for b, (row, drop, view) in enumerate(zip(rows.tolist(), dropped.tolist(), views.tolist(), strict=True)):
            if drop:
                continue
            positions, m = self.row(row)
            if view:
                m = m.flip(-1)
            for obj, ps in enumerate(positions):
                samples += [b] * len(ps)
                tokens += ps
                masks += [m[obj]] * len(ps)
        h, w = self.latent_size
        return GroundingBatch(torch.tensor(samples, dtype=torch.long), torch.tensor(tokens, dtype=torch.long),
                              torch.stack(masks).to(device) if masks else torch.zeros(0, h, w, device=device))


def layer_size(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a cross-attention layer's map of `tokens` positions: the latent's size halved (rounding up)."""
    h, w = latent
    for _ in range(MAX_HALVINGS + 1):
        if h * w == tokens:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"a cross-attention layer of {tokens} positions is no halving of the latent's {latent}")


def pair_losses(probs: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCompose's two terms of each pair: probs (K, h*w) a token's attention over a layer's positions, masks
    (K, h*w) its object's share of each; -> ((1 - inside share)^2, mean BCE(A / max A, M)), each (K,)."""
    inside = (probs * masks).sum(-1) / probs.sum(-1).clamp_min(PROB_EPS)
    token = (1.0 - inside) ** 2
    scaled = (probs / probs.amax(-1, keepdim=True).clamp_min(PROB_EPS)).clamp(PROB_EPS, 1.0 - PROB_EPS)
    pixel = F.binary_cross_entropy(scaled, masks, reduction="none").mean(-1)
    return token, pixel


class GroundingRecorder:
    """A `CrossAttention.recorder` that computes, at every cross-attention call of a forward pass, the micro-batch's
    pairs' losses from the layer's probabilities (float32, averaged over the heads), keeping their graph."""

    def __init__(self, batch: GroundingBatch, latent: tuple[int, int], heights: Sequence[int] = (),
                 dilation: int = 0, ring: float = 1.0, fine: Sequence[int] = ()) -> None:
        if dilation > 0:  # each mask grown by `dilation` latent pixels (loss.grounding_dilation), the ring around
            grown = F.max_pool2d(batch.masks[:, None], 2 * dilation + 1, 1, dilation)[:, 0]  # the object counting
            masks = torch.maximum(batch.masks, ring * grown)  # `ring` of a cell inside (loss.grounding_ring)
            batch = GroundingBatch(batch.samples, batch.tokens, masks, batch.coarse_only)
        self.batch, self.latent, self.heights = batch, latent, tuple(heights)  # heights: those layers only (() all)
        self.fine = tuple(fine)  # at layers of these heights the batch's `coarse_only` pairs are left out
        self.token: list[torch.Tensor] = []  # one (K,) per layer call
        self.pixel: list[torch.Tensor] = []
        self.active = True  # off once the forward pass is done: a checkpointed block's recomputation adds nothing

    def __call__(self, q: torch.Tensor, k: torch.Tensor, context: torch.Tensor, heads: int) -> None:
        batch = self.batch
        b, t, inner = q.shape
        h, w = layer_size(t, self.latent)
        if h in self.fine and batch.coarse_only is not None:
            batch = batch.fine_pairs()
        if (self.heights and h not in self.heights) or len(batch.samples) == 0:
            return
        with torch.autocast(q.device.type, enabled=False):  # float32 probabilities under bf16 training too
            token, pixel = self._losses(batch, q, k, heads, t, h, w)
        if self.active:
            self.token.append(token)
            self.pixel.append(pixel)

    def _losses(self, batch: GroundingBatch, q: torch.Tensor, k: torch.Tensor, heads: int, t: int, h: int, w: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        d = q.shape[-1] // heads
        qs = q[batch.samples].float().reshape(len(batch.samples), t, heads, d).transpose(1, 2)  # (K, heads, T, d)
        ks = k[batch.samples].float().reshape(len(batch.samples), -1, heads, d).transpose(1, 2)  # (K, heads, S, d)
        probs = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)  # (K, T, S)
        idx = batch.tokens.to(probs.device)[:, None, None].expand(-1, t, 1)
        a = probs.gather(2, idx)[..., 0]  # (K, T): each pair's token
        m = F.adaptive_avg_pool2d(batch.masks[:, None], (h, w)).reshape(len(batch.samples), t)  # (K, T)
        return pair_losses(a, m.to(a.dtype))

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_token, L_pixel): the means over the pairs and the layer calls recorded (0 when there are none)."""
        if not self.token or sum(x.numel() for x in self.token) == 0:
            zero = torch.zeros((), device=self.batch.masks.device)
            return zero, zero
        return torch.cat(self.token).mean(), torch.cat(self.pixel).mean()  # each (pair, layer call) counts once


def grounded_layers(unet: torch.nn.Module, exclude: Sequence[str] = ()) -> list[CrossAttention]:
    """The cross-attention layers of `unet` the loss reads: all but those of the transformers `exclude` names
    (loss.grounding_exclude: names or prefixes at a dot, as `daguerre explain attention --layers`); ValueError,
    listing the U-Net's, for a name that is none of them."""
    found = cross_attention_layers(unet)
    skipped, unknown = layers_named(found, exclude)
    if unknown:
        raise ValueError(f"config key loss.grounding_exclude: {', '.join(unknown)}: no such cross-attention layer; "
                         f"this U-Net's: {', '.join(found)}")
    if len(skipped) == len(found):
        raise ValueError(f"config key loss.grounding_exclude: {list(exclude)} leaves no cross-attention layer to "
                         "ground")
    return [m for n, m in found.items() if n not in skipped]


@contextlib.contextmanager
def grounding(unet: torch.nn.Module, recorder: GroundingRecorder, exclude: Sequence[str] = ()
              ) -> Iterator[GroundingRecorder]:
    """Hang `recorder` on the cross-attention layers of `unet` for the block: every one but `exclude`'s."""
    layers = grounded_layers(unet, exclude)
    try:
        for layer in layers:
            layer.recorder = recorder
        yield recorder
    finally:
        for layer in layers:
            layer.recorder = None

