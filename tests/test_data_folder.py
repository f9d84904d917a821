"""ImageFolder: caption sources, class folders, colour modes, resize/crop/flip, unreadable files, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.data import ImageFolder, collate

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path: Path, colour=RED, size=(40, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def as_rgb(t: torch.Tensor) -> tuple[int, ...]:
    """The uint8 colour of the centre pixel of a (C, H, W) tensor in [-1, 1]."""
    c, h, w = t.shape
    return tuple(int(round(v)) for v in ((t[:, h // 2, w // 2] + 1) * 127.5).tolist())


def test_txt_captions_sorted_order_and_shapes(tmp_path):
    solid(tmp_path / "b.png", GREEN)
    solid(tmp_path / "a.jpg", RED, size=(80, 50))
    solid(tmp_path / "sub" / "c.webp", BLUE)
    solid(tmp_path / ".hidden" / "x.png")  # hidden folders are ignored
    (tmp_path / "a.txt").write_text("  a red thing\n")
    (tmp_path / "sub" / "c.txt").write_text("blue")
    (tmp_path / "notes.md").write_text("not an image")
    ds = ImageFolder(tmp_path, size=16)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["a.jpg", "b.png", "sub/c.webp"]
    assert [ds[i]["caption"] for i in range(3)] == ["a red thing", "", "blue"]  # no .txt -> unconditional
    assert ds.class_names is None and "label" not in ds[0]
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert max(abs(a - b) for a, b in zip(as_rgb(item["image"]), RED, strict=True)) <= 3  # JPEG
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["caption"][0] == "a red thing"


def test_jsonl_metadata(tmp_path):
    solid(tmp_path / "x" / "one.png")
    solid(tmp_path / "two.png")
    solid(tmp_path / "three.png")
    rows = [{"file_name": "x/one.png", "text": "first"}, {"file_name": "two.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "two.txt").write_text("ignored: metadata wins")
    ds = ImageFolder(tmp_path, size=8)
    caps = {p.name: c for p, c in zip(ds.paths, ds.captions, strict=True)}
    assert caps == {"one.png": "first", "two.png": "second", "three.png": ""}


def test_csv_metadata(tmp_path):
    solid(tmp_path / "a.png")
    solid(tmp_path / "d" / "b.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a caption, with a comma"\nd/b.png,bee\n')
    ds = ImageFolder(tmp_path, size=8, captions="metadata")
    assert ds.captions == ["a caption, with a comma", "bee"]


def test_metadata_naming_a_missing_file(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"metadata.jsonl:1.*gone.png"):
        ImageFolder(tmp_path, size=8)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"text": "no file name"}) + "\n")
    with pytest.raises(ValueError, match="file_name"):
        ImageFolder(tmp_path, size=8)


def test_class_folders(tmp_path):
    for name, colour in (("cat", RED), ("dog", GREEN), ("apple_pie", BLUE)):
        for k in range(2):
            solid(tmp_path / name / f"{k}.png", colour)
    (tmp_path / "dog" / "1.txt").write_text("a dog on a sofa")
    ds = ImageFolder(tmp_path, size=8)
    assert ds.class_names == ["apple_pie", "cat", "dog"]
    assert [ds[i]["label"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert ds.captions == ["a photo of an apple pie"] * 2 + ["a photo of a cat"] * 2 + [
        "a photo of a dog", "a dog on a sofa"]
    assert as_rgb(ds[2]["image"]) == RED
    assert collate([ds[0], ds[3]])["label"].tolist() == [0, 1]
    assert ImageFolder(tmp_path, size=8, captions="none").captions == [""] * 6
    solid(tmp_path / "loose.png")
    assert ImageFolder(tmp_path, size=8).class_names is None  # not every image is in a class folder
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolder(tmp_path, size=8, captions="folders")


def test_colour_modes(tmp_path):
    solid(tmp_path / "gray.png", 100, mode="L")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent red
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 = blue
    pal.save(tmp_path / "pal.png")
    transparent = Image.new("P", (20, 20), 1)
    transparent.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    transparent.save(tmp_path / "pal_t.png", transparency=1)
    Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit gray
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    rgb = ImageFolder(tmp_path, size=8)
    got = {p.stem: as_rgb(rgb[k]["image"]) for k, p in enumerate(rgb.paths)}
    assert got["gray"] == (100, 100, 100) and got["rgba"] == (255, 255, 255) and got["pal"] == BLUE
    assert got["pal_t"] == (255, 255, 255) and got["deep"] == (127, 127, 127)
    assert got["cmyk"][0] > 240 and max(got["cmyk"][1:]) < 15
    gray = ImageFolder(tmp_path, size=8, channels=1)
    assert all(gray[k]["image"].shape == (1, 8, 8) for k in range(len(gray)))
    assert as_rgb(gray[gray.paths.index(tmp_path / "pal.png")]["image"]) == (29,)  # ITU-R 601 luma of blue


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (GREEN, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert as_rgb(ImageFolder(tmp_path, size=8)[0]["image"]) == GREEN


def test_resize_and_centre_crop(tmp_path):
    img = Image.new("RGB", (96, 32), RED)  # wide: red | green | blue thirds
    img.paste(GREEN, (32, 0, 64, 32))
    img.paste(BLUE, (64, 0, 96, 32))
    img.save(tmp_path / "wide.png")
    out = ImageFolder(tmp_path, size=16)[0]["image"]  # 96x32 -> 48x16 -> centre 16x16 = the green third
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out[:, 2:-2, 2:-2], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)


def test_flip_and_random_crop_are_seeded_per_epoch(tmp_path):
    img = Image.new("RGB", (32, 32), RED)
    img.paste(BLUE, (16, 0, 32, 32))
    img.save(tmp_path / "halves.png")
    ds = ImageFolder(tmp_path, size=32, flip=True, seed=5)
    firsts = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        a, b = ds[0]["image"], ds[0]["image"]
        assert torch.equal(a, b)  # same (seed, epoch, index) -> same augmentation
        firsts.append(as_rgb(a[:, :, :4]))
    assert {RED, BLUE} <= set(firsts)  # flipped in some epochs, not in others
    assert all(as_rgb(ImageFolder(tmp_path, size=32)[0]["image"][:, :, :4]) == RED for _ in range(3))  # flip off
    img.resize((64, 16)).save(tmp_path / "halves.png")  # wide: the crop can move along x
    crops = ImageFolder(tmp_path, size=16, crop="random", seed=1)
    views = set()
    for epoch in range(8):
        crops.set_epoch(epoch)
        views.add(crops[0]["image"].numpy().tobytes())
    assert len(views) > 1


def test_unreadable_files(tmp_path, caplog):
    solid(tmp_path / "a.png", RED)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    solid(tmp_path / "c.png", BLUE)
    ds = ImageFolder(tmp_path, size=8)
    with caplog.at_level(logging.WARNING, logger="daguerre"):
        assert as_rgb(ds[1]["image"]) == BLUE  # the next readable image
        assert as_rgb(ds[1]["image"]) == BLUE
    assert sum("b.png" in r.getMessage() for r in caplog.records) == 1  # logged once
    with pytest.raises(ValueError, match="b.png"):
        ImageFolder(tmp_path, size=8, on_error="raise")[1]
    truncated = (tmp_path / "c.png").read_bytes()
    (tmp_path / "c.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable images"):
        ImageFolder(tmp_path, size=8)[0]


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path, size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", size=8)
    solid(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="metadata"):
        ImageFolder(tmp_path, size=8, captions="metadata")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(tmp_path, size=8, on_error="ignore")
