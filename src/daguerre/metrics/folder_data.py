"""A folder of the user's own images as `daguerre eval --data` and `daguerre classifier train --data` read it.

The images are those `data.folder.ImageFolder` finds, read as training reads them (shorter side resized
with Lanczos, centre crop, RGB or grayscale) at the model's size; the classes are the folder's class
sub-folders (`data.folder.class_layout`, whatever the caption source); the held-out split is the one the
model was trained with (`data.split.holdout_split(n, min(holdout, n // 2), seed)`, or the last `holdout`
images for runs begun before the random split), or every image when the folder is a separate test folder
the model never saw (`holdout=None`); a dataset folder of train/ and test/ sub-folders (`split_layout`) is
its test folder. A folder is identified by its fingerprint: the sha256 of its image
files' relative paths and byte sizes, so a moved copy keeps it and another folder does not share it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data.folder import UNREADABLE, ImageFolder, class_layout
from ..data.split import holdout_split
from ..data.transforms import center_crop, resize_shorter, to_mode

logger = logging.getLogger("daguerre")

RANDOM_SPLIT = "random"  # held-out images drawn with `holdout_split` (training since issue 17)
LAST_SPLIT = "last"  # the last `holdout` images in sorted order (runs begun before the random split)
SPLITS = (RANDOM_SPLIT, LAST_SPLIT)
DEFAULT_HOLDOUT = 64  # the training default, `data.holdout`
MIN_SIZE = 4  # pixels
TRAIN_DIR, TEST_DIR = "train", "test"  # a dataset folder's two parts (`split_layout`)


@dataclass(frozen=True)
class FolderSpec:
    """Which images of which folder, read how, and which of them are held out."""

    root: str
    size: int  # side in pixels the images are read at (the model's data.size)
    channels: int = 3  # 3 = RGB, 1 = grayscale
    holdout: int | None = DEFAULT_HOLDOUT  # images kept out of training; None: all (a separate test folder)
    seed: int = 0  # data.seed of the split
    split: str = RANDOM_SPLIT  # RANDOM_SPLIT or LAST_SPLIT (runs begun before the random split)
    captions: str = "auto"  # caption source, as data.folder.captions

    def check(self) -> FolderSpec:
        if self.size < MIN_SIZE or self.channels not in (1, 3):
            raise ValueError(f"image size {self.size} and channels {self.channels}: need a size >= {MIN_SIZE} "
                             "and 1 (grayscale) or 3 (RGB) channels")
        if self.holdout is not None and self.holdout < 0 or self.seed < 0:
            raise ValueError(f"need a held-out count >= 0 and a seed >= 0, got {self.holdout} and {self.seed}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown held-out split {self.split!r}; daguerre knows {', '.join(SPLITS)}")
        return self


def fingerprint(root: Path, paths: list[Path]) -> str:
    """sha256 of the images' relative paths and byte sizes, in sorted order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


def split_indices(n: int, holdout: int | None, seed: int, split: str = RANDOM_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of a folder of `n` images, as training draws them: at most half of
    the folder is held out; `holdout=None` holds out every image."""
    if holdout is None:
        return np.arange(0), np.arange(n)
    h = min(holdout, n // 2)
    if split == LAST_SPLIT:
        return np.arange(n - h), np.arange(n - h, n)
    return holdout_split(n, h, seed)


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as training reads it (`data.transforms.ImageTransform`, centre crop, no flip):
    (size, size, channels) uint8."""
    with Image.open(path) as img:
        img.load()
        img = center_crop(resize_shorter(to_mode(ImageOps.exif_transpose(img), channels), size), size)
        a = np.array(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


class Folder:
    """The images of a `FolderSpec`: paths, captions, classes (names and per-image labels, or None), the
    train / held-out split and the fingerprint; `load` reads images by index."""

    def __init__(self, spec: FolderSpec) -> None:
        self.spec = spec.check()
        root = Path(spec.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data {spec.root}: no such folder")
        ds = ImageFolder(root, size=spec.size, captions=spec.captions, channels=spec.channels)
        self.root, self.paths, self.captions = root, ds.paths, ds.captions
        self.class_names, labels = class_layout(root, ds.paths)
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.train, self.held = split_indices(len(self.paths), spec.holdout, spec.seed, spec.split)
        self.fingerprint = fingerprint(root, self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """(images (N, C, size, size) uint8, the indices read): unreadable images are skipped, each named in
        a warning."""
        arrays, kept = [], []
        for i in indices:
            try:
                arrays.append(read_image(self.paths[int(i)], self.spec.size, self.spec.channels))
                kept.append(int(i))
            except UNREADABLE as e:
                logger.warning("skipping unreadable image %s: %s", self.paths[int(i)], e)
        if not arrays:
            shape = (0, self.spec.channels, self.spec.size, self.spec.size)
            return torch.zeros(shape, dtype=torch.uint8), np.asarray(kept, dtype=np.int64)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return x, np.asarray(kept, dtype=np.int64)

    def images(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """As `load`, in [-1, 1] float32."""
        x, kept = self.load(indices)
        return x.float() / 127.5 - 1, kept

    def describe(self) -> dict[str, Any]:
        """What a report or a classifier file records of this folder."""
        s = self.spec
        return {"kind": "folder", "root": str(self.root.resolve()), "fingerprint": self.fingerprint,
                "images": len(self), "size": s.size, "channels": s.channels,
                "holdout": "all" if s.holdout is None else len(self.held), "seed": s.seed, "split": s.split,
                "classes": list(self.class_names) if self.class_names else None}


def split_layout(root: str | Path) -> tuple[Path, Path] | None:
    """(ROOT/train, ROOT/test) when `root` is a dataset laid out as a train and a test folder (CIFAR-10's
    layout: ROOT/train/<class>/..., ROOT/test/<class>/...) with no other images or image folders beside them;
    else None."""
    from ..data.folder import IMAGE_EXTENSIONS

    root = Path(root).expanduser()
    train, test = root / TRAIN_DIR, root / TEST_DIR
    if not (train.is_dir() and test.is_dir()):
        return None
    for p in root.iterdir():
        if p.name.startswith(".") or p.name in (TRAIN_DIR, TEST_DIR):
            continue
        if p.is_dir() or p.name.lower().endswith(IMAGE_EXTENSIONS):
            return None
    return train, test


def names_words(names: list[str] | tuple[str, ...] | None, limit: int = 12) -> str:
    """Class names for a message: the first `limit`, and how many in all."""
    if not names:
        return "(no classes)"
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def first_image_format(root: str | Path) -> tuple[int, int]:
    """(shorter side, channels: 1 for grayscale modes, else 3) of the first image of a folder: the defaults of
    a classifier's input."""
    from ..data.folder import find_images

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    paths = find_images(root)
    if not paths:
        raise FileNotFoundError(f"no images found under {root}")
    with Image.open(paths[0]) as img:
        return min(img.size), 1 if img.mode in ("L", "LA", "1", "I", "I;16", "F") else 3
