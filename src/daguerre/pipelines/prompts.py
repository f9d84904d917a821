"""Prompt syntax of AUTOMATIC1111: emphasis weights, `BREAK`, and prompts longer than 77 tokens.

- `(text)` multiplies the attention weight of `text` by 1.1, `[text]` divides it by 1.1, and
  `(text:1.5)` multiplies it by 1.5; brackets nest (weights multiply); `\\(`, `\\)`, `\\[`, `\\]` and
  `\\\\` are literal characters (a lone backslash is dropped); an unclosed bracket applies to the end of
  the prompt.
- The prompt is tokenized into chunks of 75 tokens (a chunk breaks after the last comma within its
  last 20 tokens when a word would cross the boundary; `BREAK` starts a new chunk). Each chunk
  becomes `<start> tokens <end> <pad>...` (77), is encoded on its own, and the chunks' hidden states
  are concatenated along the sequence: cross-attention takes any context length.
- Each token's hidden state is multiplied by its weight and each chunk is rescaled to keep its
  original mean, as A1111 does (A1111 takes the mean over the whole batch; per chunk keeps an
  image independent of the batch it is made in).
A prompt with no brackets and at most 75 tokens encodes exactly as the plain tokenizer would.
Brackets nest at most `MAX_EMPHASIS_DEPTH` deep and a token's weight stays within +-`MAX_WEIGHT`
(A1111 has no bounds; beyond them the parse's cost grows with the square of the prompt and the weights
overflow), else a ValueError names the depth or the weight.

A BERT encoder (the frozen all-MiniLM-L6-v2, text-encoder kind "minilm") reads one window of its
tokenizer's `max_length`: `[CLS] tokens [SEP] [PAD]...`, the emphasis weights applied per token in the
same way; there is no chunking, so a longer prompt is truncated (with a warning naming what was
dropped) and `BREAK` is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..models.text_encoder import unknown_token_ids

logger = logging.getLogger("daguerre")

ROUND_WEIGHT = 1.1  # `(text)`
SQUARE_WEIGHT = 1 / 1.1  # `[text]`
CHUNK_TOKENS = 75  # tokens per chunk, between the start and end tokens
COMMA_BACKTRACK = 20  # look this many tokens back for a comma to break a chunk at
BREAK = "BREAK"
MAX_EMPHASIS_DEPTH = 32  # brackets open at once; (((...))) 32 deep already weighs 1.1^32 = 21
MAX_WEIGHT = 100.0  # largest |weight| of a token after nesting: far beyond any useful emphasis


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; a `BREAK` keyword is returned as ("BREAK", -1.0).

    Linear in the prompt's length: brackets nest at most MAX_EMPHASIS_DEPTH deep (each closing bracket
    rescales only the runs inside it); a deeper nesting or a weight beyond MAX_WEIGHT is a ValueError.
    """
    pieces: list[list] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(s: str) -> None:
        for k, part in enumerate(_split_break(s)):
            if k:
                pieces.append([BREAK, -1.0])
            if part:
                pieces.append([part, 1.0])

    i, n = 0, len(text)
    plain = []
    while i < n:
        c = text[i]
        if c == "\\":  # an escape: the next bracket or backslash is literal; a lone backslash is dropped (A1111)
            if i + 1 < n and text[i + 1] in "()[]\\":
                plain.append(text[i + 1])
                i += 2
            else:
                i += 1
            continue
        if c in "()[]:":
            weight_end = _weight_suffix(text, i) if c == ":" and round_open else None
            if c == ":" and weight_end is None:
                plain.append(c)
                i += 1
                continue
            if plain:
                add_text("".join(plain))
                plain = []
            if c in "([" and len(round_open) + len(square_open) == MAX_EMPHASIS_DEPTH:
                raise ValueError(f"prompt brackets nest {emphasis_depth(text)} deep, over the limit of "
                                 f"{MAX_EMPHASIS_DEPTH}: remove some, or write literal brackets as \\( \\) \\[ \\]")
            if c == "(":
                round_open.append(len(pieces))
            elif c == "[":
                square_open.append(len(pieces))
            elif c == ":":
                value, i = weight_end
                scale(round_open.pop(), value)
                continue
            elif c == ")" and round_open:
                scale(round_open.pop(), ROUND_WEIGHT)
            elif c == "]" and square_open:
                scale(square_open.pop(), SQUARE_WEIGHT)
            else:  # an unmatched closing bracket is kept as text
                add_text(c)
            i += 1
            continue
        plain.append(c)
        i += 1
    if plain:
        add_text("".join(plain))
    for start in round_open:
        scale(start, ROUND_WEIGHT)
    for start in square_open:
        scale(start, SQUARE_WEIGHT)
    if not pieces:
        return [("", 1.0)]
    for t, w in pieces:
        if t != BREAK and not abs(w) <= MAX_WEIGHT:  # also NaN
            raise ValueError(f"prompt weight {w:.6g} of {t!r} is beyond +-{MAX_WEIGHT:g}: use a smaller weight")
    runs: list[tuple[list[str], float]] = []  # consecutive runs of one weight, joined once at the end
    for t, w in pieces:
        if runs and runs[-1][1] == w and t != BREAK and runs[-1][0] != [BREAK]:
            runs[-1][0].append(t)
        else:
            runs.append(([t], w))
    return [("".join(parts), w) for parts, w in runs]


