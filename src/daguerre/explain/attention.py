"""`daguerre explain attention PROMPT`: which pixels each word of the prompt steers, through cross-attention.

The U-Net reads the prompt only through the cross-attention of its spatial transformers (LDM eq. 3):
softmax(Q K^T / sqrt(d)) gives every pixel a distribution over the prompt's tokens. DAAM (Tang et al., "What the
DAAM: interpreting Stable Diffusion using cross attention", ACL 2023, sec. 3) turns these probabilities into one
heat map per word:

1. at every cross-attention layer and every network call of sampling, the probabilities of the conditional
   branch (classifier-free guidance's unconditional half is left out) are summed over the heads, giving a
   (tokens, h, w) map at the layer's resolution;
2. each is upsampled bicubically to the latent's resolution, clamped at 0, and summed over layers and steps;
3. only with `normalize` (DAAM's `compute_global_heat_map(normalize=True)`; off by default there and here): each
   pixel's sums are divided by their sum over the prompt's tokens (the start, end and padding tokens left out), so
   a pixel's values over the prompt's tokens sum to 1;
4. a word split into several tokens sums its tokens' maps (every occurrence of it in the prompt), and the map is
   upsampled bicubically to the image's resolution and clamped at 0.

The probabilities are read by a recorder hung on the U-Net's cross-attention layers (`CrossAttention.recorder`,
None and free otherwise), which computes them itself in float32 from the layer's queries and keys: the fused
attention the network runs does not return them. Which rows of a batched call are the conditional branch is
decided by their context: the rows whose context is the prompt's (`conditional_rows`), so the maps do not depend
on how guidance batches its calls (one doubled batch, two calls, the conditional half alone under the CFG
cutoff).

Words are found for both of daguerre's tokenizers (CLIP's byte-level BPE, BERT's WordPiece): each
white-space-separated word of the prompt (emphasis syntax and LoRA tags removed) is tokenised alone, which gives
the same tokens as the whole prompt (both tokenizers split at white space first), and its tokens are matched to
the prompt's positions in the context (`word_positions`), across 77-token chunks.

Python API: `attention_maps(components, request, words=None, layers=None, normalize=False) -> list[AttentionMaps]`,
each with the generated image and `maps`, word -> (H, W) float32 tensor; `layers` sums only some transformers
(which carry a word's signal differs from layer to layer: docs/explain.md, "attention").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..components import Components
from ..lora.syntax import strip_tags
from ..models.unet import cross_attention_layers, layers_named
from ..pipelines import hires
from ..pipelines.common import GeneratedImage, conditional_rows, conditioning
from ..pipelines.prompts import plain_text, tokenize_chunks, tokenize_window
from ..pipelines.request import ValidRequest, require_valid
from ..pipelines.txt2img import txt2img
from .common import add_sampling_arguments

if TYPE_CHECKING:
    from PIL import Image

    from .page import Figure

# words a heat map is not drawn for unless `words` names them: articles, prepositions, conjunctions
STOP_WORDS = frozenset(("a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "with", "by", "for", "from",
                        "is", "are", "it", "its", "as", "this", "that"))
NORM_EPS = 1e-6  # added to each pixel's sum over the prompt's tokens before dividing (DAAM's `normalize`)
COLUMNS = 6  # panels per row of the figure
MAX_HALVINGS = 8  # a transformer's map is the latent's size halved (rounding up) at most this many times
MAPS_FILE = "maps.safetensors"
OVERLAY_ALPHA = 0.55  # the heat map's share of an overlay pixel
# the colour ramp of the overlays (low -> high: blue, cyan, green, yellow, red), as in DAAM's figures
RAMP = ((0, 0, 160), (0, 120, 255), (0, 220, 180), (120, 230, 0), (255, 220, 0), (255, 60, 0))


@dataclasses.dataclass(frozen=True)
class WordTokens:
    """A word of the prompt (lower case, outer punctuation removed) and the positions of its tokens in the
    context the U-Net reads (every occurrence of the word)."""

    word: str
    positions: tuple[int, ...]


@dataclasses.dataclass
class AttentionMaps:
    """One generated image and its DAAM heat maps: word -> (height, width) float32 tensor, at the image's
    resolution; each pixel's values over all the prompt's words sum to about 1."""

    image: GeneratedImage
    maps: dict[str, torch.Tensor]


# --- words and tokens ---------------------------------------------------------------------------------

def _word_key(word: str) -> str:
    """A prompt word as a map's name: lower case, punctuation at either end removed ("Circle," -> "circle")."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", word.lower())


