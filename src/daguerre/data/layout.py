"""Layouts and semantic maps: the two spatial conditions of issue 18, as data (docs/layout.md).

A layout is a list of objects, each a phrase and a box (x0, y0, x1, y1) in [0, 1] image coordinates, y
pointing down (`LayoutObject`; read from JSON by `parse_layout`, from `--box "phrase:x0,y0,x1,y1"` by
`parse_box`). A layout model reads it as tokens (LDM, Rombach et al. 2022, Sec. 4.3.1: each object its
phrase's words and its box's corners quantised on a grid; `encode_layout`).

A semantic map gives every pixel one label (`LabelMap`). As a file it is a PNG whose colours name the
labels through one fixed palette, `PALETTE`: the PASCAL VOC colour map (Everingham et al. 2010), so label 0
(the background) is black, label 1 dark red (128, 0, 0), label 2 dark green (0, 128, 0), ...; a
palette-mode ("P") PNG with that palette, as PASCAL's own label files are, reads the same. `read_label_map`
refuses any other colour by name (a map drawn with anti-aliased edges has such colours). In a PNG's
parameters a map is its size and its labels, zlib-compressed, in base64 (`LabelMap.encode`), so
`--from-png` makes the image again.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import LayoutConfig

PALETTE_SIZE = 256
MAX_LAYOUT_OBJECTS = 64  # objects of any layout a request may give (a model takes at most its own max_objects)
MAX_PHRASE_CHARS = 200
MAX_NAMED_COLOURS = 5  # unknown colours an error message names
MAX_ENCODED_CHARS = 4 * 1024 * 1024  # a map's text in PNG parameters (a 2048x2048 map of shapes is ~10 kB)
_WORD = re.compile(r"[a-z0-9]+")
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


def voc_colour(i: int) -> tuple[int, int, int]:
    """Colour i of the PASCAL VOC colour map: the bits of i spread over the high bits of R, G and B."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((i >> 0) & 1) << shift
        g |= ((i >> 1) & 1) << shift
        b |= ((i >> 2) & 1) << shift
        i >>= 3
    return r, g, b


PALETTE: tuple[tuple[int, int, int], ...] = tuple(voc_colour(i) for i in range(PALETTE_SIZE))


# --- semantic maps --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelMap:
    """A semantic map: `width` x `height` labels (row-major uint8 bytes), label i drawn as `PALETTE[i]`."""

    width: int
    height: int
    data: bytes

    @classmethod
    def from_array(cls, labels: np.ndarray) -> LabelMap:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype != np.uint8:
            raise ValueError(f"a label map is a 2-D uint8 array, got {labels.dtype} of shape {labels.shape}")
        return cls(int(labels.shape[1]), int(labels.shape[0]), labels.tobytes())

    def array(self) -> np.ndarray:
        """(height, width) uint8 labels."""
        return np.frombuffer(self.data, np.uint8).reshape(self.height, self.width)

    def image(self) -> Image.Image:
        """The map as a palette-mode PNG image in `PALETTE`'s colours (what `read_label_map` reads back)."""
        im = Image.fromarray(self.array(), "P")
        im.putpalette([c for rgb in PALETTE for c in rgb])
        return im

    def resized(self, width: int, height: int) -> LabelMap:
        """The map at width x height, nearest neighbour (labels are never blended)."""
        if (width, height) == (self.width, self.height):
            return self
        return LabelMap.from_array(np.asarray(Image.fromarray(self.array(), "L").resize((width, height),
                                                                                      Image.Resampling.NEAREST)))

    def encode(self) -> str:
        """"WxH <base64 of the zlib-compressed labels>": the map in PNG parameters."""
        return f"{self.width}x{self.height} {base64.b64encode(zlib.compress(self.data, 9)).decode()}"

    @classmethod
    def decode(cls, text: str, max_pixels: float, source: str = "semantic map") -> LabelMap:
        """The inverse of `encode`; a ValueError naming `source` for text that is not one, or a map of more than
        `max_pixels` labels (checked before it is decompressed, and the decompression is bounded by it)."""
        size, _, blob = text.strip().partition(" ")
        m = _SIZE.fullmatch(size)
        if not m or len(text) > MAX_ENCODED_CHARS:
            raise ValueError(f"{source}: {text[:40]!r}... is not a semantic map (WIDTHxHEIGHT and base64 labels)")
        width, height = int(m.group(1)), int(m.group(2))
        if not (1 <= width and 1 <= height and width * height <= max_pixels):
            raise ValueError(f"{source}: a {width}x{height} map is over the limit of {max_pixels:.0f} pixels")
        try:
            packed = base64.b64decode(blob, validate=True)
            inflate = zlib.decompressobj()
            data = inflate.decompress(packed, width * height + 1)
        except (binascii.Error, zlib.error, ValueError) as e:
            raise ValueError(f"{source}: the labels of the {width}x{height} map do not decode ({e})") from None
        if len(data) != width * height or inflate.unconsumed_tail:
            raise ValueError(f"{source}: the labels are not {width}x{height} values")
        return cls(width, height, data)