def plain_text(text: str) -> str:
    """A prompt's words without its emphasis syntax or BREAKs: "a (red:1.3) circle" -> "a red circle" (what
    CLIP guidance embeds with CLIP's own tokenizer)."""
    return " ".join(" ".join(part for part, weight in parse_emphasis(text) if weight >= 0).split())


def emphasis_depth(text: str) -> int:
    """How deep the prompt's brackets nest, as `parse_emphasis` reads them (escapes and unmatched closing
    brackets are text; unclosed ones stay open to the end)."""
    deepest, rounds, squares, i = 0, 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2 if i + 1 < len(text) and text[i + 1] in "()[]\\" else 1
            continue
        if c == "(":
            rounds += 1
        elif c == "[":
            squares += 1
        elif c == ")" and rounds:  # `(text:1.5)` closes at its `)` too
            rounds -= 1
        elif c == "]" and squares:
            squares -= 1
        deepest = max(deepest, rounds + squares)
        i += 1
    return deepest


def chunk_bound(text: str) -> int:
    """At least as many 77-token chunks as `tokenize_chunks` makes of `text`, without a tokenizer: every
    token holds at least one byte of the text, every chunk not ended by BREAK or the text's end holds
    at least CHUNK_TOKENS - COMMA_BACKTRACK + 1 tokens. For the work estimate of a request (limits.py)."""
    tokens = len(text.lower().encode("utf-8"))
    return 1 + text.count(BREAK) + tokens // (CHUNK_TOKENS - COMMA_BACKTRACK + 1)


def _weight_suffix(text: str, i: int) -> tuple[float, int] | None:
    """At `:` inside `( )`: the number before the closing `)` and the index after it, if it is `:NUMBER)`."""
    j = i + 1
    n = len(text)
    while j < n and text[j].isspace():
        j += 1
    start = j
    while j < n and (text[j].isdigit() or text[j] in "+-."):
        j += 1
    number = text[start:j]
    while j < n and text[j].isspace():
        j += 1
    if not number or j >= n or text[j] != ")":
        return None
    try:
        return float(number), j + 1
    except ValueError:
        return None


def _split_break(s: str) -> list[str]:
    """Split on the standalone word BREAK, dropping the whitespace around it."""
    words = s.split(BREAK)
    if len(words) == 1:
        return [s]
    out = [words[0]]
    for w in words[1:]:
        prev = out[-1]
        # only a whole word counts: letters on either side make it part of another word
        if (prev and (prev[-1].isalnum() or prev[-1] == "_")) or (w and (w[0].isalnum() or w[0] == "_")):
            out[-1] = prev + BREAK + w
        else:
            out[-1] = prev.rstrip()
            out.append(w.lstrip())
    return out


@dataclass
class Chunk:
    """One 77-token window: ids with start/end/pad tokens, and a weight per position."""

    ids: list[int]
    weights: list[float]


