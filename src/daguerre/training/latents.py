"""The latent cache of stage 2: every training image encoded ONCE by the frozen autoencoder.

The posterior q(z | x) of each image (its mean and standard deviation, float32, un-scaled) is stored
in safetensors shards under CACHE/<key>/, with the captions (shard metadata, JSON) and labels. The
key is a hash of the VAE file's sha256, the data description (which images, which captions, which
size) and whether horizontally flipped variants are cached too (only when `data.flip` is on). A
cache whose key matches is reused; the shards of an interrupted build are kept and the build goes on
where it stopped. Under torchrun, process r encodes the shards s with s mod world = r, then rank 0
writes `manifest.json`, the file that marks the cache complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_save_safetensors, atomic_write_text
from ..models.autoencoder import AutoencoderKL
from ..untrusted import parse_json
from . import dist
from .data import TrainData, images_of, load_items

logger = logging.getLogger("daguerre.train")
CACHE_VERSION = 1
SHARD_SIZE = 1024  # images per shard file
ENCODE_BATCH = 32  # images per encoder call
MANIFEST = "manifest.json"
KEY_CHARS = 16


@dataclass
class LatentSet:
    """The cached posteriors of the training images, in memory."""

    mean: torch.Tensor  # (N, V, C, h, w) float32, un-scaled; V = 2 with flip variants, else 1
    std: torch.Tensor  # (N, V, C, h, w)
    captions: list[str]
    labels: torch.Tensor | None  # (N,) int64
    folder: Path

    def __len__(self) -> int:
        return self.mean.shape[0]


def cache_key(vae_sha256: str, description: dict, flip: bool, n_train: int) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "vae": vae_sha256, "data": description, "flip": flip,
                       "n_train": n_train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"shard_{s:05d}.safetensors"


@torch.no_grad()
def _encode_shard(vae: AutoencoderKL, data: TrainData, indices: np.ndarray, flip: bool, path: Path) -> None:
    device = next(vae.parameters()).device
    means, stds, caps, labels = [], [], [], []
    for start in range(0, len(indices), ENCODE_BATCH):
        items = load_items(data, indices[start:start + ENCODE_BATCH])
        x = images_of(items).to(device)
        views = [x, x.flip(-1)] if flip else [x]
        posts = [vae.encode(v) for v in views]
        means.append(torch.stack([p.mean.float().cpu() for p in posts], 1))  # (b, V, C, h, w)
        stds.append(torch.stack([p.std.float().cpu() for p in posts], 1))
        caps += [str(it.get("caption", "")) for it in items]
        labels += [int(it.get("label", -1)) for it in items]
    tensors = {"mean": torch.cat(means), "std": torch.cat(stds), "index": torch.from_numpy(indices.astype(np.int64)),
               "label": torch.tensor(labels, dtype=torch.long)}
    atomic_save_safetensors(tensors, path, {"captions": json.dumps(caps)})


def build_shards(
    folder: Path, n_shards: int, encode_shard: Callable[[int, Path], None], manifest: dict, env: dist.DistEnv,
    name: str, items: str,
) -> None:
    """Make the sharded cache `folder` complete, unless its manifest says it is (the latent and text caches).

    `encode_shard(s, path)` writes shard s; process r encodes the missing shards s with s mod world = r
    (those of an interrupted build are kept), then rank 0 writes `manifest`, the file that marks the
    folder complete. `name` ("latent cache") and `items` ("12 training images") are for the log.
    """
    if (folder / MANIFEST).is_file():
        logger.info("reusing the %s %s", name, folder)
        return
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("encoding %s into the %s %s", items, name, folder)
    dist.barrier()
    for s in range(env.rank, n_shards, env.world):
        path = _shard_path(folder, s)
        if not path.is_file():
            encode_shard(s, path)
            if env.is_main:
                logger.info("%s: shard %d/%d", name, s + 1, n_shards)
    dist.barrier()
    if env.is_main:
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    dist.barrier()


def build_or_load(
    vae: AutoencoderKL, vae_sha256: str, data: TrainData, flip: bool, cache_root: Path, env: dist.DistEnv
) -> LatentSet:
    """The latent set of `data.train_pool`, from the cache when its key matches, else encoded now."""
    key = cache_key(vae_sha256, data.description, flip, len(data.train_pool))
    folder = cache_root / key
    n_shards = (len(data.train_pool) + SHARD_SIZE - 1) // SHARD_SIZE
    manifest = {"version": CACHE_VERSION, "key": key, "vae_sha256": vae_sha256, "data": data.description,
                "flip": flip, "images": len(data.train_pool), "shards": n_shards}

    def encode_shard(s: int, path: Path) -> None:
        _encode_shard(vae, data, data.train_pool[s * SHARD_SIZE:(s + 1) * SHARD_SIZE], flip, path)

    build_shards(folder, n_shards, encode_shard, manifest, env, "latent cache",
                 f"{len(data.train_pool)} training images")
    return _load(folder, n_shards)


def _load(folder: Path, n_shards: int) -> LatentSet:
    from safetensors import safe_open

    means, stds, labels, caps = [], [], [], []
    for s in range(n_shards):
        path = _shard_path(folder, s)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {folder} is missing {path.name}: delete the folder to rebuild it")
        with safe_open(str(path), framework="pt") as f:
            means.append(f.get_tensor("mean"))
            stds.append(f.get_tensor("std"))
            labels.append(f.get_tensor("label"))
            caps += parse_json(f.metadata()["captions"], f"{path}: the captions metadata")
    label = torch.cat(labels)
    return LatentSet(mean=torch.cat(means), std=torch.cat(stds), captions=caps,
                     labels=label if bool((label >= 0).all()) else None, folder=folder)
