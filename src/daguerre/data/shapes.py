"""The shapes world: a procedural, seeded text-to-image dataset of coloured shapes with exact ground truth.

A small compositional world in the spirit of CLEVR (Johnson et al., CVPR 2017) and of the
attribute-binding and spatial-relation checks of GenEval (Ghosh et al., NeurIPS 2023): one to three
shapes, each with a colour, a size and a position on a 3x3 grid, optionally two of them in a spatial
relation that the layout makes geometrically true with a margin. Every image comes with its `Scene`
(the ground truth an evaluation's attribute classifiers are scored against), several caption
phrasings, and `parse_caption`, the inverse of the caption grammar, so an evaluation can tell what
a prompt asks for. Images are drawn at 4x and box-filtered down, i.e. exact area anti-aliasing.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .transforms import to_tensor

# --- the world's vocabulary ------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
LABELS = ("background", *SHAPES)  # the labels of a shapes-world semantic map (`render_labels`)
HOLLOW_SHAPES = ("ring",)  # the centre shows the background; the colour is on the stroke
COLOURS: dict[str, tuple[int, int, int]] = {  # chosen to stay distinct from each other at 64x64
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 25),
    "green": (30, 180, 50),
    "cyan": (0, 215, 230),
    "blue": (30, 70, 235),
    "purple": (145, 40, 200),
    "pink": (255, 120, 190),
    "brown": (140, 80, 30),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = ("black", "white")  # an object never has its background's colour
DEFAULT_BACKGROUND = "black"
P_WHITE_BACKGROUND = 0.25
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.1, "large": 0.16}  # half the longer side of the bounding box, in image widths
GRID = (0.2, 0.5, 0.8)  # cell centres along each axis (x left->right, y top->bottom)
ROW_WORDS = ("top", "", "bottom")
COL_WORDS = ("left", "", "right")
REGIONS = tuple(" ".join(w for w in (r, c) if w) or "centre" for r in ROW_WORDS for c in COL_WORDS)  # row-major
JITTER = 0.03  # uniform offset of a centre from its cell centre
MIN_GAP = 0.03  # every two bounding boxes are at least this far apart along x or y
RELATION_GAP = 0.05  # related objects' boxes are this far apart along the relation's axis
RELATIONS = ("above", "below", "to the left of", "to the right of")
INVERSE_RELATION = {"above": "below", "below": "above", "to the left of": "to the right of",
                    "to the right of": "to the left of"}
MAX_LAYOUT_TRIES = 2000
MAX_SIZE_DRAWS = 10  # sizes drawn again when no layout fits them
FREE_TRIES = 200  # free placement: draws of one object's place among those placed before it
MAX_OBJECTS = 4  # objects per scene (captioned datasets have used 1-3; layout models train on 1-4)
PLACEMENTS = ("grid", "free")  # centres on the 3x3 grid with jitter, or anywhere the box fits in the image
SUPERSAMPLE = 4  # draw at 4x, then average 4x4 blocks
RING_INNER = 0.55  # inner radius of a ring, as a fraction of its outer radius
CROSS_ARM = 0.32  # half-width of a cross's arms, as a fraction of its radius
STAR_INNER = 0.45  # inner vertices of the five-pointed star
HEART_POINTS = 48
# shapes the renderer draws that no sampled scene has (`sample_scene` draws from SHAPES only, so the world's
# scenes stay bit for bit): a new concept to teach a trained model (docs/lora.md, the hexagon LoRA)
EXTRA_SHAPES = ("hexagon",)

# caption grammar: probabilities of mentioning optional attributes (all 1 with complete=True)
P_NATURAL = 0.7  # "a large red circle at the top" vs the tag style "red circle, large, top"
P_SIZE = 0.85
P_REGION = 0.7
P_DEFAULT_BACKGROUND = 0.3  # a non-default background is always named
P_SYNONYM = 0.25  # "big"/"little" for large/small
SIZE_SYNONYMS = {"large": ("large", "big"), "small": ("small", "little")}
CENTRE_PHRASES = ("in the centre", "in the middle", "in the center")


# --- ground truth ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is, and where (coordinates are fractions of the image, y pointing down)."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    region: str  # grid cell name: "top left", "top", ..., "centre", ..., "bottom right"
    position: tuple[float, float]  # centre (x, y) in [0, 1]
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1], tight around the drawn shape
    scale: float = 1.0  # its radius is SIZE_RADIUS[size] * scale image widths (1 / k: a tile of `tile_scenes`)


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` is `relation` `objects[object]`, e.g. (0, "above", 1)."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Scene:
    """Everything in one image: the ground truth of a shapes-world sample."""

    objects: tuple[ShapeObject, ...]
    background: str = DEFAULT_BACKGROUND
    relation: Relation | None = None


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: float = 0.0) -> bool:
    """Whether `a` is `relation` `b` with the boxes at least `margin` apart along the relation's axis."""
    if relation == "above":
        return a.bbox[3] + margin <= b.bbox[1]
    if relation == "below":
        return b.bbox[3] + margin <= a.bbox[1]
    if relation == "to the left of":
        return a.bbox[2] + margin <= b.bbox[0]
    if relation == "to the right of":
        return b.bbox[2] + margin <= a.bbox[0]
    raise ValueError(f"unknown relation {relation!r}; choose one of {RELATIONS}")


