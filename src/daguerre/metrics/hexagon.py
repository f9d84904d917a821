"""Teaching the shapes model a new shape: the hexagon images, and the judge of generated hexagons (docs/lora.md).

The shapes world's renderer draws a regular hexagon (`data.shapes.EXTRA_SHAPES`) that no sampled scene has, so
the shipped `shapes` model has never seen one (its text encoder does not even know the word). `write_folder`
makes what a user would have: N images of one hexagon (colour, size, grid cell and background drawn as the world
draws them) with `.txt` captions in the world's grammar ("a large red hexagon at the top", "red hexagon, small").

The judge (`judge_shape`) fits shapes to the object's coverage: the shapes world's plain backgrounds let the object
of the prompt's colour be found (the largest region that colour covers at least half of), and each pixel's
coverage a of that colour over the background (the pixel is a c + (1 - a) bg) is compared, as a least-squares fit,
with each of the world's eight shapes and the hexagon rendered as the world renders them (4x supersampled) at the
object's centroid and area, under a Gaussian blur (`FIT_BLURS`: a generated image's edges are soft, and a soft
hexagon's rounded corners must be told from a circle by the straight sides between them). The first judge
(`judge_shape_iou`, the layout judge's mask IoU with each shape drawn into the region's box) calls most generated
hexagons circles: on hexagons passed through the shapes model's own autoencoder it finds 73% of large ones, the
fit 100% (`judge_accuracy(autoencoder="shapes")`, docs/lora.md). `judge_accuracy` measures a judge on rendered
single objects of every shape (the hexagon's recall and how often another shape is taken for one), sharp, blurred
or round-tripped through an autoencoder. `hexagon_adherence` generates "a COLOUR hexagon" for each world colour
and seed and counts the images the judge calls a hexagon of that colour.

    python -m daguerre.metrics.hexagon data hexagons/ --n 40 --regularisation 120
    python -m daguerre.metrics.hexagon judge --n 100 --autoencoder shapes
    python -m daguerre.metrics.hexagon eval --model shapes --lora runs/hexagon_lora/lora.safetensors:1
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_BACKGROUND,
    EXTRA_SHAPES,
    GRID,
    JITTER,
    P_WHITE_BACKGROUND,
    REGIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    ShapesDataset,
    _draw_shape,
    _make_object,
    caption,
    render,
)
from .layout import (
    COLOUR_NAMES,
    MAX_COLOUR_DISTANCE,
    MIN_CONTRAST,
    background_of,
    box_of,
    classify_colours,
    components,
    fit_shape,
)

HEXAGON = "hexagon"
JUDGED_SHAPES = (*SHAPES, *EXTRA_SHAPES)  # what the judge tells apart
FIT_BLURS = (0.0, 0.5, 0.8, 1.1, 1.4)  # Gaussian blurs (sigma, pixels) each shape is fitted under: sharp to soft
FIT_RADII = (0.96, 1.0, 1.04)  # radii fitted around the one of the object's area (a blur keeps the area)
FIT_PAD = 3  # pixels around the object's box the fit compares (a blurred edge spreads this far)
MIN_INTERIOR = 0.75  # the object's median coverage: a colour only half-explaining it (grey for white) is not it
JUDGES = ("fit", "iou")  # judge_shape, judge_shape_iou


def hexagon_scene(rng: np.random.Generator, shape: str = HEXAGON) -> Scene:
    """One object of `shape` (a colour other than the background's, a size, a grid cell with jitter), on a
    background drawn as the world draws it."""
    background = "white" if rng.random() < P_WHITE_BACKGROUND else DEFAULT_BACKGROUND
    palette = [c for c in COLOURS if c != background]
    colour = palette[rng.integers(len(palette))]
    size = SIZES[rng.integers(len(SIZES))]
    cell = int(rng.integers(len(REGIONS)))
    jx, jy = rng.uniform(-JITTER, JITTER, size=2).tolist()
    obj = _make_object(shape, colour, size, cell, (GRID[cell % 3] + jx, GRID[cell // 3] + jy))
    return Scene((obj,), background)


def write_folder(folder: str | Path, n: int, seed: int = 0, size: int = 64, *, regularisation: int = 0) -> list[str]:
    """`n` hexagon images `hexagon_NNN.png` with `.txt` captions in `folder` (item i from Generator (seed, i)), and
    `regularisation` images `world_NNN.png` of the world's own scenes (`ShapesDataset` of seed 10_000 + seed: not
    the shipped model's training images) with their captions, DreamBooth's prior preservation (Ruiz et al. 2023):
    they keep the LoRA from drawing hexagons for the shapes the model knows. Returns the hexagon captions."""
    if not 1 <= n <= 10_000 or not 0 <= regularisation <= 10_000:
        raise ValueError(f"--n {n}, --regularisation {regularisation}: give 1 to 10000 images (0 to 10000)")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        scene = hexagon_scene(rng)
        text = caption(scene, rng)
        render(scene, size).save(root / f"hexagon_{i:03d}.png")
        (root / f"hexagon_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
        captions.append(text)
    world = ShapesDataset(regularisation, seed=10_000 + seed, size=size)
    for i in range(regularisation):
        scene, text = world.sample(i)
        render(scene, size).save(root / f"world_{i:03d}.png")
        (root / f"world_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return captions


def fit_any_shape(region: np.ndarray) -> tuple[str, float]:
    """The shape of `JUDGED_SHAPES` whose outline drawn into the region's box matches it best, and the mask IoU
    (as `layout.fit_shape`, with the hexagon among the candidates)."""
    return fit_shape(region, box_of(region), tuple(JUDGED_SHAPES))


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)


def judge_shape_iou(image: Image.Image | np.ndarray, colour: str) -> str | None:
    """The first judge: the shape of the largest region `layout.classify_colours` gives `colour`, by mask IoU with
    each shape drawn into its box (`fit_any_shape`); None: no pixel of that colour."""
    colours = classify_colours(_pixels(image))
    regions = components(colours == COLOUR_NAMES.index(colour))
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    if len(ids) == 0:
        return None
    return fit_any_shape(regions == ids[sizes.argmax()])[0]


def coverage(pixels: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) coverage a in [0, 1] of `colour` over the image's plain background (the pixel is nearest to
    a c + (1 - a) bg) and the RGB distance of the pixel from that mix."""
    bg = background_of(pixels)
    d = np.asarray(COLOURS[colour], np.float32) - bg
    p = pixels.astype(np.float32) - bg
    a = np.clip((p * d).sum(-1) / max(float((d * d).sum()), 1e-6), 0.0, 1.0)
    return a, np.linalg.norm(p - a[..., None] * d, axis=-1)


def _soft_template(shape: str, cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """(height, width) coverage of `shape` of radius `r` centred at (cx, cy) (pixel units, pixel edges at
    integers), drawn as `data.shapes.render` draws: at 4x, then 4x4 block means."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    _draw_shape(ImageDraw.Draw(img), shape, cx * s - 0.5, cy * s - 0.5, r * s, 255)
    return np.asarray(img, np.float32).reshape(height, s, width, s).mean((1, 3)) / 255.0


@functools.cache
def _unit_shape(shape: str) -> tuple[float, float, float]:
    """A shape's area at radius 1 and its centroid's offset from its drawing centre (x, y, in radii)."""
    r, n = 100.0, 256
    t = _soft_template(shape, n / 2, n / 2, r, n, n)
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    area = float(t.sum())
    return area / r**2, (float((t * xs).sum()) / area - n / 2) / r, (float((t * ys).sum()) / area - n / 2) / r


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """`x` (H, W) blurred by a Gaussian of `sigma` pixels (a 9-tap separable kernel, zeros outside)."""
    if sigma == 0:
        return x
    k = np.arange(-4, 5, dtype=np.float64)
    g = np.exp(-k * k / (2 * sigma * sigma))
    g /= g.sum()
    p = np.pad(x.astype(np.float64), 4)
    p = sum(g[i] * p[i:i + p.shape[0] - 8] for i in range(9))
    return sum(g[i] * p[:, i:i + p.shape[1] - 8] for i in range(9))


def fit_errors(cov: np.ndarray) -> dict[str, float]:
    """Each judged shape's least-squares error against the coverage window `cov` (one object): the shape drawn at
    the coverage's centroid with the radius of its area (x `FIT_RADII`), blurred by each of `FIT_BLURS`; the
    smallest over radii and blurs."""
    h, w = cov.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    total = float(cov.sum())
    mx, my = float((cov * xs).sum()) / total, float((cov * ys).sum()) / total
    errors = {}
    for shape in JUDGED_SHAPES:
        area, ox, oy = _unit_shape(shape)
        best = np.inf
        for k in FIT_RADII:
            r = np.sqrt(total / area) * k
            t = _soft_template(shape, mx - ox * r, my - oy * r, r, w, h)
            best = min(best, *(float(((gaussian_blur(t, b) - cov) ** 2).sum()) for b in FIT_BLURS))
        errors[shape] = best
    return errors


def judge_shape(image: Image.Image | np.ndarray, colour: str) -> str | None:
    """The shape (of `JUDGED_SHAPES`) of the largest object of `colour` in a shapes-world image, by the fit of its
    coverage (module docstring); None: no object of that colour (no region it covers at least half of, or one
    it explains only in part, `MIN_INTERIOR`)."""
    pixels = _pixels(image)
    a, distance = coverage(pixels, colour)
    if np.linalg.norm(np.asarray(COLOURS[colour], np.float32) - background_of(pixels)) < MIN_CONTRAST:
        return None  # the background's own colour
    inside = distance <= MAX_COLOUR_DISTANCE
    regions = components((a >= 0.5) & inside)
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    if len(ids) == 0:
        return None
    region = regions == ids[sizes.argmax()]
    if np.median(a[region]) < MIN_INTERIOR:
        return None
    near = region.copy()  # the region grown by 2 pixels: its soft edge, not a neighbouring object
    for _ in range(2):
        grown = near.copy()
        grown[1:] |= near[:-1]
        grown[:-1] |= near[1:]
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        near = grown
    ys, xs = np.nonzero(region)
    y0, y1 = max(int(ys.min()) - FIT_PAD, 0), min(int(ys.max()) + FIT_PAD + 1, pixels.shape[0])
    x0, x1 = max(int(xs.min()) - FIT_PAD, 0), min(int(xs.max()) + FIT_PAD + 1, pixels.shape[1])
    window = (slice(y0, y1), slice(x0, x1))
    errors = fit_errors(np.where(near[window] & inside[window], a[window], 0.0))
    return min(errors, key=errors.get)


JUDGE_OF = {"fit": judge_shape, "iou": judge_shape_iou}


def judge_accuracy(n: int = 100, seed: int = 1, size: int = 64, *, object_size: str | None = None,
                   blur: float = 0.0, judge: str = "fit", autoencoder: str | None = None) -> dict[str, Any]:
    """A judge (`JUDGES`) on `n` rendered single objects of each shape (seeds (seed, k, i); `object_size` "small" /
    "large" or both; `blur`: a Gaussian blur of that radius in pixels; `autoencoder`: a model (a shipped name or a
    file) whose autoencoder each image is encoded and decoded by, as soft as that model can draw it): the fraction
    of each shape judged as itself, the hexagon's recall, and the fraction of the other shapes judged a hexagon."""
    from PIL import ImageFilter

    if judge not in JUDGE_OF:
        raise ValueError(f"--judge {judge!r}: choose one of {', '.join(JUDGES)}")
    scenes = {}
    for k, shape in enumerate(JUDGED_SHAPES):
        for i in range(n):
            scene = hexagon_scene(np.random.default_rng((seed, k, i)), shape)
            if object_size is not None:
                o = scene.objects[0]
                scene = Scene((_make_object(shape, o.colour, object_size, REGIONS.index(o.region), o.position),),
                              scene.background)
            scenes[shape, i] = scene
    images = [render(scene, size) for scene in scenes.values()]
    if blur > 0:
        images = [image.filter(ImageFilter.GaussianBlur(blur)) for image in images]
    if autoencoder is not None:
        images = _round_trip(autoencoder, images)
    calls: dict[str, list[str | None]] = {}
    for ((shape, _), scene), image in zip(scenes.items(), images, strict=True):
        calls.setdefault(shape, []).append(JUDGE_OF[judge](image, scene.objects[0].colour))
    right = {s: sum(c == s for c in v) / n for s, v in calls.items()}
    as_hexagon = {s: sum(c == HEXAGON for c in v) / n for s, v in calls.items()}
    others = [s for s in JUDGED_SHAPES if s != HEXAGON]
    return {"judge": judge, "n_per_shape": n, "object_size": object_size or "both", "blur": blur,
            "autoencoder": autoencoder, "accuracy": right, "hexagon_recall": right[HEXAGON],
            "others_called_hexagon": sum(as_hexagon[s] for s in others) / len(others),
            "called_hexagon": {s: as_hexagon[s] for s in others}}


def _round_trip(model: str, images: list[Image.Image], batch: int = 64) -> list[Image.Image]:
    """`images` encoded (the posterior's mode) and decoded by `model`'s autoencoder."""
    import torch

    from ..pipelines.common import encode_images, latents_to_images
    from ..registry import open_model

    comps, _ = open_model(model, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images[i:i + batch]]))
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
            out += latents_to_images(comps, encode_images(comps, x))
    return out


