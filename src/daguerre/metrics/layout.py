"""Judging layout-to-image and semantic-synthesis models on the shapes world (issue 18, docs/layout.md).

The shapes world draws flat colours on a plain black or white background, so its objects are found in an image
by segmentation by colour, without a learnt judge: every pixel takes the world colour it shows over the
background (`classify_colours`: edge pixels unmixed from the background); an object of colour c is the
8-connected region of c's pixels that overlaps its intended box (or map region) most (`locate`). Its box is that
region's bounding box; its shape the shape whose outline, drawn into that box as the world draws it
(`data.shapes.shape_mask`), matches the region best (mask IoU, on a `FIT_SIZE` grid over the box).

- A layout model draws held-out scenes from their layouts (phrase and box of each object): per object the IoU
  of the found box with the given one, and whether it is right (`IOU_RIGHT` or more, and the right shape; its
  colour is right by construction, as it was found by colour). Issue 18's targets: mean box IoU >= 0.75, >= 90%
  of the objects right.
- A semantic model draws held-out scenes from their maps (at the training size, or `scale` times it: the
  objects zoomed) and captions (which name each object's colour), or canvases of `tiles` x `tiles` held-out
  scenes at the training size (`tile_plan`; LDM's larger maps: a wider view, the objects at their pixel size).
  A map names shapes, not colours, so its judge is colour-blind (`shape_map`): each map region's object is the
  foreground (pixels over half covered, whatever their world colour) overlapping it, labelled with the shape
  that fits it; the score is the mean IoU over the labels in either map (background included). Targets: >= 0.8
  at the training size, >= 0.7 at 4x (tiles). Colour adherence (the found object in its caption's colour) and
  the colour judge's mean IoU (`predicted_map`) are reported beside it.
- Beside each score stands the judge's own ceiling: the same score of the world's drawing of each scene (box
  edges fall inside pixels, and at 64x64 a small cross is a few pixels wide).

The scenes are the model's held-out split of its training data (`data.split.holdout_split` with its
`data.holdout` and `data.seed`, from the run config its file records), so the model never trained on them.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..components import Components
from ..conditioning import conditioner_for
from ..data.layout import LabelMap, LayoutObject, draw_layout, parse_layout
from ..data.shapes import (
    COLOURS,
    LABELS,
    SHAPES,
    Scene,
    ShapesDataset,
    caption,
    object_masks,
    render,
    render_labels,
    shape_mask,
    tile_scenes,
)
from ..data.split import holdout_split

IOU_RIGHT = 0.5  # an object is in its box when the found box overlaps the given one this much (and the shape fits)
MAX_COLOUR_DISTANCE = 60.0  # RGB distance from a colour's mixing line with the background beyond which a pixel is
# not that colour (the world's colours are 100 or more apart)
MIN_COVERAGE = 0.25  # an edge pixel belongs to an object it is at least a quarter covered by
MIN_CONTRAST = 40.0  # a colour this close to the background is no object colour on it
MAP_COVERAGE = 0.5  # a predicted map labels the pixels an object covers at least half of, as render_labels does
FOREGROUND_COVERAGE = 0.53  # the colour-blind map judge's object pixels: covered more than half, as render_labels
# takes a pixel whose 4x4 sub-pixels tie 8 to 8 for the background (0.5 drawn; 9 of 16 is 0.5625)
FIT_SIZE = 48  # the largest grid a found region is compared with each shape on
GRID_ITEMS = 8  # scenes shown in the report's grid
COLOUR_NAMES = tuple(COLOURS)
COLOUR_TABLE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (12, 3)


# --- finding objects ------------------------------------------------------------------------------------

def background_of(image: np.ndarray) -> np.ndarray:
    """The plain background's colour: the per-channel median of the image (objects cover far less than half)."""
    return np.median(image.reshape(-1, 3).astype(np.float32), axis=0)


