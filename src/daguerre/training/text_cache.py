"""The text-embedding cache of stage 2 with a frozen pretrained text encoder: each caption encoded ONCE.

A frozen encoder (all-MiniLM-L6-v2, text-encoder kind "minilm") maps a caption to the same context
every step, so stage 2 encodes every distinct caption of the training set, and the empty prompt that
caption dropout uses, once, and stores the per-token hidden states (B, max_length, 384) in
safetensors shards under CACHE/text/<key>/, beside the latent cache. They are stored in float16
(half the disk and memory; the rounding, ~1e-3 relative, is far below what the U-Net can tell apart).
The key hashes the encoder's identity (kind, weights sha256, window length, layer), the tokenizer's
vocabulary and the sorted distinct captions, so a cache is reused exactly when it would be recomputed
the same. Under torchrun, process r encodes the shards s with s mod world = r, then rank 0 writes
`manifest.json`, the file that marks the cache complete; an interrupted build resumes at its first
missing shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..conditioning import Cond, TextHook, conditioner_for
from ..config import ModelConfig
from ..fileio import atomic_save_safetensors
from ..untrusted import parse_json
from . import dist
from .latents import MANIFEST, _shard_path, build_shards  # noqa: F401 (MANIFEST: the layout of the latent cache)
from .loop import autocast

logger = logging.getLogger("daguerre.train")
CACHE_VERSION = 1
TEXT_DIR = "text"  # CACHE/text/<key>/ beside the latent folders CACHE/<key>/
SHARD_CAPTIONS = 2048  # captions per shard file
ENCODE_BATCH = 64  # captions per encoder call
KEY_CHARS = 16
STORE_DTYPE = torch.float16


@dataclass
class TextEmbeddings:
    """The cached contexts of the distinct training captions, in memory."""

    context: torch.Tensor  # (U, T, d) float16: one row per distinct caption, T = the encoder's max_length
    rows: dict[str, int]  # caption -> row
    folder: Path

    def __len__(self) -> int:
        return self.context.shape[0]

    def lookup(self, captions: Sequence[str], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, T, d) contexts of `captions` (each must be a training caption or the empty prompt)."""
        try:
            idx = torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"caption {e.args[0]!r} is not in the text-embedding cache {self.folder}") from None
        return self.context[idx].to(device=device, dtype=dtype)


def load_frozen_text_encoder(model_cfg: ModelConfig, device: torch.device):
    """(encoder, tokenizer) of a model whose text encoder is frozen and pretrained (kind "minilm"), loaded from
    its package; None for any other model. Records the installed weights' sha256 in `model_cfg.text_encoder`."""
    tcfg = conditioner_for(model_cfg).text_encoder  # None unless the model reads prompts
    if tcfg is None or not tcfg.frozen:
        return None
    from ..models.bert import describe_minilm, load_minilm, minilm_tokenizer

    encoder = load_minilm(tcfg, device=device)
    model_cfg.text_encoder = encoder.config
    logger.info("text encoder: %s, %.2f M parameters, not trained", describe_minilm(encoder.config),
                sum(p.numel() for p in encoder.parameters()) / 1e6)
    return encoder, minilm_tokenizer(tcfg.max_length)


