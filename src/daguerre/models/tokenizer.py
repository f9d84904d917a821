"""The CLIP tokenizer: byte-level byte-pair encoding with 77-token windows (Radford et al. 2021, CLIP).

Text is cleaned as CLIP does it (HTML entities unescaped twice, Unicode NFC, lower case), split into
words by CLIP's pre-tokenisation pattern (contractions, letter runs, single digits, runs of other
non-space symbols), each word is mapped to printable byte characters (GPT-2's `bytes_to_unicode`),
marked with `</w>` at its end, and merged pair by pair in the order of the merge list (Sennrich et
al. 2016, BPE). Standard library only: the pattern is emulated with `unicodedata` categories. The
reference for every detail is transformers' `CLIPTokenizer`, which tests/test_tokenizer.py compares
against.
"""

from __future__ import annotations

import gzip
import heapq
import html
import json
import os
import unicodedata
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import torch

from ..untrusted import read_json
from .tokenizer_base import WindowTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 `</w>` bytes + 48,894 merges + 2 special tokens
NUM_CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # CLIP uses the first 48,894 merges of the vendored file
MERGES_HEADER = "#version: 0.2"  # first line of a transformers `merges.txt`
BPE_CACHE_SIZE = 100_000  # words remembered before the cache is cleared
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in CLIP's pattern order
# Unicode White_Space: what `\s` matches in the reference tokenizer. str.isspace() also accepts the
# information separators U+001C..U+001F, which CLIP's tokenizer keeps as symbols.
_WHITE_SPACE = frozenset(chr(c) for c in range(0x3001) if chr(c).isspace()) - frozenset("\x1c\x1d\x1e\x1f")


def bytes_to_unicode() -> dict[int, str]:
    """The printable stand-in character of each byte (GPT-2 / CLIP byte-level BPE), in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other 68 bytes follow, taking the
    code points 256, 257, ... in byte order. Every byte string thus becomes a string without whitespace
    or control characters, and the dict's order is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return chars


def _default_bpe_file():
    return resources.files("daguerre") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def _read_merges_gz(path) -> list[tuple[str, str]]:
    """The merge list of an OpenAI CLIP `bpe_simple_vocab_16e6.txt(.gz)` file, as CLIP truncates it."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic number
        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")[1 : NUM_CLIP_MERGES + 1]  # line 0 is a version header
    return [tuple(line.split()) for line in lines]


def _normalise(text: str) -> str:
    """NFC, then per-character lower case (what the reference does: no final-sigma rule)."""
    text = unicodedata.normalize("NFC", text)
    # str.lower() is per-character except for the context-dependent final sigma: map capital sigma first.
    return text.replace("Σ", "σ").lower()


def _kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' white space or 'S' anything else (CLIP's pattern classes)."""
    if c in _WHITE_SPACE:
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "S"


def pre_tokenize(text: str) -> Iterator[str]:
    """Split normalised text like CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        kind = _kind(c)
        if kind == " ":
            i += 1
            continue
        if c == "'":
            suffix = next((s for s in _CONTRACTIONS if text.startswith(s, i + 1)), None)
            if suffix is not None:
                yield text[i : i + 1 + len(suffix)]
                i += 1 + len(suffix)
                continue
        if kind == "N":  # digits are single tokens
            yield c
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]) == kind:  # a run of letters, or of other symbols
            j += 1
        yield text[i:j]
        i = j


