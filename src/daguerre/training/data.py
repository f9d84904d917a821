"""Training data for both stages: the dataset a `[data]` section names, a held-out split, safe item access.

`data.holdout` items, drawn at random with `data.seed` (`daguerre.data.split.holdout_split`, the split
`daguerre eval --data` uses too), are kept out of training (reconstruction metrics and images, the latent
scale factor). Runs begun before that split (their checkpoints record no `split`) keep the one they began
with, the last `data.holdout` items, so a resume or an export of such a run sees the images it trained on.
An item that cannot be read (a corrupt or missing image file) is, per `data.on_error`,
either a `ValueError` naming the file ("raise") or logged by name once and replaced by the next
readable item ("skip"), deterministically, so every process and every resumed run see the same data.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.split import holdout_split
from .config import DataConfig, ShapesData

logger = logging.getLogger("daguerre.train")
RANDOM_SPLIT = "random"  # the held-out items drawn at random with data.seed (`holdout_split`)
LAST_SPLIT = "last"  # the last data.holdout items: runs begun before the random split
# where the built-in datasets' captions come from (a folder's ImageFolder says which of its sources it used)
BUILT_IN_CAPTIONS = {"shapes": "built in: the shapes world's scene descriptions",
                     "fashion_mnist": "built in: phrasings of the 10 Fashion-MNIST class names"}
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # what PIL and the idx reader raise on bad files
NAME_ATTRIBUTES = ("files", "paths", "image_paths", "samples", "items")  # where datasets keep their file names


@dataclass
class TrainData:
    """A dataset plus what the training loops need to know about it."""

    dataset: torch.utils.data.Dataset
    channels: int  # 3 (RGB) or 1 (grayscale)
    class_names: list[str] | None  # labelled datasets
    train_pool: np.ndarray  # dataset indices used for training
    holdout: np.ndarray  # dataset indices kept out of training
    description: dict[str, Any] = field(default_factory=dict)  # provenance / latent-cache key
    split: str = RANDOM_SPLIT  # how `holdout` was chosen: RANDOM_SPLIT or (older runs) LAST_SPLIT


def checkpoint_split(meta: dict[str, Any]) -> str:
    """The held-out split of the run that wrote a checkpoint's `meta`: checkpoints before the random split
    record none and held out the last items."""
    split = meta.get("split", LAST_SPLIT)
    if split not in (RANDOM_SPLIT, LAST_SPLIT):
        raise ValueError(f"unknown held-out split {split!r} in a checkpoint: written by a newer daguerre?")
    return split


def item_name(dataset: Any, i: int) -> str:
    """A human name for item `i`: its file path when the dataset keeps one, else `item i`."""
    for attr in NAME_ATTRIBUTES:
        seq = getattr(dataset, attr, None)
        if seq is not None:
            try:
                entry = seq[i]
            except (IndexError, KeyError, TypeError):
                continue
            if isinstance(entry, (tuple, list)) and entry:
                entry = entry[0]
            if isinstance(entry, (str, Path)):
                return str(entry)
    return f"item {i}"


class SafeDataset(torch.utils.data.Dataset):
    """`dataset[i]` with unreadable items raised by name or skipped (replaced by the next readable one).

    A key may be an (epoch, i) pair: datasets with per-epoch augmentations (those with `set_epoch`, e.g.
    random crops of an `ImageFolder`) get the pair, the others just i. The epoch thus travels with the
    index, into DataLoader worker processes too.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, on_error: str) -> None:
        self.dataset, self.on_error = dataset, on_error
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (None, int(key))
        with_epoch = epoch is not None and hasattr(self.dataset, "set_epoch")
        n = len(self.dataset)
        for k in range(n):
            j = (i + k) % n
            if j in self.bad:
                continue
            try:
                return self.dataset[(epoch, j)] if with_epoch else self.dataset[j]
            except READ_ERRORS as e:
                name = item_name(self.dataset, j)
                if self.on_error == "raise":
                    what = str(e) if name in str(e) else f"cannot read training image {name}: {e}"
                    raise ValueError(
                        f"{what}; fix or remove the file, or set data.on_error = 'skip' to skip unreadable images"
                    ) from None
                self.bad.add(j)
                logger.warning("skipping unreadable training image %s: %s", name, e)
        raise ValueError("no readable image in the dataset: every item failed to load")


def _folder_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    from ..data.folder import ImageFolder

    folder = cfg.folder
    root = Path(folder.root)
    if not root.is_dir():
        raise FileNotFoundError(f"config key data.folder.root: no such folder {root}")
    return ImageFolder(root, size=cfg.size, captions=folder.captions, crop=folder.crop, flip=False,
                       channels=folder.channels, on_error=cfg.on_error, seed=cfg.seed)


def build_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    """The raw dataset of a `[data]` section (flips are applied by the training loops, not here)."""
    if cfg.kind == "shapes":
        from ..data.shapes import ShapesDataset

        s = cfg.shapes
        return ShapesDataset(s.n, seed=cfg.seed, size=cfg.size, max_objects=s.max_objects,
                             min_objects=s.min_objects, p_relation=s.p_relation, placement=s.placement)
    if cfg.kind == "fashion_mnist":
        from ..data.fashion_mnist import DEFAULT_ROOT, FashionMNIST

        fm = cfg.fashion_mnist
        return FashionMNIST(fm.root or DEFAULT_ROOT, split=fm.split, size=cfg.size, seed=cfg.seed)
    return _folder_dataset(cfg)


