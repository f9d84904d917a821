"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) read from its idx files, with class captions.

The idx format (LeCun et al., the MNIST distribution): a big-endian header of two zero bytes, a
type code (0x08 = unsigned byte), the number of dimensions, then one uint32 per dimension, then the
data. Images are magic 2051 (0x00000803, three dimensions N x 28 x 28), labels 2049 (0x00000801,
one dimension N). The 28x28 images are padded by 2 background pixels to 32x32, a size that halves
cleanly through a U-Net, and mapped to [-1, 1]. Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import to_tensor

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs them
INSTALL_HINT = (
    "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: files go to "
    f"{DEFAULT_ROOT}) or put the four idx files from https://github.com/zalandoresearch/fashion-mnist "
    "in a folder and pass it as root"
)
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIDE = 28
PAD = 2  # 28 + 2 * 2 = 32
NATIVE_SIZE = IMAGE_SIDE + 2 * PAD
BACKGROUND = 0  # Fashion-MNIST objects are light on a black (0) background
GZIP_MAGIC = b"\x1f\x8b"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
# noun phrases for captions, index-aligned with CLASS_NAMES
CAPTION_NOUNS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                 "a sneaker", "a bag", "an ankle boot")
CAPTION_TEMPLATES = ("a photo of {}", "{}", "a picture of {}", "a black and white photo of {}",
                     "a product photo of {}")


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """The array stored in an idx file (gzip-compressed or raw), checking magic, dims and length.

    Raises ValueError naming the file for a wrong magic number, an unsupported type code, a
    truncated or over-long body, or a corrupt gzip stream.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read idx file ({e}); is it a complete download?") from None
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes)")
    got_magic = struct.unpack(">I", data[:4])[0]
    if magic is not None and got_magic != magic:
        raise ValueError(f"{path}: idx magic number {got_magic}, expected {magic} "
                         f"({'images' if magic == IMAGES_MAGIC else 'labels'}); wrong or corrupt file?")
    zeros, dtype_code, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or dtype_code != 0x08 or ndim == 0:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {got_magic})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header (need {header} bytes, have {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: idx dims {dims} need {expected} bytes, the file has {len(data)} "
                         f"({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _candidates(root: Path, split: str, kind: str) -> list[Path]:
    """File names in use: the official ones (.gz or unpacked), Kaggle's dotted ones, torchvision's raw/ folder."""
    prefix = SPLIT_PREFIX[split]
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    folders = [root, root / "FashionMNIST" / "raw", root / "raw"]
    return [folder / (name + ext) for folder in folders for name in names for ext in (".gz", "")]


def find_file(root: str | Path, split: str, kind: str) -> Path:
    """The path of the `kind` ("images"/"labels") file of `split` under `root`, or FileNotFoundError."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    candidates = _candidates(Path(root), split, kind)
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(f"Fashion-MNIST {split} {kind} not found under {root} (looked for "
                            f"{candidates[0].name} and {len(candidates) - 1} other names); {INSTALL_HINT}")


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split, validated against each other."""
    img_path, lab_path = find_file(root, split, "images"), find_file(root, split, "labels")
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lab_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"{img_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{lab_path}: label {int(labels.max())} outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels


def class_caption(label: int, rng: np.random.Generator) -> str:
    """A caption of class `label`, e.g. "a photo of an ankle boot", phrasing drawn from `rng`."""
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(CAPTION_NOUNS[label])


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as dicts: image (1, size, size) in [-1, 1], label int, caption str.

    Images are padded 28 -> 32 with the background value; any other `size` resizes the padded image
    (Lanczos). Captions are deterministic per (seed, index); `captions=False` gives "" (unconditional).
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, split: str = "train", size: int = NATIVE_SIZE,
                 captions: bool = True, seed: int = 0) -> None:
        if size < 1 or seed < 0:
            raise ValueError(f"need size >= 1 and seed >= 0, got size={size}, seed={seed}")
        self.root, self.split, self.size, self.captions, self.seed = Path(root), split, size, captions, seed
        self.images, self.labels = load_split(root, split)
        self.class_names = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for Fashion-MNIST {self.split} ({len(self)} images)")
        img = np.pad(self.images[i], PAD, constant_values=BACKGROUND)  # (32, 32)
        pil = Image.fromarray(img, "L")
        if self.size != NATIVE_SIZE:
            pil = pil.resize((self.size, self.size), Image.Resampling.LANCZOS)
        label = int(self.labels[i])
        text = class_caption(label, np.random.default_rng((self.seed, i))) if self.captions else ""
        return {"image": to_tensor(pil), "label": label, "caption": text}