def read_label_map(image: Image.Image, labels: Sequence[str], name: str = "semantic map") -> LabelMap:
    """The labels of a map image whose colours are `PALETTE`'s first len(labels) colours (RGB, or a palette
    PNG); a ValueError naming the first unknown colours (and where one is) otherwise."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = np.array([(r << 16) | (g << 8) | b for r, g, b in PALETTE[:len(labels)]], dtype=np.int32)
    order = np.argsort(known)
    pos = np.clip(np.searchsorted(known[order], code), 0, len(known) - 1)
    found = known[order][pos] == code
    if not found.all():
        bad = np.unique(code[~found])
        ys, xs = np.nonzero(code == bad[0])
        shown = ", ".join(f"#{int(c):06x}" for c in bad[:MAX_NAMED_COLOURS])
        more = f" and {len(bad) - MAX_NAMED_COLOURS} more" if len(bad) > MAX_NAMED_COLOURS else ""
        raise ValueError(f"{name} has colours that name no label: {shown}{more} (first at x={xs[0]}, y={ys[0]}); "
                         f"use the palette of docs/layout.md: {palette_legend(labels)}")
    return LabelMap.from_array(order[pos].astype(np.uint8))


def palette_legend(labels: Sequence[str]) -> str:
    """'background #000000, circle #800000, ...': the colour of each label."""
    return ", ".join(f"{name} #{r:02x}{g:02x}{b:02x}" for name, (r, g, b) in zip(labels, PALETTE, strict=False))


def label_fractions(labels: torch.Tensor, count: int, factor: int) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, count, H/factor, W/factor) float32: the fraction of each cell's pixels
    that carry each label (a one-hot map, area-pooled): the semantic map a model sees on its latent grid."""
    one_hot = torch.nn.functional.one_hot(labels.long(), count).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    return torch.nn.functional.avg_pool2d(one_hot, factor) if factor > 1 else one_hot


# --- layouts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout: what it is (`phrase`) and where (`box` = (x0, y0, x1, y1) in [0, 1], y down)."""

    phrase: str
    box: tuple[float, float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "box": list(self.box)}