def _fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (a different vocab.txt gives other ids)."""
    blob = json.dumps(sorted(tokenizer.vocab.items()), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(encoder_cfg, tokenizer, captions: Sequence[str]) -> str:
    """The cache folder name: a hash of the encoder's identity, the vocabulary and the sorted distinct captions."""
    text_hash = hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode()).hexdigest()
    ident = {k: getattr(encoder_cfg, k) for k in ("kind", "weights_sha256", "max_length", "skip_layers")}
    blob = json.dumps({"version": CACHE_VERSION, "encoder": ident, "vocab": _fingerprint(tokenizer),
                       "captions": text_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


@torch.no_grad()
def encode_captions(encoder, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(N, max_length, d) hidden states of `captions`, float32 on the CPU, in batches of ENCODE_BATCH."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(captions), ENCODE_BATCH):
        ids = tokenizer(list(captions[start:start + ENCODE_BATCH])).to(device)
        out.append(encoder(ids, output_pooled=False).hidden.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, tokenizer.max_length, encoder.config.width)


def _encode_shard(encoder, tokenizer, captions: Sequence[str], path: Path) -> None:
    context = encode_captions(encoder, tokenizer, captions).to(STORE_DTYPE)
    atomic_save_safetensors({"context": context}, path, {"captions": json.dumps(list(captions), ensure_ascii=False)})


def build_or_load(
    encoder, tokenizer, captions: Sequence[str], cache_root: Path, env: dist.DistEnv
) -> TextEmbeddings:
    """The contexts of the distinct `captions` and of "", from CACHE/text/<key> when complete, else encoded now."""
    distinct = sorted(set(captions) | {""})
    key = cache_key(encoder.config, tokenizer, distinct)
    folder = cache_root / TEXT_DIR / key
    n_shards = (len(distinct) + SHARD_CAPTIONS - 1) // SHARD_CAPTIONS
    ident = {k: v for k, v in dataclasses.asdict(encoder.config).items()
             if k in ("kind", "weights_sha256", "max_length", "skip_layers", "width")}
    manifest = {"version": CACHE_VERSION, "key": key, "encoder": ident, "captions": len(distinct),
                "shards": n_shards, "dtype": str(STORE_DTYPE).removeprefix("torch.")}

    def encode_shard(s: int, path: Path) -> None:
        _encode_shard(encoder, tokenizer, distinct[s * SHARD_CAPTIONS:(s + 1) * SHARD_CAPTIONS], path)

    build_shards(folder, n_shards, encode_shard, manifest, env, "text-embedding cache",
                 f"{len(distinct)} distinct captions with the frozen text encoder")
    return _load(folder, n_shards)


def _load(folder: Path, n_shards: int) -> TextEmbeddings:
    from safetensors import safe_open

    contexts, caps = [], []
    for s in range(n_shards):
        path = _shard_path(folder, s)
        if not path.is_file():
            raise FileNotFoundError(f"text-embedding cache {folder} is missing {path.name}: delete the folder to "
                                    "rebuild it")
        with safe_open(str(path), framework="pt") as f:
            contexts.append(f.get_tensor("context"))
            caps += parse_json(f.metadata()["captions"], f"{path}: the captions metadata")
    return TextEmbeddings(context=torch.cat(contexts), rows={c: i for i, c in enumerate(caps)}, folder=folder)


# --- the text condition of a training step ----------------------------------------------------------------

@dataclass
class CachedContexts:
    """A frozen pretrained encoder's contexts, read from the cache (`build_or_load`)."""

    cache: TextEmbeddings

    def __call__(self, captions: list[str], device: torch.device) -> Cond:
        return {"context": self.cache.lookup(captions, device)}


@dataclass
class TrainedTokens:
    """The token ids of a jointly trained encoder, which `ldm.DiffusionModel` runs inside the loss."""

    tokenizer: Any

    def __call__(self, captions: list[str], device: torch.device) -> Cond:
        return {"ids": self.tokenizer(captions).to(device)}


@dataclass
class FrozenContexts:
    """The contexts of a CLIP-style encoder kept frozen (`loss.train_text_encoder = false`), computed per step."""

    tokenizer: Any
    encoder: torch.nn.Module
    bf16: bool

    def __call__(self, captions: list[str], device: torch.device) -> Cond:
        ids = self.tokenizer(captions).to(device)
        with torch.no_grad(), autocast(device, self.bf16):
            return {"context": self.encoder(ids, output_pooled=False).hidden}


def text_hook(tokenizer: Any, encoder: torch.nn.Module | None, *, trained: bool, cache: TextEmbeddings | None,
              bf16: bool) -> TextHook | None:
    """How stage 2 turns a micro-batch's captions into the U-Net's text condition (`TextConditioner.batch`),
    chosen once per run; None for a model without a text encoder."""
    if cache is not None:
        return CachedContexts(cache)
    if tokenizer is None or encoder is None:
        return None
    return TrainedTokens(tokenizer) if trained else FrozenContexts(tokenizer, encoder, bf16)
