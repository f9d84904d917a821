"""What daguerre's two tokenizers share: literal special tokens, id checks and fixed-length id windows.

`CLIPTokenizer` (byte-level BPE, models/tokenizer.py) and `WordPieceTokenizer` (BERT, models/wordpiece.py)
differ in how they clean text and split a word into pieces; both split a prompt around the literal
special tokens it contains first, skip special ids when decoding, and frame each prompt as one row
`start ids end padding` of a (B, max_length) int64 tensor, cutting long prompts with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence

import torch

logger = logging.getLogger("daguerre")


def special_pattern(tokens: Iterable[str]) -> re.Pattern:
    """A pattern whose `split` keeps each literal occurrence of `tokens` as its own (odd-numbered) part."""
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


class WindowTokenizer:
    """Base of the tokenizers: subclasses set `vocab`, `max_length`, `bos_token`, `eos_token`, `pad_token`,
    `_id_to_token` and (via `_set_specials`) the literal special tokens, and define `vocab_size`,
    `encode(text) -> list[int]` and `decode(ids) -> str`. `_ENDS` names the start and end tokens in errors."""

    _ENDS = "the start and end tokens"
    vocab: dict[str, int]
    max_length: int
    bos_token: str
    eos_token: str
    pad_token: str
    _id_to_token: dict[int, str]

    @property
    def bos_token_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    def _set_specials(self, specials: dict[str, int], cache_size: int) -> None:
        """The literal special tokens a prompt may contain (token -> id), matched case-sensitively; an empty
        memory of the ids of words, cleared whenever it holds `cache_size` words."""
        self._specials = specials
        self._special_re = special_pattern(specials)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size

    def _check_max_length(self, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for {self._ENDS}: use at least 2")

    def _encode_parts(
        self, text: str, words: Callable[[str], Iterable[str]], word_ids: Callable[[str], Sequence[int]]
    ) -> list[int]:
        """Ids of `text`: literal special tokens map to their ids, the text between them to `word_ids` of
        each of its `words` (remembered)."""
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:  # odd parts are the special tokens the split captured
                ids.append(self._specials[part])
                continue
            for word in words(part):
                cached = self._cache.get(word)
                if cached is None:
                    cached = tuple(word_ids(word))
                    if len(self._cache) >= self._cache_size:
                        self._cache.clear()
                    self._cache[word] = cached
                ids.extend(cached)
        return ids

    def _kept_tokens(self, ids: Sequence[int] | torch.Tensor, skip: set[int]) -> list[str]:
        """The tokens of `ids` without those in `skip`; an id outside the vocabulary is a ValueError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if i not in self._id_to_token:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i not in skip:
                tokens.append(self._id_to_token[i])
        return tokens

    def _windows(self, texts: str | Sequence[str], max_length: int | None, truncate: bool) -> torch.Tensor:
        """(B, max_length) int64 rows `start ids end padding`. Longer prompts are cut keeping the end token
        last, with a warning quoting what was dropped; with `truncate=False` the rows pad to the longest."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"prompts must be strings, got {[type(t).__name__ for t in texts]}")
        max_length = self.max_length if max_length is None else max_length
        self._check_max_length(max_length)
        room = max_length - 2
        rows = []
        for text in texts:
            ids = self.encode(text)
            if truncate and len(ids) > room:
                logger.warning("prompt longer than %d tokens, dropped: %r", max_length, self.decode(ids[room:]))
                ids = ids[:room]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = max([max_length, *(len(r) for r in rows)])
        out = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out