def word_positions(tokenizer, frozen: bool, prompt: str) -> list[WordTokens]:
    """The prompt's words and the positions of their tokens in the text encoder's context, in the prompt's
    order (a repeated word once, with all its positions). `frozen` is the text encoder's `config.frozen`: a
    BERT window (`tokenize_window`) rather than CLIP's 77-token chunks (`tokenize_chunks`), as the pipelines
    encode it. Tokens that are punctuation alone (a comma after a word) belong to no word; words beyond a
    truncated window have no positions and are left out."""
    text = strip_tags(prompt)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    slots = _prompt_slots(tokenizer, frozen, text)
    found: dict[str, list[int]] = {}
    at = 0
    for word in plain_text(text).split():
        ids = tokenizer.encode(word)
        if at >= len(slots):  # the window was cut before this word
            break
        got = [i for _, i in slots[at:at + len(ids)]]
        if got != ids[:len(got)]:
            raise ValueError(f"cannot match the word {word!r} of the prompt {prompt!r} to its tokens; "
                             "write the prompt without emphasis brackets inside words")
        key = _word_key(word)
        for position, token in slots[at:at + len(ids)]:
            if key and token not in specials and re.search(r"\w", tokenizer.decode([token])):
                found.setdefault(key, []).append(position)
        at += len(ids)
    return [WordTokens(w, tuple(p)) for w, p in found.items()]


def prompt_positions(tokenizer, frozen: bool, prompt: str) -> list[int]:
    """Every position of the prompt's own tokens in the context (start, end and padding tokens left out): what a
    pixel's maps are normalised over (DAAM)."""
    return [position for position, _ in _prompt_slots(tokenizer, frozen, strip_tags(prompt))]


def _prompt_slots(tokenizer, frozen: bool, text: str) -> list[tuple[int, int]]:
    """(position in the context, token id) of the prompt's own tokens, in order, as the pipelines encode `text`:
    a BERT window (`tokenize_window`) when `frozen`, else CLIP's 77-token chunks (`tokenize_chunks`)."""
    chunks = [tokenize_window(tokenizer, text)] if frozen else tokenize_chunks(tokenizer, text)
    slots: list[tuple[int, int]] = []
    for c, chunk in enumerate(chunks):
        end = chunk.ids.index(tokenizer.eos_token_id, 1)  # the first end token closes the chunk's words
        slots.extend((c * len(chunk.ids) + j, chunk.ids[j]) for j in range(1, end))
    return slots


def choose_words(available: Sequence[WordTokens], words: Sequence[str] | None) -> list[WordTokens]:
    """The words to draw maps for: `words` (each must be in the prompt), or every content word (not in
    `STOP_WORDS`)."""
    if not available:
        raise ValueError("the prompt has no words to draw attention maps for")
    by_word = {w.word: w for w in available}
    if words is None:
        chosen = [w for w in available if w.word not in STOP_WORDS]
        return chosen or list(available)
    keys = [_word_key(w) for w in words]
    missing = [w for w, k in zip(words, keys, strict=True) if k not in by_word]
    if missing:
        raise ValueError(f"--words {', '.join(repr(m) for m in missing)} not in the prompt; its words: "
                         f"{', '.join(by_word) or '(none)'}")
    return [by_word[k] for k in dict.fromkeys(keys)]


# --- capture ------------------------------------------------------------------------------------------