def tokenize_chunks(tokenizer, text: str, comma_id: int | None = None) -> list[Chunk]:
    """The prompt as 77-token chunks with per-token weights (module docstring)."""
    if comma_id is None:
        comma_id = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK_TOKENS - len(ids)
        body = ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
        chunks.append(Chunk([tokenizer.bos_token_id] + body, [1.0] + weights + [1.0] * (pad + 1)))
        ids, weights, last_comma = [], [], -1

    for piece, weight in parse_emphasis(text):
        if weight == -1.0 and piece == BREAK:
            close()
            continue
        for token in tokenizer.encode(piece):
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                rest_ids, rest_w = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = rest_ids, rest_w
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def tokenize_window(tokenizer, text: str) -> Chunk:
    """The prompt as one window of `tokenizer.max_length` with per-token weights (BERT: no chunking).

    Emphasis as in `tokenize_chunks`; `BREAK` is dropped, and tokens beyond the window are cut with a
    warning, as the plain tokenizer does."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_emphasis(text):
        if weight == -1.0 and piece == BREAK:
            logger.warning("BREAK has no effect with this text encoder (one %d-token window)", tokenizer.max_length)
            continue
        for token in tokenizer.encode(piece):
            ids.append(token)
            weights.append(weight)
    room = tokenizer.max_length - 2
    if len(ids) > room:
        logger.warning("prompt longer than %d tokens, dropped: %r", tokenizer.max_length, tokenizer.decode(ids[room:]))
        ids, weights = ids[:room], weights[:room]
    pad = room - len(ids)
    return Chunk([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                 [1.0, *weights, 1.0] + [1.0] * pad)


def encode_weighted(
    text_encoder, tokenizer, prompts: list[str], *, skip_layers: int, min_chunks: int = 1
) -> torch.Tensor:
    """Context (B, 77 * k, d) for `prompts` with A1111 emphasis and chunking; k >= min_chunks for all rows.

    Rows with fewer chunks than the longest are padded with chunks of the empty prompt. A frozen BERT encoder
    (`TextEncoderConfig.frozen`, MiniLM) gets one window per prompt (`tokenize_window`): (B, max_length, d).
    """
    if text_encoder.config.frozen:
        per_prompt = [[tokenize_window(tokenizer, p)] for p in prompts]
        min_chunks = 1
    else:
        per_prompt = [tokenize_chunks(tokenizer, p) for p in prompts]
    unknown = unknown_token_ids(text_encoder, [i for chunks in per_prompt for c in chunks for i in c.ids])
    if unknown:  # a small model trained on its own captions knows only their words
        logger.warning("the model's vocabulary has no %s; they are ignored",
                       ", ".join(repr(tokenizer.decode([i])) for i in unknown))
    k = max(min_chunks, *(len(c) for c in per_prompt))
    empty = tokenize_chunks(tokenizer, "")[0] if k > 1 else None  # pads the rows with fewer chunks
    device = next(text_encoder.parameters()).device
    rows = []
    for chunks in per_prompt:
        chunks = chunks + [empty] * (k - len(chunks))
        ids = torch.tensor([c.ids for c in chunks], device=device)  # (k, T): T = 77, or BERT's max_length
        w = torch.tensor([c.weights for c in chunks], device=device, dtype=torch.float32)  # (k, T)
        z = text_encoder(ids, skip_layers=skip_layers, output_pooled=False).hidden.float()  # (k, T, d)
        if bool((w != 1.0).any()):  # weight each token, then restore each chunk's mean (A1111)
            mean = z.mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
            z = z * w.unsqueeze(-1)
            ratio = mean / z.mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
            # a mean near 0 (an untrained encoder's final LayerNorm) makes the ratio noise, or infinite: keep
            # such a chunk as weighted rather than scale it by that noise (A1111 divides regardless)
            sane = torch.isfinite(ratio) & (ratio >= 1 / MAX_WEIGHT) & (ratio <= MAX_WEIGHT)
            z = z * torch.where(sane, ratio, torch.ones_like(ratio))
        rows.append(z.reshape(1, -1, z.shape[-1]))
    return torch.cat(rows)  # (B, T k, d)