def classify_colours(image: np.ndarray, min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: the index in `COLOUR_NAMES` of the world colour each pixel shows over the
    background, -1 for the background. An edge pixel is a mix a c + (1 - a) bg of an object's colour c and the
    background; a pixel is c's when c explains it best (the smallest distance to the line bg -> c) with a coverage
    a of at least `min_coverage` and that distance at most `MAX_COLOUR_DISTANCE`. Thin parts (a star's tips) so
    stay with their object, where nearest-colour classification would give them to the background."""
    a, residual = _mixing(image)
    residual = np.where(a >= min_coverage, residual, np.inf)
    best = residual.argmin(-1)
    return np.where(np.take_along_axis(residual, best[..., None], -1)[..., 0] <= MAX_COLOUR_DISTANCE, best, -1)


def _mixing(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (coverage, residual), each (H, W, 12): per pixel and world colour c, the coverage a in
    [0, 1] of the mix a c + (1 - a) bg nearest the pixel, and the pixel's distance to that mix (inf for a colour
    too close to the background to be an object's)."""
    p = image.astype(np.float32)[..., None, :] - (bg := background_of(image))  # (H, W, 1, 3)
    d = COLOUR_TABLE - bg  # (12, 3): each colour's direction from the background
    norm = (d * d).sum(-1)
    a = np.clip((p * d).sum(-1) / np.maximum(norm, 1e-6), 0.0, 1.0)  # (H, W, 12) coverage
    residual = np.linalg.norm(p - a[..., None] * d, axis=-1)  # distance to the mixing line
    return a, np.where(norm > MIN_CONTRAST**2, residual, np.inf)  # the background's own colour is no object's


def components(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int64 labels of its 8-connected regions (0 outside the mask; region ids arbitrary),
    by propagating the largest pixel id through each region (3x3 max pooling until nothing changes)."""
    m = torch.from_numpy(mask)
    ids = torch.where(m, torch.arange(1, m.numel() + 1).view(m.shape), 0).double()[None, None]
    keep = m[None, None]
    while True:
        grown = torch.where(keep, torch.nn.functional.max_pool2d(ids, 3, 1, 1), torch.zeros(()).double())
        if torch.equal(grown, ids):
            return ids[0, 0].long().numpy()
        ids = grown


def box_of(region: np.ndarray) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1) in [0, 1] of the True pixels of an (H, W) mask (pixel edges)."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    return float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


@dataclass
class Found:
    """An object found in an image: its pixels, their box, and the shape that fits them best."""

    region: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]
    shape: str
    fit: float  # mask IoU of the region with that shape drawn into the box


@functools.lru_cache(maxsize=256)
def _templates(width: int, height: int, shapes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each shape drawn to fill a `width` x `height` pixel box, as the world draws it."""
    return {s: shape_mask(s, (0.0, 0.0, 1.0, 1.0), width, height) for s in shapes}


def fit_shape(region: np.ndarray, box: tuple[float, float, float, float],
              shapes: tuple[str, ...] = tuple(SHAPES)) -> tuple[str, float]:
    """The shape (of `SHAPES`) whose outline drawn into `box` matches `region` best, and that match (mask IoU):
    the region's pixels in the box against each shape drawn to fill the box's pixels (at most `FIT_SIZE` a side;
    a larger box is compared on a FIT_SIZE grid, each cell the region's pixel at its centre)."""
    h, w = region.shape
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    bw, bh = min(x1 - x0, FIT_SIZE), min(y1 - y0, FIT_SIZE)
    ys = y0 + ((np.arange(bh) + 0.5) * (y1 - y0) / bh).astype(int)
    xs = x0 + ((np.arange(bw) + 0.5) * (x1 - x0) / bw).astype(int)
    cells = region[np.ix_(np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))]
    best = max((mask_iou(cells, t), s) for s, t in _templates(bw, bh, shapes).items())
    return best[1], best[0]


def locate(colours: np.ndarray, colour: str, where: np.ndarray) -> Found | None:
    """The object of `colour` meant to be in `where` ((H, W) bool: its box or map region): the region of that
    colour's pixels overlapping `where` most (the largest region of the colour when none overlaps); None when the
    image has no pixel of the colour."""
    regions = components(colours == COLOUR_NAMES.index(colour))
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    if len(ids) == 0:
        return None
    overlap = np.array([int((where & (regions == i)).sum()) for i in ids])
    pick = ids[np.lexsort((sizes, overlap))[-1]]  # most overlap, then the largest
    region = regions == pick
    box = box_of(region)
    shape, fit = fit_shape(region, box)
    return Found(region, box, shape, fit)


def box_mask(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """(height, width) bool of the pixels whose centres lie in `box`."""
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    return ((ys[:, None] >= box[1]) & (ys[:, None] < box[3])) & ((xs[None] >= box[0]) & (xs[None] < box[2]))


# --- scoring one image ------------------------------------------------------------------------------------

def object_colour(phrase: str) -> str | None:
    """The world colour a layout phrase names ("grey" is gray), or None."""
    words = ["gray" if w == "grey" else w for w in phrase.lower().split()]
    return next((w for w in words if w in COLOURS), None)


def object_shape(phrase: str) -> str | None:
    return next((w for w in phrase.lower().split() if w in SHAPES), None)


def score_layout(image: Image.Image, objects: Sequence[LayoutObject]) -> list[dict[str, Any]]:
    """Per object of the layout: the box found (or None), its IoU with the given box, the shape found, right."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    colours = classify_colours(arr)
    out = []
    for obj in objects:
        colour, shape = object_colour(obj.phrase), object_shape(obj.phrase)
        if colour is None or shape is None:
            raise ValueError(f"layout phrase {obj.phrase!r} names no shapes-world colour and shape to look for")
        found = locate(colours, colour, box_mask(obj.box, w, h))
        iou = box_iou(found.box, obj.box) if found is not None else 0.0
        out.append({"phrase": obj.phrase, "box": list(obj.box), "found_box": list(found.box) if found else None,
                    "iou": iou, "found_shape": found.shape if found else None,
                    "right": bool(found is not None and iou >= IOU_RIGHT and found.shape == shape)})
    return out


def predicted_map(image: Image.Image, target: np.ndarray, colours_of: Sequence[tuple[str, int]],
                  where: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The semantic map an image shows, read by the caption's colours (the colour judge, reported beside
    `shape_map`'s colour-blind score): each object (colour, its label in `target`) found by colour where the
    target map puts it (its label's pixels; or `where[k]`, (H, W) bool, for object k: a canvas of tiles may
    hold one colour and shape twice), its pixels labelled with the shape that fits them; background elsewhere."""
    arr = np.asarray(image.convert("RGB"))
    colours = classify_colours(arr, MAP_COVERAGE)
    pred = np.zeros(arr.shape[:2], np.uint8)
    for k, (colour, label) in enumerate(colours_of):
        found = locate(colours, colour, target == label if where is None else where[k])
        if found is not None:
            pred[found.region] = LABELS.index(found.shape)
    return pred


@dataclass
class MapObject:
    """What the colour-blind map judge found for one object of a map: its pixels (None when nothing is drawn
    there), the shape that fits them (`fit_shape`) and their world colour (`_own_colour`: its interior's)."""

    region: np.ndarray | None
    shape: str | None
    colour: str | None


@dataclass
class ShapeMap:
    """The colour-blind judge's reading of an image drawn from a semantic map (`shape_map`)."""

    pred: np.ndarray  # (H, W) uint8: the predicted map, in `LABELS`
    objects: list[MapObject]  # one per region given, in order
    stray: float  # the share of the foreground pixels that belong to no object (drawn where the map has none)


def shape_map(image: Image.Image, regions: Sequence[np.ndarray]) -> ShapeMap:
    """The semantic map an image shows, read without its colours (a map names shapes, not colours). The
    foreground is every pixel an object covers more than half of, whichever world colour it is (`_half_covered`);
    each of its 8-connected components goes to the map region it overlaps most (none when it overlaps none);
    region k's object is the union of its components, labelled with the shape that fits it (`fit_shape`);
    background elsewhere. `regions`: (H, W) bool, each object's pixels in the
    map, so one shape twice (in one scene or two tiles) is judged as two objects."""
    arr = np.asarray(image.convert("RGB"))
    colours = classify_colours(arr, MAP_COVERAGE)
    parts = components(_half_covered(arr, colours)).ravel()
    bg = background_of(arr)
    pred = np.zeros(arr.shape[:2], np.uint8)
    if not len(regions):
        return ShapeMap(pred, [], 1.0 if parts.any() else 0.0)
    overlap = np.stack([np.bincount(parts[r.ravel()], minlength=parts.max() + 1) for r in regions])  # (K, ids)
    overlap[:, 0] = 0  # id 0 is the background
    owner = np.where(overlap.max(0) > 0, overlap.argmax(0), -1)  # each component's region, -1 for none
    objects = []
    for k in range(len(regions)):
        region = (owner[parts] == k).reshape(pred.shape)
        if not region.any():
            objects.append(MapObject(None, None, None))
            continue
        shape, _ = fit_shape(region, box_of(region))
        pred[region] = LABELS.index(shape)
        objects.append(MapObject(region, shape, COLOUR_NAMES[_own_colour(arr[region].astype(np.float32), bg)]))
    foreground = int((parts > 0).sum())
    stray = int(((parts > 0) & (owner[parts] < 0)).sum())
    return ShapeMap(pred, objects, stray / foreground if foreground else 0.0)


def _half_covered(image: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) bool: the foreground, pixels an object covers more than half of (`FOREGROUND_COVERAGE`). A pixel
    showing some world colour (`colours`, `classify_colours` at half coverage) is not enough, because the
    colours' mixing lines with the background meet: over black, gray is white half covered, so a white
    object's edge pixel 40% covered is gray 80% covered (the object would grow by a rim), and a gray object
    is white 50% covered. So coverage is read along each 8-connected region's own colour: the world colour
    nearest (plainly, unmixed) to the mean of its quarter of pixels farthest from the background, its interior,
    which the object covers fully."""
    coverage, _ = _mixing(image)
    parts = components(colours >= 0)
    ids, where = np.unique(parts, return_inverse=True)
    pixels, bg = image.astype(np.float32), background_of(image)
    own = np.zeros(len(ids), np.int64)  # each region's own colour (id 0, the background: unused)
    for j, i in enumerate(ids):
        if i:
            own[j] = _own_colour(pixels[parts == i], bg)
    mine = np.take_along_axis(coverage, own[where.reshape(parts.shape)][..., None], -1)[..., 0]
    return (parts > 0) & (mine >= FOREGROUND_COVERAGE)


def _own_colour(pixels: np.ndarray, bg: np.ndarray) -> int:
    """The index in `COLOUR_NAMES` of an object's colour, from its (N, 3) float pixels over background `bg`: the
    world colour nearest the mean of the quarter of them farthest from the background (not a colour the
    background's own is too close to)."""
    far = np.linalg.norm(pixels - bg, axis=-1)
    peak = pixels[far >= np.quantile(far, 0.75)].mean(0)
    usable = np.linalg.norm(COLOUR_TABLE - bg, axis=-1) > MIN_CONTRAST
    return int(np.where(usable, np.linalg.norm(COLOUR_TABLE - peak, axis=-1), np.inf).argmin())


def colour_adherence(found: Sequence[MapObject], colours: Sequence[str]) -> tuple[int, int]:
    """(objects found in the colour their caption names, objects found) of `shape_map`'s objects, given the
    colour each object's caption names."""
    drawn = [(f.colour, c) for f, c in zip(found, colours, strict=True) if f.region is not None]
    return sum(a == b for a, b in drawn), len(drawn)


def mean_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over the labels in either map of their pixel IoU."""
    labels = np.union1d(np.unique(pred), np.unique(target))
    return float(np.mean([mask_iou(pred == k, target == k) for k in labels]))


# --- the evaluation ---------------------------------------------------------------------------------------

MAX_MAP_FACTOR = 8  # --map-scale and --map-tiles: at most 8 times the training size


def check_map_size(scale: int, tiles: int) -> None:
    """`--map-scale K` (the scenes zoomed K times) or `--map-tiles K` (K x K scenes side by side), each a whole
    number in [1, MAX_MAP_FACTOR], not both above 1."""
    for flag, value in (("map scale", scale), ("map tiles", tiles)):
        if not (isinstance(value, int) and 1 <= value <= MAX_MAP_FACTOR):
            raise ValueError(f"{flag} must be a whole number in [1, {MAX_MAP_FACTOR}], got {value!r}")
    if scale > 1 and tiles > 1:
        raise ValueError(f"--map-scale {scale} and --map-tiles {tiles}: choose one way to draw larger maps (zoomed "
                         "scenes or a canvas of tiles)")


@dataclass
class SpatialResult:
    report: dict[str, Any]
    grid: Image.Image
    items: list[dict[str, Any]] = field(default_factory=list)


def held_out_scenes(config: Any, n: int | None, size: int | None = None) -> tuple[ShapesDataset, list[int], dict]:
    """(the model's training dataset of shapes scenes at `size`, the first `n` held-out indices (None: all),
    the data record): read from the run config the model file records; a model not trained on the shapes world
    is refused."""
    run = (config.provenance or {}).get("run_config") or {}
    data = run.get("data") or {}
    shapes = data.get("shapes") or {}
    if data.get("kind") != "shapes" or not shapes:
        raise ValueError(f"model {config.name!r} does not record training on the shapes world: layout and map "
                         "scores need scenes whose every object is known")
    dataset = ShapesDataset(int(shapes["n"]), seed=int(data.get("seed", 0)), size=size or int(data["size"]),
                            max_objects=int(shapes.get("max_objects", 3)),
                            min_objects=int(shapes.get("min_objects", 1)),
                            p_relation=float(shapes.get("p_relation", 0.5)),
                            placement=str(shapes.get("placement", "grid")))
    holdout = min(int(data.get("holdout", 0)), dataset.n // 2)
    _, held = holdout_split(dataset.n, holdout, int(data.get("seed", 0)))
    if n is not None and len(held) < n:
        raise ValueError(f"model {config.name!r} held out {len(held)} scenes; ask for at most that many (--n)")
    return dataset, [int(i) for i in held[:n]], {"n": dataset.n, "seed": dataset.seed, "holdout": holdout,
                                                 "placement": dataset.placement}


def tile_plan(held: Sequence[int], backgrounds: Sequence[str], n: int, k: int, seed: int) -> list[list[int]]:
    """The held-out scenes of `n` canvases of `k` x `k` tiles (row-major). A canvas's tiles are distinct scenes
    of one background (an object never has its own background's colour), taken in held-out order, whole
    canvases only, the canvases ordered by their first tile; when those are fewer than `n`, more passes over the
    same scenes follow, pass p shuffled by Generator (seed, p, background), so a scene then appears in several
    canvases but never twice in one. A background with fewer than k * k held-out scenes makes no canvas."""
    per = k * k
    pools = {bg: [i for i, b in zip(held, backgrounds, strict=True) if b == bg] for bg in dict.fromkeys(backgrounds)}
    pools = {bg: pool for bg, pool in pools.items() if len(pool) >= per}
    if not pools:
        raise ValueError(f"the model held out {len(held)} scenes, fewer than {per} on one background: "
                         f"--map-tiles {k} needs {per}; ask for fewer tiles")
    rank = {i: r for r, i in enumerate(held)}
    canvases: list[list[int]] = []
    for p in itertools.count():
        made = []
        for b, pool in enumerate(pools.values()):
            order = pool if p == 0 else [pool[j] for j in np.random.default_rng((seed, p, b)).permutation(len(pool))]
            made += [order[j:j + per] for j in range(0, len(order) - per + 1, per)]
        canvases += sorted(made, key=lambda c: rank[c[0]])
        if len(canvases) >= n:
            return canvases[:n]
    raise AssertionError("unreachable")


def tile_regions(scenes: Sequence[Scene], target: np.ndarray, k: int) -> list[np.ndarray]:
    """Where the judge looks for each object of `tile_scenes(scenes, k)` in its map `target`: its label's pixels
    in its own tile (as it looks in the scene's own map; a scene never holds one colour and shape twice)."""
    size = target.shape[0] // k
    out = []
    for t, scene in enumerate(scenes):
        row, col = divmod(t, k)
        tile = np.zeros(target.shape, bool)
        tile[row * size:(row + 1) * size, col * size:(col + 1) * size] = True
        out += [tile & (target == LABELS.index(obj.shape)) for obj in scene.objects]
    return out


def evaluate_spatial(components: Components, n: int, seed: int, sampling: dict[str, Any], *, scale: int = 1,
                     tiles: int = 1, prompt: str = "background",
                     progress: Callable[[int], None] | None = None) -> SpatialResult:
    """Generate and score `n` held-out scenes of a layout model (from their layouts) or a semantic model (from
    their maps at `scale` times the training size, or `n` canvases of `tiles` x `tiles` held-out scenes at the
    training size: `tile_plan`, `data.shapes.tile_scenes`, prompted with the canvas's caption); image i uses
    seed `seed + i`. `prompt` (layout models): "background" ("on a white background"), "caption" (the scene's
    caption) or "none"."""
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img

    config = components.config
    conditioner = conditioner_for(config)
    semantic = conditioner.concat.takes_map
    if not (semantic or conditioner.takes_layout):
        raise ValueError(f"model {config.name!r} draws neither from a layout nor from a semantic map")
    if prompt not in ("background", "caption", "none"):
        raise ValueError(f"unknown layout prompt {prompt!r}; choose background, caption or none")
    check_map_size(scale, tiles)
    if tiles > 1 and not semantic:
        raise ValueError(f"--map-tiles {tiles}: model {config.name!r} draws from layouts, not semantic maps; "
                         "leave it out")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    base = config.sample_size
    size = base * scale * tiles if semantic else base
    if tiles > 1:
        dataset, held, record = held_out_scenes(config, None, base)
        plan = tile_plan(held, [dataset.scene(i).background for i in held], n, tiles, dataset.seed)
        record["tile_scenes"] = len({i for c in plan for i in c})  # distinct held-out scenes in the canvases
    else:
        dataset, indices, record = held_out_scenes(config, n, base)
        plan = [[i] for i in indices]
    items, shown = [], []
    for k, group in enumerate(plan):
        i = group[0]
        if tiles > 1:
            parts = [dataset.scene(j) for j in group]
            scene = tile_scenes(parts, tiles)
            caption_ = caption(scene, np.random.default_rng((dataset.seed, *group)))
        else:
            scene, caption_ = dataset.sample(i)
        fields = {**sampling, "seed": seed + k}
        truth = render(scene, size)  # the world's own drawing: what the judge scores at best (the ceiling)
        if semantic:
            target = render_labels(scene, size)
            req = GenerationRequest(prompt=caption_, semantic_map=LabelMap.from_array(target), width=size,
                                    height=size, **fields)
            image = txt2img(components, req.validate(config))[0].image
            regions = list(object_masks(scene, size))  # each object's pixels in the map
            judged, best = shape_map(image, regions), shape_map(truth, regions)
            named = [o.colour for o in scene.objects]  # every caption names each object's colour
            right, found = colour_adherence(judged.objects, named)
            colours = [(o.colour, LABELS.index(o.shape)) for o in scene.objects]
            where = tile_regions(parts, target, tiles) if tiles > 1 else None
            by_colour = predicted_map(image, target, colours, where)
            items.append({**({"tiles": group} if tiles > 1 else {"index": i}), "caption": caption_,
                          "mean_iou": mean_iou(judged.pred, target),
                          "pixel_accuracy": float((judged.pred == target).mean()),
                          "objects": len(regions), "found": found, "colour_right": right,
                          "stray": judged.stray, "mean_iou_by_colour": mean_iou(by_colour, target),
                          "ceiling": mean_iou(best.pred, target),
                          "ceiling_colour_right": colour_adherence(best.objects, named)[0]})
            shown += [LabelMap.from_array(target).image().convert("RGB"), image,
                      LabelMap.from_array(judged.pred).image().convert("RGB")]
        else:
            objects = parse_layout([{"phrase": p, "box": list(b)} for p, b in dataset.layout(i)], f"scene {i}")
            text = {"background": f"on a {scene.background} background", "caption": caption_, "none": ""}[prompt]
            req = GenerationRequest(prompt=text, layout=objects, **fields)
            image = txt2img(components, req.validate(config))[0].image
            ceiling = score_layout(truth, objects)
            items.append({"index": i, "prompt": text, "objects": score_layout(image, objects),
                          "ceiling": {"mean_box_iou": float(np.mean([o["iou"] for o in ceiling])),
                                      "right": sum(o["right"] for o in ceiling)}})
            shown += [draw_layout(objects, image.width, image.height), image]
        if progress is not None:
            progress(1)
    report = {"kind": "semantic map" if semantic else "layout", "scenes": record, "n": n, "seed": seed,
              "sampling": sampling, "items": items}
    if semantic:
        ious = np.array([it["mean_iou"] for it in items])
        objects, found = sum(it["objects"] for it in items), sum(it["found"] for it in items)
        by_colour = np.array([it["mean_iou_by_colour"] for it in items])
        report.update(scale=scale, tiles=tiles, size=size, mean_iou=float(ious.mean()), mean_iou_se=_se(ious),
                      pixel_accuracy=float(np.mean([it["pixel_accuracy"] for it in items])),
                      objects=objects, objects_found=found / objects,
                      colour_adherence=sum(it["colour_right"] for it in items) / found if found else 0.0,
                      stray=float(np.mean([it["stray"] for it in items])),
                      mean_iou_by_colour=float(by_colour.mean()), mean_iou_by_colour_se=_se(by_colour),
                      ceiling={"mean_iou": float(np.mean([it["ceiling"] for it in items])),
                               "colour_adherence": sum(it["ceiling_colour_right"] for it in items) / objects})
    else:
        objs = [o for it in items for o in it["objects"]]
        ious = np.array([o["iou"] for o in objs])
        right = np.array([o["right"] for o in objs], dtype=float)
        report.update(prompt=prompt, objects=len(objs), mean_box_iou=float(ious.mean()),
                      object_accuracy=float(right.mean()),
                      object_accuracy_se=float(math.sqrt(right.mean() * (1 - right.mean()) / len(right))),
                      per_count=_per_count(items),
                      ceiling={"mean_box_iou": float(np.mean([it["ceiling"]["mean_box_iou"] for it in items])),
                               "object_accuracy": sum(it["ceiling"]["right"] for it in items) / len(objs)})
    from ..pipelines.images import make_grid

    cols = 3 if semantic else 2
    grid = make_grid(shown[:GRID_ITEMS * cols], cols=cols)
    return SpatialResult(report, grid, items)


def _se(values: np.ndarray) -> float:
    """The standard error of a mean (0 for one value)."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _per_count(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Layout scores by the number of objects in the scene."""
    out: dict[str, dict[str, float]] = {}
    for count in sorted({len(it["objects"]) for it in items}):
        objs = [o for it in items if len(it["objects"]) == count for o in it["objects"]]
        out[str(count)] = {"objects": len(objs), "mean_box_iou": float(np.mean([o["iou"] for o in objs])),
                           "object_accuracy": float(np.mean([o["right"] for o in objs]))}
    return out


def format_spatial(report: dict[str, Any]) -> str:
    """The report's headline numbers as a few lines of text."""
    if report["kind"] == "semantic map":
        tiles = report.get("tiles", 1)
        what = (f"{tiles}x{tiles} tiles of held-out scenes, {report['n']} canvases" if tiles > 1 else
                f"{report['scale']}x, {report['n']} held-out scenes")
        c = report["ceiling"]
        return (f"semantic maps at {report['size']}x{report['size']} ({what}): mean IoU"
                f" {report['mean_iou']:.3f} +- {report['mean_iou_se']:.3f} (shapes, colour-blind), pixel accuracy "
                f"{report['pixel_accuracy']:.3f}, objects found {report['objects_found']:.1%} of "
                f"{report['objects']} (the judge on the world's own drawings: {c['mean_iou']:.3f})\n"
                f"  colour adherence {report['colour_adherence']:.1%} of the found objects in their caption's "
                f"colour (world: {c['colour_adherence']:.1%}); by the caption's colours the mean IoU is "
                f"{report['mean_iou_by_colour']:.3f} +- {report['mean_iou_by_colour_se']:.3f}; stray foreground "
                f"{report['stray']:.1%}")
    c = report["ceiling"]
    lines = [f"layouts, {report['n']} held-out scenes ({report['objects']} objects, prompt: {report['prompt']}): "
             f"mean box IoU {report['mean_box_iou']:.3f}, objects right {report['object_accuracy']:.1%} +- "
             f"{report['object_accuracy_se']:.1%} (the judge on the world's own drawings: {c['mean_box_iou']:.3f}, "
             f"{c['object_accuracy']:.1%})"]
    lines += [f"  {k} object(s): {v['objects']} objects, mean box IoU {v['mean_box_iou']:.3f}, right "
              f"{v['object_accuracy']:.1%}" for k, v in report["per_count"].items()]
    return "\n".join(lines)