class DAAMRecorder:
    """Sums the cross-attention probabilities of the conditional rows of every call into per-image heat maps
    (module docstring, steps 1-2): `heat` (images, tokens, h, w) float32 at the latent's resolution (h, w), over
    the first `tokens` context positions (the prompt's, before any layout tokens).

    A call's conditional rows are those whose context starts with `reference` (1, tokens, d), the prompt's
    context in the U-Net's dtype; they are the batch's images in order."""

    def __init__(self, reference: torch.Tensor, latent_size: tuple[int, int], images: int):
        self.reference = reference
        self.latent_size = latent_size
        self.tokens = reference.shape[1]
        self.heat = torch.zeros(images, self.tokens, *latent_size)
        self.calls = 0  # cross-attention calls with conditional rows

    def __call__(self, q: torch.Tensor, k: torch.Tensor, context: torch.Tensor, heads: int) -> None:
        rows = conditional_rows(context, self.reference)[:self.heat.shape[0]]  # a negative prompt equal to the
        if len(rows) == 0:                                                   # prompt: CFG's conditional rows first
            return
        b, hw, c = len(rows), q.shape[1], q.shape[2]
        d = c // heads
        size = self._map_size(hw)
        qs = q[rows.to(q.device)].float().reshape(b, hw, heads, d)
        ks = k[rows.to(k.device)].float().reshape(b, k.shape[1], heads, d)
        summed = torch.zeros(b, hw, self.tokens, device=q.device)
        for h in range(heads):  # one head at a time: a (b, hw, keys) probability tensor at once
            probs = torch.softmax(torch.bmm(qs[:, :, h], ks[:, :, h].transpose(1, 2)) * d**-0.5, dim=-1)
            summed += probs[..., :self.tokens]  # the prompt's keys (a layout model appends its own after them)
        maps = summed.transpose(1, 2).reshape(b, self.tokens, *size)  # (b, tokens, h', w')
        if size != self.latent_size:
            maps = F.interpolate(maps, size=self.latent_size, mode="bicubic", align_corners=False).clamp_(min=0)
        self.heat[:b] += maps.cpu()
        self.calls += 1

    def _map_size(self, hw: int) -> tuple[int, int]:
        """The (h', w') of a layer's map of `hw` positions: the latent's size halved, rounding up, k times."""
        h, w = self.latent_size
        for _ in range(MAX_HALVINGS + 1):
            if h * w == hw:
                return h, w
            h, w = -(-h // 2), -(-w // 2)
        raise ValueError(f"a cross-attention layer of {hw} positions is no halving of the latent's "
                         f"{self.latent_size[0]}x{self.latent_size[1]}")


@contextlib.contextmanager
def recording(unet: torch.nn.Module, recorder: DAAMRecorder, layers: Sequence[str] | None = None
              ) -> Iterator[DAAMRecorder]:
    """Hang `recorder` on the cross-attention layers of `unet` for the block: all of them (DAAM), or those of the
    transformers `layers` names (a name or its prefix at a dot: "output_blocks" is every decoder layer)."""
    found = cross_attention_layers(unet)
    if not found:
        raise ValueError("this U-Net has no cross-attention layers: its images are not steered by a prompt")
    chosen = list(found.values())
    if layers is not None:
        picks, unknown = layers_named(found, layers)
        if unknown or not layers:
            raise ValueError(f"--layers {', '.join(unknown) or '(none)'}: no such cross-attention layer; this "
                             f"U-Net's: {', '.join(found)}")
        chosen = [found[n] for n in picks]
    for layer in chosen:
        layer.recorder = recorder
    try:
        yield recorder
    finally:
        for layer in chosen:
            layer.recorder = None


def _tokenizer(components: Components):
    """The tokenizer the pipelines encode prompts with (with the loaded textual-inversion words, if any)."""
    tokenizer = components.tokenizer
    if components.adapters is not None:
        embeddings = components.adapters.embeddings(components)
        if embeddings is not None:
            tokenizer = embeddings.tokenizer(components.text_encoder, tokenizer)
    return tokenizer


def check_request(components: Components, request: ValidRequest) -> ValidRequest:
    """`request` if attention maps can be drawn for it: a text-to-image request of a model that reads a prompt
    through cross-attention, without the hires fix (whose second pass is another size)."""
    req = require_valid(components, request, "txt2img")
    if components.text_encoder is None or components.tokenizer is None or not req.conditioner.takes_prompt:
        raise ValueError(f"model {components.config.name!r} takes no prompt: there is no attention to words to show")
    if hires.enabled(req):
        raise ValueError("attention maps are drawn at one size: turn the hires fix off")
    return req


@torch.no_grad()
def attention_maps(components: Components, request: ValidRequest, words: Sequence[str] | None = None,
                   layers: Sequence[str] | None = None, normalize: bool = False) -> list[AttentionMaps]:
    """Generate `request`'s images (the txt2img pipeline, unchanged) and, for each, the DAAM heat map of each of
    `words` (default: every content word of the prompt): word -> (height, width) float32 tensor (module
    docstring). A request of n images runs in batches of `batch_size`, each image from its own seed as always.
    `layers` sums only those transformers' cross-attention (`recording`; None: every one, as DAAM does);
    `normalize` divides each pixel's maps by their sum over the prompt's tokens (DAAM's option, off as there).

        pipe = daguerre.load("shapes")
        result = attention_maps(pipe.components, pipe.request("a red circle above a blue square", seed=1))[0]
        result.image.image.save("image.png"); result.maps["circle"]  # (64, 64)
    """
    req = check_request(components, request)
    te = components.text_encoder
    tokenizer = _tokenizer(components)
    frozen = bool(te.config.frozen)
    chosen = choose_words(word_positions(tokenizer, frozen, req.prompt), words)
    own = prompt_positions(tokenizer, frozen, req.prompt)
    f = components.config.vae.downsample_factor
    latent = (req.height // f, req.width // f)
    cond, _ = conditioning(components, req, components.device)  # the context the pipeline computes, bit for bit
    reference = cond["context"].to(components.unet.dtype)
    results: list[AttentionMaps] = []
    for start in range(0, req.n, req.batch_size):
        b = min(req.batch_size, req.n - start)
        part = dataclasses.replace(req, n=b, seed=req.seed + start).validate(req.config, req.limits)
        recorder = DAAMRecorder(reference, latent, b)
        components.acquire("unet")
        with recording(components.unet, recorder, layers):
            images = txt2img(components, part)
        if recorder.calls == 0:
            raise RuntimeError("no cross-attention call saw the prompt's context: nothing was recorded")
        heat = recorder.heat  # (b, tokens, h, w)
        per_word = torch.stack([heat[:, list(w.positions)].sum(1) for w in chosen], 1)  # (b, words, h, w)
        if normalize:  # DAAM's per-pixel normalisation over the prompt's tokens
            per_word = per_word / (heat[:, own].sum(1, keepdim=True) + NORM_EPS)
        up = F.interpolate(per_word, size=(req.height, req.width), mode="bicubic", align_corners=False).clamp_(min=0)
        for i, image in enumerate(images):
            results.append(AttentionMaps(image, {w.word: up[i, j].contiguous() for j, w in enumerate(chosen)}))
    return results


# --- pictures -----------------------------------------------------------------------------------------

def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """The heat map (H, W) drawn over `image` in the colours of `RAMP`, scaled from its minimum to its maximum
    (as DAAM's figures show a map), at OVERLAY_ALPHA; numpy and PIL only (the server draws these too)."""
    import numpy as np
    from PIL import Image as PILImage

    m = heat.detach().float().cpu().numpy()
    span = float(m.max() - m.min())
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    ramp = np.array(RAMP, dtype=np.float32)
    x = m * (len(ramp) - 1)
    lo = np.clip(np.floor(x).astype(int), 0, len(ramp) - 2)
    t = (x - lo)[..., None]
    colour = ramp[lo] * (1 - t) + ramp[lo + 1] * t  # (H, W, 3)
    base = np.asarray(image.convert("RGB").resize((m.shape[1], m.shape[0])), dtype=np.float32)
    out = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colour
    return PILImage.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def save_maps(maps: dict[str, torch.Tensor], path: str | Path, *, replace: bool = False,
              metadata: dict[str, str] | None = None) -> Path:
    """Write `maps` (word -> (H, W) float32) as a safetensors file, atomically; an existing file (even one that
    appears meanwhile) is kept and FileExistsError raised unless `replace` (fileio.atomic_path)."""
    from ..fileio import atomic_save_safetensors

    path = Path(path)
    atomic_save_safetensors({w: m.float().contiguous() for w, m in maps.items()}, path, metadata, replace=replace)
    return path


def draw(result: AttentionMaps, path: str | Path, replace: bool = False) -> Path:
    """The image, then one overlay per word, in a row (rows of at most `COLUMNS`)."""
    from .common import IMAGE_INCHES, pil_to_display, show_image
    from .page import new_figure, save_figure

    panels = [("the image", result.image.image)] + [(f'"{w}"', overlay(result.image.image, m))
                                                     for w, m in result.maps.items()]
    cols = min(len(panels), COLUMNS)
    rows = -(-len(panels) // cols)
    fig = new_figure(IMAGE_INCHES * cols + 0.3, (IMAGE_INCHES + 0.35) * rows + 0.1)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < len(panels):
            show_image(ax, pil_to_display(panels[k][1]), panels[k][0])
        else:
            ax.axis("off")
    return save_figure(fig, path, replace=replace)


# --- the command --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p)
    p.add_argument("--words", nargs="+", default=None, metavar="WORD",
                   help="the words of the prompt to draw maps for (default: every content word)")
    p.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                   help="only these transformers' cross-attention, e.g. output_blocks.3.1 or output_blocks (default: "
                        "every one, as DAAM)")
    p.add_argument("--normalize", action="store_true",
                   help="divide each pixel's maps by their sum over the prompt's tokens, so they sum to 1 there "
                        "(DAAM's normalize; default: the attention itself, as DAAM)")


def run(args: argparse.Namespace) -> list[Figure]:
    from ..pngmeta import save_png
    from .common import figure_path, open_components, sampling_request
    from .page import Figure

    comps = open_components(args)
    request = sampling_request(args, comps)
    result = attention_maps(comps, request, args.words, args.layers, args.normalize)[0]
    image = save_png(result.image.image, figure_path(args, "image.png"), result.image.parameters,
                     replace=args.overwrite)
    maps = save_maps(result.maps, figure_path(args, MAPS_FILE), replace=args.overwrite,
                     metadata={"prompt": request.prompt, "seed": str(result.image.seed),
                               "normalized": str(bool(args.normalize)).lower()})
    fig = draw(result, figure_path(args, "attention.png"), args.overwrite)
    words = ", ".join(f'"{w}"' for w in result.maps)
    return [Figure(fig, f"Where each word of the prompt acts: for {words}, the U-Net's cross-attention probabilities "
                        "of that word, summed over heads, layers and sampling steps and upsampled to the image "
                        "(DAAM, Tang et al. 2023), drawn over the generated image from blue (least) to red (most). "
                        f"The maps are in {MAPS_FILE}, one float tensor per word at the image's resolution.",
                   extras=(image, maps), title="Cross-attention maps")]