# --- geometry --------------------------------------------------------------------------------------

def _normalise(points: list[tuple[float, float]]) -> np.ndarray:
    """Centre a polygon's bounding box on the origin and scale its longer half-side to 1."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _star() -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else STAR_INNER) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else STAR_INNER) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]


def _cross() -> list[tuple[float, float]]:
    w = CROSS_ARM
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _heart() -> list[tuple[float, float]]:
    """The classic parametric heart (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), y flipped."""
    ts = np.linspace(0, 2 * math.pi, HEART_POINTS, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
    return list(zip(x.tolist(), (-y).tolist(), strict=True))


_POLYGONS: dict[str, np.ndarray] = {
    "square": _normalise([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]) * 0.85,
    "diamond": _normalise([(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]),
    "triangle": _normalise([(0, -1), (1, 0.8), (-1, 0.8)]),
    "star": _normalise(_star()),
    "cross": _normalise(_cross()),
    "heart": _normalise(_heart()),
    # EXTRA_SHAPES: a regular hexagon with flat top and bottom (vertices at 0, 60, ... degrees)
    "hexagon": _normalise([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]),
}
# half-width and half-height of each shape's box, in units of its radius
_HALF_EXTENT = {s: tuple(np.abs(p).max(0).tolist()) for s, p in _POLYGONS.items()} | {"circle": (1.0, 1.0),
                                                                                      "ring": (1.0, 1.0)}


def _make_object(shape: str, colour: str, size: str, cell: int, centre: tuple[float, float]) -> ShapeObject:
    r = SIZE_RADIUS[size]
    hx, hy = _HALF_EXTENT[shape]
    x, y = centre
    return ShapeObject(shape, colour, size, REGIONS[cell], (x, y), (x - r * hx, y - r * hy, x + r * hx, y + r * hy))


def _gap(a: ShapeObject, b: ShapeObject) -> float:
    """The largest separation of two boxes along x or y (negative when they overlap)."""
    return max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2], b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])


def tile_scenes(scenes: Sequence[Scene], k: int, background: str | None = None) -> Scene:
    """`k` x `k` scenes as one scene on a canvas `k` times as wide (LDM's larger semantic maps, Sec. 4.3.2: a
    wider view, not a zoom): scene t fills tile (row t // k, column t % k), its objects at their own size in
    pixels (`scale` 1 / k of the canvas) and their coordinates mapped into the tile, so `render(canvas, k * s)`
    draws each tile as `render(scene, s)` draws its scene. One `background` for all (default: the first
    scene's); each object's region is the canvas's nearest grid cell; no relation."""
    if not (isinstance(k, int) and k >= 1) or len(scenes) != k * k:
        raise ValueError(f"tile_scenes needs k >= 1 and k * k scenes, got k={k!r} and {len(scenes)} scenes")
    background = background or scenes[0].background
    objects = []
    for t, scene in enumerate(scenes):
        row, col = divmod(t, k)
        for obj in scene.objects:
            if obj.colour == background:
                raise ValueError(f"tile {t} has a {obj.colour} {obj.shape}, invisible on the canvas's {background} "
                                 "background: tile scenes of that background, or another background")
            x, y = (col + obj.position[0]) / k, (row + obj.position[1]) / k
            x0, y0, x1, y1 = obj.bbox
            cell = 3 * int(np.argmin([abs(y - g) for g in GRID])) + int(np.argmin([abs(x - g) for g in GRID]))
            objects.append(ShapeObject(obj.shape, obj.colour, obj.size, REGIONS[cell], (x, y),
                                       ((col + x0) / k, (row + y0) / k, (col + x1) / k, (row + y1) / k),
                                       obj.scale / k))
    return Scene(tuple(objects), background)


# --- sampling --------------------------------------------------------------------------------------

def sample_scene(rng: np.random.Generator, *, min_objects: int = 1, max_objects: int = 3,
                 p_relation: float = 0.5, placement: str = "grid") -> Scene:
    """A random scene: kinds, colours and sizes are drawn first, then a layout by rejection.

    Objects have distinct (colour, shape) pairs, so every caption refers to each object
    unambiguously. The layout puts objects in distinct grid cells with jitter (`placement` "grid"), or
    their centres anywhere the box stays inside the image ("free": the region named is the nearest grid
    cell's), and is redrawn until every two boxes are `MIN_GAP` apart and the relation (if any) holds
    with `RELATION_GAP`; free objects are placed one at a time (`_free_layout`). Should `MAX_LAYOUT_TRIES` find
    no layout (four large objects and a relation on the grid), the sizes are drawn again.
    """
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    n = int(rng.integers(min_objects, max_objects + 1))
    background = "white" if rng.random() < P_WHITE_BACKGROUND else DEFAULT_BACKGROUND
    palette = [c for c in COLOURS if c != background]
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = (SHAPES[rng.integers(len(SHAPES))], palette[rng.integers(len(palette))])
        if kind not in kinds:
            kinds.append(kind)
    sizes = [SIZES[k] for k in rng.integers(len(SIZES), size=n)]
    relation = None
    if n >= 2 and rng.random() < p_relation:
        relation = Relation(0, RELATIONS[rng.integers(len(RELATIONS))], 1)
    for _ in range(MAX_SIZE_DRAWS):
        for _ in range(MAX_LAYOUT_TRIES):
            if placement == "free":
                objects = _free_layout(kinds, sizes, relation, rng)
            else:
                cells = rng.choice(len(REGIONS), size=n, replace=False)
                jitter = rng.uniform(-JITTER, JITTER, size=(n, 2))
                objects = tuple(
                    _make_object(shape, colour, size, int(c), (GRID[c % 3] + jx, GRID[c // 3] + jy))
                    for (shape, colour), size, c, (jx, jy) in zip(kinds, sizes, cells, jitter.tolist(), strict=True)
                )
            if objects is not None and _fits(objects, relation):
                return Scene(objects, background, relation)
        sizes = [SIZES[k] for k in rng.integers(len(SIZES), size=n)]
    raise RuntimeError(f"no layout found in {MAX_SIZE_DRAWS} x {MAX_LAYOUT_TRIES} tries for {kinds} {relation}")


def _fits(objects: Sequence[ShapeObject], relation: Relation | None) -> bool:
    """Every two boxes `MIN_GAP` apart, and the relation (if any, and both its objects placed) true."""
    return all(_gap(a, b) >= MIN_GAP for a, b in itertools.combinations(objects, 2)) and (
        relation is None or len(objects) <= max(relation.subject, relation.object)
        or relation_holds(objects[relation.subject], objects[relation.object], relation.relation, RELATION_GAP))


def _free_layout(kinds: list[tuple[str, str]], sizes: list[str], relation: Relation | None,
                 rng: np.random.Generator) -> tuple[ShapeObject, ...] | None:
    """Objects placed one at a time, each anywhere it fits beside those before it (`FREE_TRIES` draws each);
    None when one finds no place."""
    objects: list[ShapeObject] = []
    for (shape, colour), size in zip(kinds, sizes, strict=True):
        for _ in range(FREE_TRIES):
            obj = _free_object(shape, colour, size, rng)
            if _fits([*objects, obj], relation):
                objects.append(obj)
                break
        else:
            return None
    return tuple(objects)


def _free_object(shape: str, colour: str, size: str, rng: np.random.Generator) -> ShapeObject:
    """An object whose centre is anywhere its box fits in the image; its region is the nearest grid cell's."""
    hx, hy = (SIZE_RADIUS[size] * h for h in _HALF_EXTENT[shape])
    x, y = float(rng.uniform(hx, 1 - hx)), float(rng.uniform(hy, 1 - hy))
    col, row = (int(np.argmin([abs(v - g) for g in GRID])) for v in (x, y))
    return _make_object(shape, colour, size, 3 * row + col, (x, y))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape of radius `r` centred at pixel coordinates (cx, cy) (PIL's: integers on pixel centres)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=round(r * (1 - RING_INNER)))
    else:
        draw.polygon((_POLYGONS[shape] * r + (cx, cy)).ravel().tolist(), fill=fill)


def _draw_objects(draw: ImageDraw.ImageDraw, scene: Scene, s: int, fill_of) -> None:
    """Draw the objects of `scene` on a canvas `s` pixels wide, each filled with `fill_of(obj)`."""
    for obj in scene.objects:
        r = SIZE_RADIUS[obj.size] * obj.scale * s
        _draw_shape(draw, obj.shape, obj.position[0] * s - 0.5, obj.position[1] * s - 0.5, r, fill_of(obj))


def shape_mask(shape: str, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """(height, width) bool: `shape` drawn as `render` draws it, scaled to fill `box` ((x0, y0, x1, y1) in [0, 1]);
    a pixel is in when most of its 4x4 sub-pixels are. What a judge compares a found object's pixels with."""
    hx, hy = _HALF_EXTENT[shape]
    x0, y0, x1, y1 = box
    s = SUPERSAMPLE
    r = ((x1 - x0) * width / hx + (y1 - y0) * height / hy) / 4 * s  # the radius that fits the box, mean of x and y
    img = Image.new("L", (width * s, height * s), 0)
    _draw_shape(ImageDraw.Draw(img), shape, (x0 + x1) / 2 * width * s - 0.5, (y0 + y1) / 2 * height * s - 0.5, r, 1)
    sub = np.asarray(img).reshape(height, s, width, s)
    return sub.sum((1, 3)) * 2 > s * s


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as a `size` x `size` RGB image: polygons at 4x, then 4x4 box averaging."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), COLOURS[scene.background])
    _draw_objects(ImageDraw.Draw(img), scene, s, lambda obj: COLOURS[obj.colour])
    return img.reduce(SUPERSAMPLE)


def render_labels(scene: Scene, size: int = 64) -> np.ndarray:
    """The semantic map of a scene: (size, size) uint8, 0 for the background and 1 + SHAPES.index(shape) for
    each object's pixels (`LABELS`). Drawn as `render` draws, at 4x; each pixel takes the label most of its
    4x4 sub-pixels have (ties: the lowest label)."""
    s = size * SUPERSAMPLE
    img = Image.new("L", (s, s), 0)
    _draw_objects(ImageDraw.Draw(img), scene, s, lambda obj: LABELS.index(obj.shape))
    sub = np.asarray(img).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).transpose(0, 2, 1, 3).reshape(size, size, -1)
    counts = (sub[..., None] == np.arange(len(LABELS), dtype=np.uint8)).sum(2)  # (size, size, labels)
    return counts.argmax(-1).astype(np.uint8)


# --- captions --------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _region_phrase(region: str, rng: np.random.Generator, natural: bool) -> str:
    if region == "centre":
        return CENTRE_PHRASES[rng.integers(len(CENTRE_PHRASES))] if natural or rng.random() < 0.5 else "centre"
    if not natural and rng.random() < 0.5:
        return region  # tag style: "top left"
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return (f"at the {region}", f"in the {region} corner", f"in the {region}")[rng.integers(3)]


def caption(scene: Scene, rng: np.random.Generator, *, complete: bool = False) -> str:
    """One caption of `scene`, phrasing drawn from `rng`; `complete` mentions every attribute.

    Every object is named by colour and shape; its size and grid position are mentioned with
    probability `P_SIZE` / `P_REGION` (positions of the two related objects are implied by the
    relation and not named); the relation may be stated either way round ("A above B" or
    "B below A"). Two styles: natural ("a large red circle above a small blue square on a white
    background") and tags ("red circle, large, above blue square, small, white background").
    """
    p_size, p_region, p_bg = (1.0, 1.0, 1.0) if complete else (P_SIZE, P_REGION, P_DEFAULT_BACKGROUND)
    natural = rng.random() < P_NATURAL

    def phrase(i: int, with_region: bool) -> str:
        obj = scene.objects[i]
        size = None
        if rng.random() < p_size:
            size = SIZE_SYNONYMS[obj.size][1] if rng.random() < P_SYNONYM else obj.size
        region = _region_phrase(obj.region, rng, natural) if with_region and rng.random() < p_region else None
        if natural:
            words = [w for w in (size, obj.colour, obj.shape) if w]
            return " ".join([_article(words[0]), *words] + ([region] if region else []))
        return ", ".join([f"{obj.colour} {obj.shape}"] + [w for w in (size, region) if w])

    items, related = [], set()
    rel = scene.relation
    if rel is not None:
        s, r, o = rel.subject, rel.relation, rel.object
        if rng.random() < 0.5:
            s, r, o = o, INVERSE_RELATION[r], s
        related = {s, o}
        items.append(f"{phrase(s, False)}{' ' if natural else ', '}{r} {phrase(o, False)}")
    items += [phrase(i, True) for i in range(len(scene.objects)) if i not in related]
    items = [items[k] for k in rng.permutation(len(items))]
    if natural:
        text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    else:
        text = ", ".join(items)
    if scene.background != DEFAULT_BACKGROUND or rng.random() < p_bg:
        if not natural:
            text += f", {scene.background} background"
        elif rng.random() < 0.3:
            text = f"a {scene.background} background with {text}"
        else:
            text += f" on a {scene.background} background"
    return text


# --- parsing: the inverse of the caption grammar ---------------------------------------------------

@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object; None = not specified."""

    shape: str
    colour: str | None = None
    size: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: its objects in the order named, a relation between two, a background."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None  # indices into `objects`
    background: str | None = None

    def matches(self, scene: Scene, margin: float = 0.0) -> bool:
        """Whether `scene` is an image of this prompt: same number of objects, each named attribute
        right, the relation true geometrically (from the boxes, not `scene.relation`), same background."""
        if len(scene.objects) != len(self.objects):
            return False
        if self.background is not None and scene.background != self.background:
            return False
        for perm in itertools.permutations(range(len(scene.objects))):
            objs = [scene.objects[k] for k in perm]
            if all(_spec_fits(spec, obj) for spec, obj in zip(self.objects, objs, strict=True)) and (
                self.relation is None
                or relation_holds(objs[self.relation.subject], objs[self.relation.object],
                                  self.relation.relation, margin)
            ):
                return True
        return False


def _spec_fits(spec: ObjectSpec, obj: ShapeObject) -> bool:
    return all(want is None or want == got for want, got in
               ((spec.shape, obj.shape), (spec.colour, obj.colour), (spec.size, obj.size), (spec.region, obj.region)))


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Multi-word phrases -> (kind, value); the parser matches the longest phrase first."""
    table: dict[tuple[str, ...], tuple[str, str]] = {}
    for rel in RELATIONS:
        table[tuple(rel.split())] = ("relation", rel)
    for region in REGIONS:
        words = ["center"] if region == "centre" else []
        for w in [region, *words, *(["middle"] if region == "centre" else [])]:
            table[tuple(w.split())] = ("region", region)
            for prep in ("at the", "in the", "on the"):
                table[tuple(f"{prep} {w}".split())] = ("region", region)
        if " " in region:
            table[tuple(f"in the {region} corner".split())] = ("region", region)
            table[tuple(f"at the {region} corner".split())] = ("region", region)
    for size, words in SIZE_SYNONYMS.items():
        for w in words:
            table[(w,)] = ("size", size)
    table.update({("grey",): ("colour", "gray"), ("center",): ("region", "centre")})
    table.update({(c,): ("colour", c) for c in COLOURS})
    table.update({(s,): ("shape", s) for s in SHAPES})
    table.update({(w,): ("article", w) for w in ("a", "an", "one")})
    table.update({(w,): ("separator", w) for w in ("and", "with", ",", ";", ".")})
    return table


_PHRASES = _phrase_table()
_LONGEST = max(len(k) for k in _PHRASES)
_TOKEN = re.compile(r"[a-z]+|[^\sa-z]")


def parse_caption(text: str) -> PromptSpec:
    """The attributes a shapes-world prompt asks for: the inverse of `caption` (and a bit more lenient).

    Accepts both caption styles, "color"/"colour"-free prompts ("a large star"), "grey", "center",
    hyphens ("top-left") and a background prefix or suffix. Raises ValueError on anything outside
    the grammar: unknown words, a size or article with no shape, two relations, a dangling relation.
    """
    tokens = _TOKEN.findall(text.lower().replace("-", " "))
    objects: list[dict[str, str | None]] = []
    relation: Relation | None = None
    pending_rel: tuple[int, str] | None = None
    pending: dict[str, str | None] = {}
    background = None

    def fail(why: str) -> ValueError:
        return ValueError(f"prompt {text!r} is outside the shapes-world grammar: {why}")

    i = 0
    while i < len(tokens):
        # background: "[on] [a] <colour> background"
        j = i + (tokens[i] == "on")
        j += j < len(tokens) and tokens[j] in ("a", "an")
        if j + 1 < len(tokens) and tokens[j + 1] == "background" and _PHRASES.get((tokens[j],), ("",))[0] == "colour":
            bg = _PHRASES[(tokens[j],)][1]
            if bg not in BACKGROUNDS or background is not None or pending.get("size"):
                raise fail(f"background {bg!r} (backgrounds: {', '.join(BACKGROUNDS)}; at most one)")
            background, pending, i = bg, {}, j + 2
            continue
        for k in range(min(_LONGEST, len(tokens) - i), 0, -1):
            hit = _PHRASES.get(tuple(tokens[i:i + k]))
            if hit is not None:
                break
        else:
            raise fail(f"unexpected word {tokens[i]!r}")
        kind, value = hit
        i += k
        nxt = _PHRASES.get(tuple(tokens[i:i + 1]), ("", ""))[0]
        if kind in ("shape", "colour") or (kind == "size" and nxt in ("colour", "shape")):
            pending[kind] = value
            if kind == "colour" and nxt != "shape":
                raise fail(f"colour {value!r} is not followed by a shape")
            if kind == "shape":
                objects.append({"shape": value, "colour": pending.get("colour"), "size": pending.get("size"),
                                "region": None})
                pending = {}
                if pending_rel is not None:
                    relation = Relation(pending_rel[0], pending_rel[1], len(objects) - 1)
                    pending_rel = None
        elif kind in ("size", "region"):
            if not objects or pending:
                raise fail(f"{value!r} does not follow a shape")
            if objects[-1][kind] is not None:
                raise fail(f"two {kind}s for the {objects[-1]['shape']}")
            objects[-1][kind] = value
        elif kind == "relation":
            if not objects or pending or relation is not None or pending_rel is not None:
                raise fail(f"relation {value!r} needs exactly one object on each side (and one relation)")
            pending_rel = (len(objects) - 1, value)
        elif kind == "article":
            if pending:
                raise fail(f"article {value!r} in the middle of an object")
            pending = {"article": value}
    if pending or pending_rel is not None:
        raise fail("it ends in the middle of an object or relation")
    if not objects:
        raise fail(f"no shape named (shapes: {', '.join(SHAPES)})")
    return PromptSpec(tuple(ObjectSpec(**o) for o in objects), relation, background)


# --- datasets --------------------------------------------------------------------------------------

def object_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    """How a layout names one object: its colour and shape, with an article and its size each half the time
    ("red circle", "a big red circle"): the words `LAYOUT_WORDS` holds."""
    words = [obj.colour, obj.shape]
    if rng.random() < 0.5:
        words.insert(0, SIZE_SYNONYMS[obj.size][int(rng.random() < P_SYNONYM)])
    if rng.random() < 0.5:
        words.insert(0, _article(words[0]))
    return " ".join(words)


# the words of layout phrases (`object_phrase`), and "grey" for gray, as the caption parser reads it
LAYOUT_WORDS = ("a", "an", *sorted({w for ws in SIZE_SYNONYMS.values() for w in ws}), *COLOURS, "grey", *SHAPES)


class ShapesDataset(torch.utils.data.Dataset):
    """`n` shapes-world samples; item `i` is a pure function of (seed, i), drawn from its own Generator.

    Items are dicts: image (3, size, size) float in [-1, 1], caption str, scene `Scene`, and with
    `label_maps` the semantic map "label_map" (size, size) uint8 (`render_labels`). `layout(i)` is item i's
    layout: each object's phrase and box. Batch them with `daguerre.data.collate`.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64, max_objects: int = 3, *, min_objects: int = 1,
                 p_relation: float = 0.5, complete_captions: bool = False, placement: str = "grid",
                 label_maps: bool = False) -> None:
        if n < 0 or seed < 0 or size < 1:
            raise ValueError(f"need n >= 0, seed >= 0 and size >= 1, got n={n}, seed={seed}, size={size}")
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, "
                             f"{max_objects}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        self.n, self.seed, self.size = n, seed, size
        self.min_objects, self.max_objects, self.p_relation = min_objects, max_objects, p_relation
        self.complete_captions, self.placement, self.label_maps = complete_captions, placement, label_maps

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> tuple[Scene, str]:
        """Scene and caption of item `i`, without rendering."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a ShapesDataset of {self.n} items")
        rng = np.random.default_rng((self.seed, i))
        scene = self._scene(rng)
        return scene, caption(scene, rng, complete=self.complete_captions)

    def _scene(self, rng: np.random.Generator) -> Scene:
        return sample_scene(rng, min_objects=self.min_objects, max_objects=self.max_objects,
                            p_relation=self.p_relation, placement=self.placement)

    def scene(self, i: int) -> Scene:
        """Item i's scene, without its caption (the same scene as `sample(i)`'s: the caption is drawn after it)."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a ShapesDataset of {self.n} items")
        return self._scene(np.random.default_rng((self.seed, i)))

    def layout(self, i: int) -> list[tuple[str, tuple[float, float, float, float]]]:
        """Item i's layout: (phrase, box (x0, y0, x1, y1) in [0, 1]) of each object, the phrasing drawn from
        its own generator (seed, i, 1), so the captions stay those of `sample`."""
        rng = np.random.default_rng((self.seed, i, 1))
        return [(object_phrase(obj, rng), obj.bbox) for obj in self.scene(i).objects]

    def label_map(self, i: int) -> np.ndarray:
        """Item i's semantic map (size, size) uint8 (`render_labels`)."""
        return render_labels(self.scene(i), self.size)

    def __getitem__(self, i: int) -> dict:
        scene, text = self.sample(i)
        item = {"image": to_tensor(render(scene, self.size)), "caption": text, "scene": scene}
        if self.label_maps:
            item["label_map"] = torch.from_numpy(render_labels(scene, self.size))
        return item


@dataclass(frozen=True)
class EvalPrompt:
    """An evaluation prompt, what it asks for, and one scene that satisfies it (a reference image)."""

    text: str
    spec: PromptSpec
    scene: Scene


PROMPT_KINDS = {"single": (1, 0.0), "relation": (2, 1.0)}  # kind -> (objects, p_relation)


def sample_prompts(kind: str = "single", n: int = 100, seed: int = 0, *, complete: bool = True) -> list[EvalPrompt]:
    """`n` evaluation prompts: "single" (one object: colour, shape, size, position) or "relation"
    (two objects in a spatial relation), each drawn from Generator (seed, i); `complete` names every
    attribute the grammar allows."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {', '.join(PROMPT_KINDS)}")
    objects, p_relation = PROMPT_KINDS[kind]
    out = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        scene = sample_scene(rng, min_objects=objects, max_objects=objects, p_relation=p_relation)
        text = caption(scene, rng, complete=complete)
        out.append(EvalPrompt(text, parse_caption(text), scene))
    return out


# --- token grounding: which caption words name which object, and where each object is ---------------------

@dataclass(frozen=True)
class ObjectWords:
    """Where a caption names one object: the indices, in the caption's white-space words, of its colour and its
    shape word (every caption names an object as "<colour> <shape>", in both styles)."""

    colour: int
    shape: int


def object_words(scene: Scene, text: str) -> tuple[ObjectWords, ...]:
    """Each object's colour and shape word in `text`, a caption of `scene` (`caption`), in the scene's object order.

    Objects have distinct (colour, shape) pairs, so each is the one place where its colour word is followed by its
    shape word (punctuation ignored: "red circle," in the tag style). ValueError when an object is not named
    exactly once that way (a text that is no caption of the scene)."""
    words = [re.sub(r"[^a-z]", "", w.lower()) for w in text.split()]
    out = []
    for obj in scene.objects:
        hits = [i for i in range(len(words) - 1) if words[i] == obj.colour and words[i + 1] == obj.shape]
        if len(hits) != 1:
            raise ValueError(f"the caption {text!r} names the {obj.colour} {obj.shape} {len(hits)} times, not once: "
                             "it is not a caption of this scene")
        out.append(ObjectWords(hits[0], hits[0] + 1))
    return tuple(out)


def object_masks(scene: Scene, size: int = 64) -> np.ndarray:
    """(objects, size, size) bool: each object's pixels as `render` draws it at `size` (`shape_mask` of its box)."""
    if not scene.objects:
        return np.zeros((0, size, size), dtype=bool)
    return np.stack([shape_mask(obj.shape, obj.bbox, size, size) for obj in scene.objects])