def make_object(phrase: Any, box: Any, where: str) -> LayoutObject:
    """A checked `LayoutObject`; a ValueError naming `where` (the object's place in the input) otherwise."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"{where}: the phrase must be non-empty text, got {phrase!r}")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise ValueError(f"{where}: the phrase is {len(phrase)} characters long, more than {MAX_PHRASE_CHARS}")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{where}: the box must be four numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(f"{where}: box {list(box)} is outside the image; coordinates are fractions in [0, 1]")
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: box {list(box)} is empty: need x1 > x0 and y1 > y0 (x0, y0 the top-left corner)")
    return LayoutObject(phrase.strip(), (x0, y0, x1, y1))


def parse_layout(value: Any, source: str = "layout") -> tuple[LayoutObject, ...]:
    """A layout from its JSON value: a list of {"phrase": ..., "box": [x0, y0, x1, y1]}; ValueError naming
    `source` and the object otherwise, or for more than `MAX_LAYOUT_OBJECTS` objects."""
    if isinstance(value, (LayoutObject,)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{source}: a layout is a list of objects {{\"phrase\": ..., \"box\": [x0, y0, x1, y1]}}, "
                         f"got {type(value).__name__}")
    if len(value) > MAX_LAYOUT_OBJECTS:
        raise ValueError(f"{source}: {len(value)} objects, more than {MAX_LAYOUT_OBJECTS}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, LayoutObject):
            item = item.to_json()
        if not isinstance(item, dict) or set(item) != {"phrase", "box"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{source}: object {i} must have exactly the keys phrase and box, got {keys}")
        out.append(make_object(item["phrase"], item["box"], f"{source}: object {i}"))
    return tuple(out)


def parse_box(text: str) -> LayoutObject:
    """`--box "a red circle:0.1,0.1,0.4,0.4"`: a phrase, a colon, then x0,y0,x1,y1 in [0, 1]."""
    phrase, sep, numbers = str(text).rpartition(":")
    parts = [p.strip() for p in numbers.split(",")]
    try:
        box = [float(p) for p in parts] if sep else None
    except ValueError:
        box = None
    if box is None or len(box) != 4:
        raise ValueError(f"--box {text!r}: expected PHRASE:x0,y0,x1,y1, e.g. \"a red circle:0.1,0.1,0.4,0.4\"")
    return make_object(phrase, box, f"--box {text!r}")


def layout_text(objects: Sequence[LayoutObject]) -> str:
    """The layout as compact JSON (what PNG parameters and the server's info hold)."""
    return json.dumps([o.to_json() for o in objects], separators=(",", ":"))


def phrase_words(phrase: str) -> list[str]:
    """The words of a phrase: lower-case runs of letters and digits."""
    return _WORD.findall(phrase.lower())


def check_layout(objects: Sequence[LayoutObject], cfg: LayoutConfig) -> None:
    """Raise a ValueError naming what a layout model cannot read: too many objects, a phrase of too many
    words, words outside its vocabulary."""
    if len(objects) > cfg.max_objects:
        raise ValueError(f"the layout has {len(objects)} objects; this model takes at most {cfg.max_objects}")
    known = set(cfg.vocabulary)
    for i, obj in enumerate(objects):
        words = phrase_words(obj.phrase)
        if not words:
            raise ValueError(f"layout object {i}: phrase {obj.phrase!r} has no words")
        if len(words) > cfg.phrase_words:
            raise ValueError(f"layout object {i}: phrase {obj.phrase!r} has {len(words)} words; this model reads "
                             f"at most {cfg.phrase_words} per object")
        unknown = [w for w in words if w not in known]
        if unknown:
            raise ValueError(f"layout object {i}: {', '.join(map(repr, unknown))} in {obj.phrase!r} "
                             f"{'is' if len(unknown) == 1 else 'are'} not in this model's vocabulary: "
                             f"{' '.join(cfg.vocabulary)}")


def quantise(v: float, grid: int) -> int:
    """The cell of a coordinate in [0, 1] on a grid of `grid` cells per axis (1.0 falls in the last)."""
    return min(grid - 1, int(v * grid))


def encode_layout(objects: Sequence[LayoutObject], cfg: LayoutConfig) -> torch.Tensor:
    """(max_objects, phrase_words + 4) int64 tokens (`check_layout` first): per object its word ids (i + 1 for
    vocabulary word i, 0 after the phrase's last word), then its box corners x0, y0, x1, y1 quantised on
    `cfg.grid` cells; rows past the last object are the empty object (`null_layout`)."""
    check_layout(objects, cfg)
    ids = {w: i + 1 for i, w in enumerate(cfg.vocabulary)}
    out = null_layout(cfg)
    for row, obj in zip(out, objects, strict=False):
        words = [ids[w] for w in phrase_words(obj.phrase)]
        row[:len(words)] = torch.tensor(words)
        row[cfg.phrase_words:] = torch.tensor([quantise(v, cfg.grid) for v in obj.box])
    return out


def null_layout(cfg: LayoutConfig) -> torch.Tensor:
    """The tokens of no layout: every object empty (word 0, the corner `cfg.grid`, which no box has)."""
    out = torch.zeros(cfg.max_objects, cfg.phrase_words + 4, dtype=torch.long)
    out[:, cfg.phrase_words:] = cfg.grid
    return out


def draw_layout(objects: Sequence[LayoutObject], width: int, height: int) -> Image.Image:
    """A picture of a layout: each box outlined on black in the colour its phrase names (a shapes-world colour),
    else in white; for sample grids and docs."""
    from PIL import ImageDraw

    from .shapes import COLOURS

    im = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    for obj in objects:
        named = [COLOURS[w] for w in phrase_words(obj.phrase) if w in COLOURS and w != "black"]
        x0, y0, x1, y1 = obj.box
        box = (round(x0 * width), round(y0 * height), max(round(x0 * width), round(x1 * width) - 1),
               max(round(y0 * height), round(y1 * height) - 1))
        draw.rectangle(box, outline=named[0] if named else (255, 255, 255))
    return im