def describe_data(cfg: DataConfig, split: str = RANDOM_SPLIT) -> dict[str, Any]:
    """The fields that decide which images (and captions) a run sees: provenance and the latent-cache key,
    named flat as since the first release (`kind`, `n`, `root`, ...), so old runs keep their cache keys. The
    random held-out split adds `"split": "random"`: a cache of the last-items split is never reused for it."""
    keys = {"shapes": ("kind", "n", "seed", "size", "max_objects"),
            "fashion_mnist": ("kind", "root", "split", "size", "seed"),
            "folder": ("kind", "root", "size", "seed", "captions", "channels", "on_error")}[cfg.kind]
    fields = {"kind": cfg.kind, "seed": cfg.seed, "size": cfg.size, "on_error": cfg.on_error,
              **dataclasses.asdict(cfg.source)}
    out = {k: fields[k] for k in keys}
    if cfg.kind == "shapes":  # keys added later join only when set, so older runs keep their cache keys
        out.update({k: fields[k] for k in ("min_objects", "p_relation", "placement")
                    if fields[k] != getattr(ShapesData, k)})
    if cfg.kind == "folder":
        out["root"] = str(Path(cfg.folder.root).resolve())
    if split == RANDOM_SPLIT:
        out["split"] = split
    return out


def split_indices(n: int, holdout: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of a dataset of `n` items under `split`."""
    if split == RANDOM_SPLIT:
        return holdout_split(n, holdout, seed)
    return np.arange(n - holdout), np.arange(n - holdout, n)


def caption_source(cfg: DataConfig, raw: Any) -> str:
    """Where the captions of the dataset `raw` of a `[data]` section come from, in words."""
    if cfg.kind == "folder":
        return getattr(raw, "caption_source", "none")
    return BUILT_IN_CAPTIONS[cfg.kind]


def load_train_data(cfg: DataConfig, split: str = RANDOM_SPLIT) -> TrainData:
    """The dataset wrapped for training, its channel count and class names, and the train / held-out split
    (`split`: RANDOM_SPLIT, or LAST_SPLIT for a run begun before it); logs what it found."""
    raw = build_dataset(cfg)
    n = len(raw)
    if n == 0:
        root = getattr(cfg.source, "root", None)
        raise ValueError(f"the {cfg.kind} dataset is empty" + (f" (data.{cfg.kind}.root = {root})" if root else ""))
    holdout = min(cfg.holdout, n // 2)  # never hold out more than half of a small dataset
    if holdout < cfg.holdout:
        logger.warning("data.holdout %d reduced to %d: the dataset has only %d images", cfg.holdout, holdout, n)
    dataset = SafeDataset(raw, cfg.on_error)
    first = dataset[0]
    channels = int(first["image"].shape[0])
    names = getattr(raw, "class_names", None)
    class_names = list(names) if names else None
    train_pool, held = split_indices(n, holdout, cfg.seed, split)
    how = ("none held out" if holdout == 0 else f"{holdout} held out, drawn at random with data.seed {cfg.seed}"
           if split == RANDOM_SPLIT else f"{holdout} held out, the last ones, as when this run began")
    logger.info("data: %s, %d images (%s); captions: %s%s", _where(cfg), n, how, caption_source(cfg, raw),
                f"; {len(class_names)} classes" if class_names else "")
    return TrainData(dataset=dataset, channels=channels, class_names=class_names, train_pool=train_pool,
                     holdout=held, description=describe_data(cfg, split), split=split)


def _where(cfg: DataConfig) -> str:
    return f"folder {Path(cfg.folder.root)}" if cfg.kind == "folder" else f"{cfg.kind} dataset"


def load_items(data: TrainData, indices: np.ndarray) -> list[dict[str, Any]]:
    return [data.dataset[int(i)] for i in indices]


def images_of(items: list[dict[str, Any]]) -> torch.Tensor:
    """Stack the images of items: (B, C, H, W) float32 in [-1, 1]."""
    return torch.stack([it["image"] for it in items])


def epoch_keys(epoch: int, indices: np.ndarray) -> list[tuple[int, int]]:
    """The dataset keys (epoch, i) of one batch: the epoch decides the augmentations (random crops)."""
    return [(int(epoch), int(i)) for i in indices]


def batch_loader(data: TrainData, batches, workers: int):
    """Iterate the item lists of `batches` (an iterable of (epoch, index array)), loaded in this process
    (workers = 0) or by `workers` DataLoader processes. Every item is fetched by its key (epoch, i), so
    random crops change from epoch to epoch and are the same with and without workers."""
    keys = (epoch_keys(epoch, idx) for epoch, idx in batches)
    if workers == 0:
        for batch in keys:
            yield [data.dataset[k] for k in batch]
        return
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=keys, num_workers=workers, collate_fn=list)
    yield from loader
