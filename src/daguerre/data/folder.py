"""A folder of the user's own images, with captions from sidecar files, a metadata table or class folders.

The caption conventions are those of common text-to-image fine-tuning tools: a `.txt` beside each
image (same stem), or the Hugging Face `imagefolder` convention of a `metadata.jsonl` /
`metadata.csv` at the root with a `file_name` column (relative to the folder, sub-folders allowed)
and a `text` column; class sub-folders give integer labels and, when no text is given, captions
"a photo of a {class}". Images without any caption get "" (the unconditional prompt of
classifier-free guidance, Ho and Salimans 2022). Preprocessing is `ImageTransform`.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..untrusted import parse_json
from .transforms import ImageTransform

logger = logging.getLogger("daguerre")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TEXT_COLUMNS = ("text", "caption")  # first one present wins
CAPTION_MODES = ("auto", "txt", "metadata", "folders", "none")
ON_ERROR = ("skip", "raise")
CLASS_CAPTION = "a photo of {} {}"  # article, class name
MIN_CLASSES = 2  # a single sub-folder holding everything is a layout, not a class
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


def class_layout(root: Path, paths: list[Path]) -> tuple[list[str] | None, list[int] | None]:
    """(class names, label of each path) when every image sits in one of at least `MIN_CLASSES` sub-folders
    of `root` (the names sorted, a label indexing them), else (None, None); whatever the caption source."""
    rel = [p.relative_to(root).parts for p in paths]
    names = sorted({parts[0] for parts in rel if len(parts) > 1})
    if not (all(len(parts) > 1 for parts in rel) and len(names) >= MIN_CLASSES):
        return None, None
    index = {name: k for k, name in enumerate(names)}
    return names, [index[parts[0]] for parts in rel]


def _text_of(row: dict, where: str) -> str:
    for column in TEXT_COLUMNS:
        if column in row:
            value = row[column]
            return "" if value is None else str(value).strip()
    raise ValueError(f"{where}: no caption column (expected one of {', '.join(TEXT_COLUMNS)})")


def class_caption(folder: str) -> str:
    """"a photo of an apple" from a folder named "apple" ("_" and "-" read as spaces)."""
    name = folder.replace("_", " ").replace("-", " ").strip()
    return CLASS_CAPTION.format("an" if name[:1].lower() in "aeiou" else "a", name)


def read_metadata(path: Path) -> list[tuple[str, str, str]]:
    """Rows (file_name, text, where) of a metadata.jsonl / metadata.csv; `where` is "file:line" for errors."""
    rows = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                row = parse_json(line, where)  # ValueError naming the line, also for absurd nesting
                if not isinstance(row, dict) or "file_name" not in row:
                    raise ValueError(f"{where}: each line must be a JSON object with a 'file_name' key")
                rows.append((str(row["file_name"]), _text_of(row, where), where))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "file_name" not in reader.fieldnames:
                raise ValueError(f"{path}: the header must have a 'file_name' column, got {reader.fieldnames}")
            for n, row in enumerate(reader, 2):
                rows.append((row["file_name"], _text_of(row, f"{path}:{n}"), f"{path}:{n}"))
    return rows


class ImageFolder(torch.utils.data.Dataset):
    """The images under `root` as dicts: image (channels, size, size) in [-1, 1], caption str, and
    label int when the images sit in class sub-folders (names in `class_names`).

    `captions`: "auto" (metadata file, else `.txt` sidecars, else class names, else ""), or one
    source only: "txt", "metadata", "folders", "none". Unreadable images: `on_error="skip"` warns
    once per file and returns the next readable image; "raise" raises ValueError naming the file.
    Random crops and flips are drawn from a Generator seeded (seed, epoch, index): index the dataset
    with an (epoch, index) pair (`ds[(epoch, i)]`, what the training loaders do, so the epoch reaches
    DataLoader worker processes too) or call `set_epoch` (plain `ds[i]` then uses that epoch).
    """

    def __init__(self, root: str | Path, size: int = 256, captions: str = "auto", *, crop: str = "center",
                 flip: bool = False, channels: int = 3, on_error: str = "skip", seed: int = 0) -> None:
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.transform = ImageTransform(size, crop, flip, channels)
        self.on_error, self.seed, self.epoch = on_error, seed, 0
        self.paths = find_images(self.root)
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.class_names, self.labels = self._classes(captions)
        self.caption_source = "none"  # where the captions came from, for the training log (set by _captions)
        self.captions = self._captions(captions)
        self._bad: set[int] = set()

    def _classes(self, mode: str) -> tuple[list[str] | None, list[int] | None]:
        names, labels = class_layout(self.root, self.paths)
        has_metadata = any((self.root / m).is_file() for m in METADATA_FILES)
        if mode == "folders" and names is None:
            raise ValueError(f"captions='folders' needs every image under {self.root} in one of at least "
                             f"{MIN_CLASSES} class sub-folders")
        if names is None or (has_metadata and mode != "folders"):
            return None, None
        return names, labels

    def _captions(self, mode: str) -> list[str]:
        out = [""] * len(self.paths)
        if mode == "none":
            return out
        if mode in ("auto", "folders") and self.labels is not None:
            out = [class_caption(self.class_names[k]) for k in self.labels]
            self.caption_source = f"class folders ({len(self.class_names)} classes)"
        if mode == "folders":
            return out
        metadata = [self.root / m for m in METADATA_FILES if (self.root / m).is_file()]
        if mode == "metadata" and not metadata:
            raise FileNotFoundError(f"captions='metadata' but there is no {' or '.join(METADATA_FILES)} in {self.root}")
        if metadata and mode in ("auto", "metadata"):
            if len(metadata) > 1:
                logger.warning("%s: both metadata files present; using %s", self.root, metadata[0].name)
            self.caption_source = metadata[0].name
            return self._from_metadata(metadata[0], out)
        sidecars = 0
        for k, p in enumerate(self.paths):  # .txt sidecars
            txt = p.with_suffix(".txt")
            if txt.is_file():
                out[k] = txt.read_text(encoding="utf-8").strip()
                sidecars += 1
        if sidecars:
            others = "empty captions" if self.caption_source == "none" else self.caption_source
            rest = "" if sidecars == len(self.paths) else f", {others} for the rest"
            self.caption_source = f".txt sidecars ({sidecars} of {len(self.paths)} images{rest})"
        return out

    def _from_metadata(self, path: Path, out: list[str]) -> list[str]:
        index = {p.resolve(): k for k, p in enumerate(self.paths)}
        listed = set()
        for file_name, text, where in read_metadata(path):
            target = (self.root / file_name).resolve()
            if target not in index:
                raise FileNotFoundError(f"{where}: file_name {file_name!r} is not an image under {self.root}")
            out[index[target]] = text
            listed.add(target)
        missing = len(self.paths) - len(listed)
        if missing:
            logger.warning("%s: %d images are not listed in %s; they get the empty caption", self.root, missing,
                           path.name)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentations (random crop, flip) for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, k: int, epoch: int) -> torch.Tensor | None:
        if k in self._bad:
            return None
        try:
            with Image.open(self.paths[k]) as img:
                img.load()  # a GIF's first frame
                rng = np.random.default_rng((self.seed, epoch, k))
                return self.transform(img, rng)
        except UNREADABLE as e:
            if self.on_error == "raise":
                raise ValueError(f"cannot read image {self.paths[k]}: {e}") from None
            logger.warning("skipping unreadable image %s: %s", self.paths[k], e)
            self._bad.add(k)
            return None

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item `key` = i (augmentations of `self.epoch`) or (epoch, i)."""
        epoch, i = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for an ImageFolder of {len(self)} images")
        for step in range(len(self)):
            k = (i + step) % len(self)
            image = self._load(k, epoch)
            if image is not None:
                item = {"image": image, "caption": self.captions[k]}
                if self.labels is not None:
                    item["label"] = self.labels[k]
                return item
        raise ValueError(f"no readable images under {self.root} (all {len(self)} failed to load)")
