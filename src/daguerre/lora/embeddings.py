"""Textual-inversion embeddings (Gal et al. 2022): new "words" whose token vectors were learned, used by name.

The files of the embeddings folder (`--embeddings-dir`) are read once per model, as AUTOMATIC1111 reads them:
the file's stem is the word that calls it in a prompt or a negative prompt, and its vectors (one or more rows
of the text encoder's width: 768 for SD 1.x, 1024 for SD 2.x) replace the word's tokens. Formats:

- AUTOMATIC1111 `.pt`: {"string_to_param": {"*": (n, d)}, "step", "sd_checkpoint", "sd_checkpoint_name", ...};
- `emb_params` (.safetensors or .pt): {"emb_params": (n, d)};
- diffusers `learned_embeds` (.safetensors or .bin): {token: (n, d) or (d,)}, one entry.

Files whose width is not this text encoder's are skipped (listed as such by `/sdapi/v1/embeddings`), as A1111
does; a file that is none of these is skipped with a warning naming it. Pickles are read with
`weights.io.safe_torch_load` (nothing in them is executed).

In a prompt the word (whole, any case) becomes ids past the vocabulary (`EmbeddingTokenizer`), and the text
encoder takes their vectors from `CLIPTextEmbeddings.extra` instead of its table.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TextEncoderConfig
from .syntax import list_folder

logger = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".pt", ".safetensors", ".bin")
MAX_VECTORS = 75  # vectors per embedding: one 77-token chunk without its start and end tokens (A1111's limit)
MAX_EMBEDDING_BYTES = 64 * 1024**2  # 75 vectors of 1024 floats are 300 kB; an A1111 .pt adds a few kB


@dataclass
class Embedding:
    """One embedding: its word, vectors (n, d) float32, and what A1111 lists about it."""

    name: str
    vectors: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    path: Path | None = None
    _hash: str | None = None

    def short_hash(self) -> str:
        """A1111's `TI hashes` value: the first 12 hex digits of the file's sha256."""
        if self._hash is None:
            from ..weights.io import file_hash

            self._hash = file_hash(self.path)[:12] if self.path is not None else ""
        return self._hash

    def info(self) -> dict[str, Any]:
        """A1111's `/sdapi/v1/embeddings` entry."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": int(self.vectors.shape[1]), "vectors": int(self.vectors.shape[0])}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_embedding(data: Any, name: str, source: str) -> Embedding:
    """An embedding from a loaded file's contents (module docstring); a ValueError says what the file is not."""
    step = sd_checkpoint = sd_name = None
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{source}: string_to_param must hold one tensor")
        vectors = next(iter(params.values()))
        step, sd_checkpoint, sd_name = data.get("step"), _str(data.get("sd_checkpoint")), \
            _str(data.get("sd_checkpoint_name"))
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
    elif isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and ("clip_l" in data or "clip_g" in data):
        raise ValueError(f"{source}: an SDXL embedding (clip_l / clip_g); daguerre runs SD 1.x and 2.x models")
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))  # diffusers learned_embeds: {token: vectors}
    else:
        raise ValueError(f"{source}: not a textual-inversion embedding (no string_to_param, emb_params, or single "
                         "token tensor)")
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ValueError(f"{source}: the embedding's vectors are not a floating-point tensor")
    vectors = vectors.detach().float()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise ValueError(f"{source}: vectors of shape {tuple(vectors.shape)}; an embedding is (n, width) with n in "
                         f"1..{MAX_VECTORS}")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{source}: the embedding holds NaN or infinite values")
    return Embedding(name, vectors.contiguous(), step, sd_checkpoint, sd_name)


def read_embedding(path: str | os.PathLike) -> Embedding:
    """One embedding file (module docstring), its word the file's stem."""
    from ..untrusted import regular_file
    from ..weights.io import read_state_dict, safe_torch_load, sniff

    path = regular_file(path, "embedding file")
    if path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size // 1024**2} MB is larger than any embedding")
    data = read_state_dict(path)[0] if sniff(path) == "safetensors" else safe_torch_load(path)
    embedding = parse_embedding(data, path.stem, str(path))
    embedding.path = path
    return embedding


@dataclass
class EmbeddingTable:
    """The embeddings of a folder that fit one text encoder (`loaded`), and those that do not (`skipped`)."""

    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)

    def tokenizer(self, text_encoder, tokenizer) -> EmbeddingTokenizer:
        """`tokenizer` that also knows the loaded words, and `text_encoder` given their vectors
        (`CLIPTextEmbeddings.extra`)."""
        cfg = text_encoder.config
        table = text_encoder.text_model.embeddings.token_embedding.weight
        vectors = [e.vectors for e in self.loaded.values()]
        extra = torch.cat(vectors) if vectors else torch.zeros(0, cfg.width)
        text_encoder.text_model.embeddings.extra = extra.to(device=table.device, dtype=table.dtype)
        ids, start = {}, cfg.vocab_size
        for name, e in self.loaded.items():
            ids[name.lower()] = list(range(start, start + len(e.vectors)))
            start += len(e.vectors)
        return EmbeddingTokenizer(tokenizer, ids)


    def used_in(self, *texts: str) -> list[str]:
        """The loaded embeddings whose word appears in `texts` (as `EmbeddingTokenizer` matches it), in table order."""
        return [name for name in self.loaded
                if any(re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", t or "", re.IGNORECASE) for t in texts)]


def load_embeddings(folder: str | os.PathLike, cfg: TextEncoderConfig) -> EmbeddingTable | None:
    """The embeddings of `folder` for a text encoder of config `cfg` (None for a frozen pretrained encoder, which
    has no CLIP token table)."""
    if cfg.frozen:
        return None
    table = EmbeddingTable()
    for name, path in list_folder(folder, EMBEDDING_EXTENSIONS, "embeddings").items():
        try:
            embedding = read_embedding(path)
        except ValueError as e:
            logger.warning("embedding %s skipped: %s", path, e)
            continue
        fits = embedding.vectors.shape[1] == cfg.width
        (table.loaded if fits else table.skipped)[name] = embedding
    return table


class EmbeddingTokenizer:
    """A CLIP tokenizer whose `encode` maps each embedding's word (whole, any case) to its ids past the vocabulary
    (`ids`: word -> ids); everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, ids: dict[str, list[int]]):
        self._base = tokenizer
        self._ids = ids
        words = sorted(ids, key=len, reverse=True)
        self._pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE) \
            if words else None

    def encode(self, text: str) -> list[int]:
        if self._pattern is None:
            return self._base.encode(text)
        out: list[int] = []
        for k, part in enumerate(self._pattern.split(text)):
            if k % 2:
                out.extend(self._ids[part.lower()])
            elif part:
                out.extend(self._base.encode(part))
        return out

    def decode(self, ids) -> str:
        known = [i for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) if i < self._base.vocab_size]
        return self._base.decode(known)

    def __getattr__(self, name: str):
        return getattr(self._base, name)