class CLIPTokenizer(WindowTokenizer):
    """OpenAI CLIP's byte-level BPE tokenizer (the tokenizer of Stable Diffusion v1 and v2).

    `CLIPTokenizer()` uses the vendored CLIP vocabulary; `from_dir` reads a transformers/diffusers
    `tokenizer/` folder. `tok(prompts)` gives the (B, 77) id windows a text encoder reads:
    `<|startoftext|>` ids `<|endoftext|>` padding; SD v1 pads with `<|endoftext|>`, SD v2 with "!" (id 0).
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, max_length: int = 77, pad_token_id: int = 49407):
        source = _default_bpe_file() if bpe_path is None else Path(bpe_path)
        if not source.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary {bpe_path} not found: pass a bpe_simple_vocab_16e6.txt.gz")
        merges = _read_merges_gz(source)
        byte_chars = list(bytes_to_unicode().values())
        merged = [a + b for a, b in merges]
        tokens = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *merged, BOS_TOKEN, EOS_TOKEN]
        pad = tokens[pad_token_id] if 0 <= pad_token_id < len(tokens) else None
        if pad is None:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary (0..{len(tokens) - 1})")
        self._setup({t: i for i, t in enumerate(tokens)}, merges, BOS_TOKEN, EOS_TOKEN, pad, max_length)

    def _setup(
        self, vocab: dict[str, int], merges: list[tuple[str, str]], bos: str, eos: str, pad: str, max_length: int
    ) -> None:
        for name, token in (("bos", bos), ("eos", eos), ("pad", pad)):
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        self._check_max_length(max_length)
        self.vocab = vocab
        self.merges = merges
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.max_length = max_length
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._byte_chars = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_chars.items()}
        self._set_specials({bos: vocab[bos], eos: vocab[eos]}, BPE_CACHE_SIZE)

    # --- folders ------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Read a transformers / diffusers `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} not found")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json(folder / "vocab.json", "tokenizer file")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = read_json(folder / "tokenizer.json", "tokenizer file").get("model")
            if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or "merges" not in model:
                raise ValueError(f"{folder / 'tokenizer.json'}: no BPE model (vocab and merges)")
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{folder}: a merge is not a pair of symbols: is this a BPE tokenizer?")
        settings: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second one wins
            if (folder / name).is_file():
                settings.update(read_json(folder / name, "tokenizer file"))

        def token(key: str, default: str) -> str:
            value = settings.get(key) or default
            return value["content"] if isinstance(value, dict) else value

        eos = token("eos_token", EOS_TOKEN)
        max_length = settings.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 100_000:  # transformers writes 1e30 for "unlimited"
            max_length = 77
        tok = cls.__new__(cls)
        tok._setup(vocab, merges, token("bos_token", BOS_TOKEN), eos, token("pad_token", eos), max_length)
        return tok

    def save_dir(self, path: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (transformers layout)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.eos_token,
                    "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "clean_up_tokenization_spaces": False, **specials}
        vocab = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
        }
        for name, text in files.items():
            tmp = folder / f".{name}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)

    # --- ids ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised word: byte characters, `</w>` on the last, then merges by rank.

        The classic loop (merge every occurrence of the lowest-ranked pair, left to right, until none is left)
        costs O(L^2) on a word of L characters; here a heap of (rank, position) pairs over a linked list of
        symbols gives the same merges in O(L log L). A pair made by a merge always ranks after the merge that
        made its token, so popping the lowest (rank, position) replays the classic order exactly.
        """
        symbols = [self._byte_chars[b] for b in word.encode("utf-8", errors="replace")]
        symbols[-1] += END_OF_WORD
        n = len(symbols)
        nxt, prev = list(range(1, n + 1)), list(range(-1, n - 1))  # the linked list; n marks the end
        alive = [True] * n
        heap = [(r, i, symbols[i], symbols[i + 1]) for i in range(n - 1)
                if (r := self.ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, first, second = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j == n or symbols[i] != first or symbols[j] != second:
                continue  # stale: a merge has changed this pair since it was pushed
            symbols[i] = first + second
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prev[nxt[i]] = i
            for a in (prev[i], i):  # the two pairs the merged symbol now belongs to
                b = nxt[a] if a >= 0 else n
                if a >= 0 and b < n and (r := self.ranks.get((symbols[a], symbols[b]))) is not None:
                    heapq.heappush(heap, (r, a, symbols[a], symbols[b]))
        unk = self.eos_token_id  # CLIP's unknown token; unreachable with a byte-complete vocabulary
        return tuple(self.vocab.get(symbols[i], unk) for i in range(n) if alive[i])

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no start/end tokens, no truncation. Literal special tokens map to their ids."""
        text = html.unescape(html.unescape(text))
        return self._encode_parts(text, lambda part: pre_tokenize(_normalise(part)), self._bpe)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`: start and end tokens are skipped, word ends become spaces."""
        tokens = self._kept_tokens(ids, {self.bos_token_id, self.eos_token_id})
        data = bytes(self._char_to_byte[c] for c in "".join(tokens) if c in self._char_to_byte)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], max_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """(B, max_length) int64 ids: `<|startoftext|>` ids `<|endoftext|>` then padding (CLIP's 77-token window).

        Longer prompts are cut to `max_length` keeping the end token last, with a warning that quotes what
        was dropped; with `truncate=False` nothing is cut and the rows are padded to the longest one.
        """
        return self._windows(texts, max_length, truncate)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"pad={self.pad_token!r} ({self.pad_token_id}))")
