"""Teaching the shapes model a new shape: the hexagon images, and the judge of generated hexagons (docs/lora.md).

The shapes world's renderer draws a regular hexagon (`data.shapes.EXTRA_SHAPES`) that no sampled scene has, so
the shipped `shapes` model has never seen one (its text encoder does not even know the word). `write_folder`
makes what a user would have: N images of one hexagon (colour, size, grid cell and background drawn as the world
draws them) with `.txt` captions in the world's grammar ("a large red hexagon at the top", "red hexagon, small").

The judge extends the layout judge (`metrics.layout`): the shapes world's plain backgrounds let an object be found
by its colour (`classify_colours`, `locate`: the largest region of the prompt's colour), and its shape is the one
whose outline drawn into the region's box matches it best (mask IoU) among the world's eight shapes and the
hexagon. `judge_accuracy` measures the judge itself on rendered single objects of every shape (the hexagon's
recall and how often another shape is taken for one). `hexagon_adherence` generates "a COLOUR hexagon" for each
world colour and seed and counts the images the judge calls a hexagon of that colour.

    python -m daguerre.metrics.hexagon data hexagons/ --n 40 --regularisation 120
    python -m daguerre.metrics.hexagon judge --n 100
    python -m daguerre.metrics.hexagon eval --model shapes --lora runs/hexagon_lora/lora.safetensors:1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    Scene,
    ShapesDataset,
    _make_object,
    caption,
    render,
)
from .layout import COLOUR_NAMES, box_of, classify_colours, components, fit_shape

HEXAGON = "hexagon"
JUDGED_SHAPES = (*SHAPES, *EXTRA_SHAPES)  # what the judge tells apart


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


def judge_shape(image: Image.Image | np.ndarray, colour: str) -> str | None:
    """The shape of the largest object of `colour` in a shapes-world image (None: no pixel of that colour)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    colours = classify_colours(pixels)
    regions = components(colours == COLOUR_NAMES.index(colour))
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    if len(ids) == 0:
        return None
    return fit_any_shape(regions == ids[sizes.argmax()])[0]


def judge_accuracy(n: int = 100, seed: int = 1, size: int = 64, *, object_size: str | None = None,
                   blur: float = 0.0) -> dict[str, Any]:
    """The judge on `n` rendered single objects of each shape (seeds (seed, k, i); `object_size` "small" / "large"
    or both; `blur`: a Gaussian blur of that radius in pixels, as soft as a generated image's edges): the fraction
    of each shape judged as itself, the hexagon's recall, and the fraction of the other shapes judged a hexagon."""
    from PIL import ImageFilter

    right, as_hexagon = {}, {}
    for k, shape in enumerate(JUDGED_SHAPES):
        calls = []
        for i in range(n):
            scene = hexagon_scene(np.random.default_rng((seed, k, i)), shape)
            if object_size is not None:
                o = scene.objects[0]
                scene = Scene((_make_object(shape, o.colour, object_size, REGIONS.index(o.region), o.position),),
                              scene.background)
            image = render(scene, size)
            if blur > 0:
                image = image.filter(ImageFilter.GaussianBlur(blur))
            calls.append(judge_shape(image, scene.objects[0].colour))
        right[shape] = sum(c == shape for c in calls) / n
        as_hexagon[shape] = sum(c == HEXAGON for c in calls) / n
    others = [s for s in JUDGED_SHAPES if s != HEXAGON]
    return {"n_per_shape": n, "object_size": object_size or "both", "blur": blur, "accuracy": right,
            "hexagon_recall": right[HEXAGON],
            "others_called_hexagon": sum(as_hexagon[s] for s in others) / len(others),
            "called_hexagon": {s: as_hexagon[s] for s in others}}


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
                      shape: str = HEXAGON) -> dict[str, Any]:
    """Generate each `hexagon_prompts` prompt with seeds 0..seeds-1 (the model's recommended settings) with the
    LoRAs merged, and judge each image; the fraction judged a hexagon (or `shape`: a world shape, to see that the
    LoRA leaves it alone) of the prompt's colour, per colour and in all. `grid`: also save the images as a PNG
    grid (a row per seed)."""
    if shape not in JUDGED_SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(JUDGED_SHAPES)}")
    import torch

    from ..lora.apply import merge_loras
    from ..pipelines.request import GenerationRequest
    from ..pipelines.txt2img import txt2img
    from ..registry import open_model

    comps, _ = open_model(model, dtype=torch.float32)
    if loras:
        merge_loras(comps, list(loras))
    calls: dict[str, list[str | None]] = {}
    images = []
    with torch.no_grad():
        for seed in range(seeds):
            for prompt, colour in hexagon_prompts(colours, shape):
                req = GenerationRequest(prompt=prompt, seed=seed)
                image = txt2img(comps, req.validate(comps.config))[0].image
                images.append(image)
                calls.setdefault(colour, []).append(judge_shape(image, colour))
    per_colour = {c: sum(x == shape for x in v) / len(v) for c, v in calls.items()}
    total = sum(sum(x == shape for x in v) for v in calls.values()) / sum(len(v) for v in calls.values())
    if grid is not None:
        from ..pipelines.images import make_grid  # metrics sit below training: the pipelines' contact sheet

        make_grid(images, len(colours)).save(grid)
    return {"model": model, "loras": [list(x) for x in loras], "shape": shape, "seeds": seeds,
            "n": sum(len(v) for v in calls.values()),
            "adherence": total, "per_colour": per_colour,
            "judged": {c: [x or "none" for x in v] for c, v in calls.items()}}


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
    e = sub.add_parser("eval", help="judged adherence of 'a COLOUR hexagon' prompts")
    e.add_argument("--model", default="shapes")
    e.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT")
    e.add_argument("--seeds", type=int, default=4)
    e.add_argument("--grid", default=None, metavar="PNG")
    e.add_argument("--shape", default=HEXAGON, help="judge 'a COLOUR SHAPE' prompts of this shape (default hexagon)")
    for q in (j, e):
        q.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.what == "data":
        captions = write_folder(args.folder, args.n, args.seed, regularisation=args.regularisation)
        print(f"{len(captions)} hexagon images (+ {args.regularisation} of the world's scenes) with captions in "
              f"{args.folder}, e.g. {captions[0]!r}")
        return 0
    if args.what == "judge":
        result = judge_accuracy(args.n, object_size=args.size, blur=args.blur)
    else:
        result = hexagon_adherence(args.model, [_lora_arg(x) for x in args.lora], args.seeds, grid=args.grid,
                                   shape=args.shape)
    print(json.dumps({k: v for k, v in result.items() if k != "judged"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
