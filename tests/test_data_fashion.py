"""Fashion-MNIST: idx files written by a tiny independent writer round-trip; bad files give errors naming them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from daguerre.data.fashion_mnist import CAPTION_NOUNS, CLASS_NAMES, FashionMNIST, read_idx

N = 12
UBYTE = 0x08


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True, magic: int | None = None) -> Path:
    """The idx format from its spec: 0x0000, type 0x08, ndim, big-endian uint32 dims, raw bytes."""
    if magic is None:
        magic = (UBYTE << 8) | array.ndim
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_split(root: Path, prefix: str = "train", n: int = N, seed: int = 0, compress: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % len(CLASS_NAMES)
    ext = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, compress=compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_and_padding(tmp_path, compress):
    images, labels = make_split(tmp_path, "t10k", compress=compress)
    ds = FashionMNIST(tmp_path, split="test")
    assert len(ds) == N
    for i in (0, 5, N - 1):
        item = ds[i]
        assert item["image"].shape == (1, 32, 32) and item["label"] == labels[i]
        want = torch.from_numpy(images[i].astype(np.float32)) / 127.5 - 1
        assert torch.allclose(item["image"][0, 2:30, 2:30], want, atol=1e-6)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(item["image"][0][border] == -1.0)  # padded with the black background


def test_other_sizes_resize(tmp_path):
    images, _ = make_split(tmp_path)
    images[:] = 255  # a white square on black: resizing keeps the square in the middle
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    for size in (16, 64):
        img = FashionMNIST(tmp_path, size=size)[0]["image"]
        assert img.shape == (1, size, size)
        c = size // 2
        assert img[0, c, c] > 0.99 and img[0, 0, 0] < -0.95
        white = ((img + 1) / 2).mean().item()  # resizing keeps the white area: (28 / 32)^2 of the image
        assert abs(white - (28 / 32) ** 2) < 0.02


def test_captions_per_class(tmp_path):
    make_split(tmp_path, n=40)
    ds = FashionMNIST(tmp_path, seed=3)
    for i in range(40):
        item = ds[i]
        assert CAPTION_NOUNS[item["label"]] in item["caption"]
        assert item["caption"] == FashionMNIST(tmp_path, seed=3)[i]["caption"]
    assert ds[9]["caption"].endswith("an ankle boot")
    assert len({ds[i]["caption"].replace(CAPTION_NOUNS[ds[i]["label"]], "") for i in range(40)}) > 2
    assert any(FashionMNIST(tmp_path, seed=4)[i]["caption"] != ds[i]["caption"] for i in range(40))
    assert FashionMNIST(tmp_path, captions=False)[0]["caption"] == ""


def test_wrong_magic_names_the_file(tmp_path):
    make_split(tmp_path)
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(N, np.uint8), magic=2051)
    with pytest.raises(ValueError, match=f"{bad.name}.*magic number 2051, expected 2049"):
        FashionMNIST(tmp_path)


def test_truncated_files_name_the_file(tmp_path):
    make_split(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # body shorter than the dims say
    with pytest.raises(ValueError, match=f"{path.name}.*truncated"):
        FashionMNIST(tmp_path)
    path.write_bytes(gzip.compress(raw)[:-50])  # the gzip stream itself cut short
    with pytest.raises(ValueError, match=path.name):
        read_idx(path)
    path.write_bytes(raw[:10])  # not even a full header
    with pytest.raises(ValueError, match=path.name):
        read_idx(path)


def test_count_mismatch(tmp_path):
    make_split(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(N - 1, np.uint8))
    with pytest.raises(ValueError, match=f"{N} images but .* {N - 1} labels"):
        FashionMNIST(tmp_path)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path)
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path, split="validation")


def test_the_installed_test_split(fashion_mnist):
    ds = FashionMNIST(split="test")
    assert len(ds) == 10000
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10  # balanced, as published