def hexagon_prompts(colours: Sequence[str] = tuple(COLOURS), shape: str = HEXAGON,
                    size: str | None = "large") -> list[tuple[str, str]]:
    """(prompt, colour): "a large red hexagon", "a large orange hexagon", ... for each world colour (or another
    shape), in the world's grammar: a colour that is the default background's asks for the other background
    ("a large black hexagon on a white background"). Large by default: a small hexagon is 13 pixels wide at 64x64,
    where a generated one's corners blur into a circle for the judge (`judge_accuracy` measures both sizes)."""
    out = []
    for c in colours:
        words = " ".join(w for w in (size, c, shape) if w)
        background = f" on a {BACKGROUNDS[1 - BACKGROUNDS.index(c)]} background" if c in BACKGROUNDS else ""
        out.append((f"{'an' if words[0] in 'aeiou' else 'a'} {words}{background}", c))
    return out


def hexagon_adherence(model: str, loras: Sequence[tuple[str, float]], seeds: int = 4, *,
                      colours: Sequence[str] = tuple(COLOURS), grid: str | Path | None = None,
                      shape: str = HEXAGON, size: str | None = "large") -> dict[str, Any]:
    """Generate each `hexagon_prompts` prompt with seeds 0..seeds-1 (the model's recommended settings) with the
    LoRAs merged, and judge each image; the fraction judged a hexagon (or `shape`: a world shape, to see that the
    LoRA leaves it alone) of the prompt's colour, per colour and in all (`adherence`; `adherence_iou` by the first
    judge, `judge_shape_iou`). `size`: the prompts' size word ("large", "small"; None: none, "a red hexagon").
    `grid`: also save the images as a PNG grid (a row per seed)."""
    if shape not in JUDGED_SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(JUDGED_SHAPES)}")
    if size is not None and size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)} (or none)")
    import torch

    from ..lora.apply import merge_loras
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img
    from ..registry import open_model

    comps, _ = open_model(model, dtype=torch.float32)
    if loras:
        merge_loras(comps, list(loras))
    calls: dict[str, dict[str, list[str | None]]] = {j: {} for j in JUDGES}
    images = []
    with torch.no_grad():
        for seed in range(seeds):
            for prompt, colour in hexagon_prompts(colours, shape, size):
                req = GenerationRequest(prompt=prompt, seed=seed)
                image = txt2img(comps, req.validate(comps.config))[0].image
                images.append(image)
                for j in JUDGES:
                    calls[j].setdefault(colour, []).append(JUDGE_OF[j](image, colour))
    if grid is not None:
        from ..pipelines.images import make_grid  # metrics sit below training: the pipelines' contact sheet

        make_grid(images, len(colours)).save(grid)
    n = len(images)
    fit, iou = calls["fit"], calls["iou"]
    return {"model": model, "loras": [list(x) for x in loras], "shape": shape, "size": size, "seeds": seeds, "n": n,
            "adherence": sum(x == shape for v in fit.values() for x in v) / n,
            "adherence_iou": sum(x == shape for v in iou.values() for x in v) / n,
            "per_colour": {c: sum(x == shape for x in v) / len(v) for c, v in fit.items()},
            "judged": {c: [x or "none" for x in v] for c, v in fit.items()},
            "judged_iou": {c: [x or "none" for x in v] for c, v in iou.items()}}


