"""The BERT WordPiece tokenizer, uncased (Devlin et al. 2019, BERT; Wu et al. 2016, WordPiece).

Two stages. The basic tokenizer cleans the text (drops NUL, U+FFFD and control characters, turns
every white-space character into a space), puts spaces around CJK ideographs, strips accents (NFD,
then drop the non-spacing marks), lower-cases character by character, and splits on white space and
around every punctuation character (Unicode P* and all ASCII symbols). Each word is then split
greedily into the longest vocabulary entries, left to right, continuation pieces carrying a `##`
prefix; a word with a piece not in the vocabulary (or longer than 100 characters) becomes `[UNK]`.
Literal special tokens in the text (`[CLS]`, `[SEP]`, ...) map to their ids, case-sensitively.
A sequence is `[CLS] ids [SEP]` padded with `[PAD]` to a fixed length (77 here, as daguerre's CLIP
windows). Standard library only; the reference for every detail is the `tokenizers` implementation
behind transformers' `BertTokenizer`, which tests/test_minilm.py compares against.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .tokenizer_base import WindowTokenizer

CLS_TOKEN, SEP_TOKEN, PAD_TOKEN, UNK_TOKEN, MASK_TOKEN = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
CONTINUATION = "##"  # prefix of a piece that continues a word
MAX_WORD_CHARS = 100  # longer words become [UNK] whole
WORD_CACHE_SIZE = 100_000  # words remembered before the cache is cleared
DEFAULT_MAX_LENGTH = 77  # [CLS] + 75 tokens + [SEP], the window length of the rest of daguerre
_JUNK_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Cs"))
_KEEP_CONTROL = frozenset("\t\n\r")  # control characters that count as white space, not as junk
# CJK Unified Ideographs blocks and their extensions / compatibility blocks: each ideograph is a word. The
# reference starts the sixth range at U+2B920, not at U+2B820 where Extension E begins; so do we (parity).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_ASCII_SYMBOLS = frozenset(chr(c) for c in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)))


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_junk(c: str) -> bool:
    """Dropped by cleaning: NUL, the replacement character, and control, format, private-use and surrogate
    characters. Unassigned code points (Cn) are kept, as the reference does: they make their word [UNK]."""
    if c in _KEEP_CONTROL:
        return False
    return c in ("\x00", "\ufffd") or unicodedata.category(c) in _JUNK_CATEGORIES


def _is_punctuation(c: str) -> bool:
    return c in _ASCII_SYMBOLS or unicodedata.category(c).startswith("P")


def normalise(text: str) -> str:
    """Cleaned, CJK-spaced, accent-stripped, lower-cased text (BERT's uncased normaliser)."""
    out = []
    for c in text:
        if _is_junk(c):
            continue
        if c.isspace():  # every Unicode white-space character (what is left of them after the junk filter)
            out.append(" ")
        elif _is_cjk(c):
            out.append(f" {c} ")
        else:
            out.append(c)
    text = unicodedata.normalize("NFD", "".join(out))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return "".join(c.lower() for c in text)  # per character: no final-sigma rule, as the reference


def pre_tokenize(text: str) -> Iterator[str]:
    """Words of normalised text: runs between white space, with each punctuation character on its own."""
    word: list[str] = []
    for c in text:
        if c.isspace() or _is_punctuation(c):
            if word:
                yield "".join(word)
                word = []
            if not c.isspace():
                yield c
        else:
            word.append(c)
    if word:
        yield "".join(word)


class WordPieceTokenizer(WindowTokenizer):
    """BERT's uncased WordPiece tokenizer over a `vocab.txt` (one token per line, the line number is its id).

    `tok(prompts)` gives (B, max_length) int64 ids, `[CLS] ids [SEP] [PAD]...`; `tok.attention_mask(ids)`
    marks the non-padding positions. The attribute names match `CLIPTokenizer` (`bos_token_id` is
    `[CLS]`, `eos_token_id` is `[SEP]`), so the prompt code of the pipelines serves both.
    """

    _ENDS = "[CLS] and [SEP]"

    def __init__(self, vocab_file: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH):
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary {path} not found: pass a BERT vocab.txt")
        tokens = path.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":  # the final newline
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}  # a duplicate line keeps its last id, as the reference
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing}: is it a BERT vocab.txt?")
        self._check_max_length(max_length)
        self.max_length = max_length
        self.bos_token, self.eos_token, self.pad_token = CLS_TOKEN, SEP_TOKEN, PAD_TOKEN
        self._id_to_token = dict(enumerate(tokens))
        self._set_specials({t: self.vocab[t] for t in SPECIAL_TOKENS}, WORD_CACHE_SIZE)

    @property
    def unk_token_id(self) -> int:
        return self.vocab[UNK_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first WordPiece split of one word; [UNK] if any part has no piece."""
        ids: list[int] = []
        start = 0
        while start < len(word) and len(word) <= MAX_WORD_CHARS:
            prefix = "" if start == 0 else CONTINUATION
            end = len(word)
            while end > start and prefix + word[start:end] not in self.vocab:
                end -= 1
            if end == start:  # no piece starts here: the whole word is unknown
                break
            ids.append(self.vocab[prefix + word[start:end]])
            start = end
        if start < len(word):
            ids = [self.unk_token_id]
        return tuple(ids)

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of `text` (strings), no [CLS] / [SEP]."""
        return [self._id_to_token[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: no [CLS] / [SEP], no truncation. Literal special tokens map to their ids."""
        return self._encode_parts(text, lambda part: pre_tokenize(normalise(part)), self._word_ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`: [CLS], [SEP] and [PAD] skipped, `##` pieces joined to the word before them."""
        words: list[str] = []
        for token in self._kept_tokens(ids, {self.bos_token_id, self.eos_token_id, self.pad_token_id}):
            if token.startswith(CONTINUATION) and words:
                words[-1] += token[len(CONTINUATION):]
            else:
                words.append(token)
        return " ".join(words)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """(B, max_length) int64 ids `[CLS] ids [SEP] [PAD]...`; longer prompts are cut with a warning."""
        return self._windows(texts, max_length, truncate=True)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool, False at the trailing `[PAD]` positions (a literal `[PAD]` in a prompt is a token)."""
        real = (ids != self.pad_token_id).flip(-1).int().cumsum(-1).flip(-1)  # real tokens at or after each position
        return real > 0

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"
