"""Test helper: transformers' CLIP tokenizer built offline from daguerre's vendored BPE merge list.

The vocabulary is constructed exactly as OpenAI CLIP's `SimpleTokenizer` builds it (the 256 byte
characters of `bytes_to_unicode`, their `</w>` forms, one token per merge, then `<|startoftext|>`
and `<|endoftext|>`), written as `vocab.json` + `merges.txt` and loaded with `HF_HUB_OFFLINE=1`.
transformers 5.x has a single CLIP tokenizer, backed by the Rust `tokenizers` library
(`CLIPTokenizerFast` is an alias of `CLIPTokenizer`); that is the oracle. It applies NFC, whitespace
collapse and lower-casing but not CLIP's `html.unescape` step, so `oracle_ids` applies that first,
as CLIP's `basic_clean` does.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file (after its header line)


def _byte_chars() -> list[str]:
    """CLIP's `bytes_to_unicode().values()`: printable Latin-1 bytes first, then the others mapped to 256 + n."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(directory: Path) -> Path:
    """Write `vocab.json` and `merges.txt` of the CLIP vocabulary into `directory`; return it."""
    gz = resources.files("daguerre") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


@lru_cache(maxsize=2)
def hf_clip_tokenizer(pad_token: str = EOS):
    """transformers `CLIPTokenizer` over the vendored vocabulary, padding with `pad_token`."""
    import tempfile

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="clip_oracle_") as tmp:  # the tokenizer reads its files at load
        directory = write_clip_vocab(Path(tmp))
        return CLIPTokenizer.from_pretrained(
            str(directory), bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token, model_max_length=77
        )


def clip_clean(text: str) -> str:
    """CLIP's `basic_clean` HTML step (unescape twice), which the transformers tokenizer leaves out."""
    return html.unescape(html.unescape(text))


def oracle_ids(text: str) -> list[int]:
    """BPE ids of `text` without special tokens, by the reference tokenizer."""
    return hf_clip_tokenizer()(clip_clean(text), add_special_tokens=False)["input_ids"]


def oracle_batch(texts: list[str], max_length: int = 77, pad_token: str = EOS) -> list[list[int]]:
    """`<|startoftext|> ids <|endoftext|>` padded and truncated to `max_length`, as Stable Diffusion calls it."""
    tok = hf_clip_tokenizer(pad_token)
    out = tok([clip_clean(t) for t in texts], padding="max_length", max_length=max_length, truncation=True)
    return out["input_ids"]