def _lora_arg(text: str) -> tuple[str, float]:
    path, _, weight = text.rpartition(":")
    if not path:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        return text, 1.0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daguerre.metrics.hexagon", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="write N hexagon images with .txt captions")
    d.add_argument("folder")
    d.add_argument("--n", type=int, default=40)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--regularisation", type=int, default=0, metavar="N",
                   help="also N images of the world's own scenes (prior preservation)")
    j = sub.add_parser("judge", help="the judge's accuracy on rendered shapes")
    j.add_argument("--n", type=int, default=100)
    j.add_argument("--size", choices=["small", "large"], default=None, help="objects of this size only")
    j.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius in pixels (generated softness)")
    j.add_argument("--autoencoder", default=None, metavar="MODEL",
                   help="round-trip the images through this model's autoencoder (e.g. shapes)")
    j.add_argument("--judge", choices=JUDGES, default="fit",
                   help="the coverage fit (default) or the first, mask-IoU judge")
    e = sub.add_parser("eval", help="judged adherence of 'a COLOUR hexagon' prompts")
    e.add_argument("--model", default="shapes")
    e.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT")
    e.add_argument("--seeds", type=int, default=4)
    e.add_argument("--grid", default=None, metavar="PNG")
    e.add_argument("--shape", default=HEXAGON, help="judge 'a COLOUR SHAPE' prompts of this shape (default hexagon)")
    e.add_argument("--size", choices=["large", "small", "none"], default="large",
                   help="the prompts' size word (none: 'a red hexagon')")
    for q in (j, e):
        q.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.what == "data":
        captions = write_folder(args.folder, args.n, args.seed, regularisation=args.regularisation)
        print(f"{len(captions)} hexagon images (+ {args.regularisation} of the world's scenes) with captions in "
              f"{args.folder}, e.g. {captions[0]!r}")
        return 0
    if args.what == "judge":
        result = judge_accuracy(args.n, object_size=args.size, blur=args.blur, judge=args.judge,
                                autoencoder=args.autoencoder)
    else:
        result = hexagon_adherence(args.model, [_lora_arg(x) for x in args.lora], args.seeds, grid=args.grid,
                                   shape=args.shape, size=None if args.size == "none" else args.size)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("judged")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
