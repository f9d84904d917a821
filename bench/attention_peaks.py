"""Issue 22's must-show, image by image: where each word's attention map peaks against its object.

    python bench/attention_peaks.py MODEL [--prompt "a red circle above a blue square"] [--n 20] [--layers L,...]
        [--pairs green:green,star:green,yellow:yellow,triangle:yellow]   (word:colour of its object, for --prompt)

Makes the test's images (tests/test_explain_attention_shapes.py: seeds 0..n-1 in one batch, the model's recommended
settings) and prints, per word, the test's two scores — the mean ratio of the map on its object to elsewhere and
the share of images whose peak lies in the object's box, the object being its colour's largest region — then the
same with every region of the colour at least a quarter of the largest's size counting as the object (a model
that draws the object twice), how many images show it twice, and with --per-seed each image's peak and boxes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import daguerre  # noqa: E402
from daguerre.explain.attention import attention_maps  # noqa: E402
from daguerre.metrics.layout import COLOUR_NAMES, classify_colours, components  # noqa: E402
from test_explain_attention_shapes import PROMPT, scores  # noqa: E402

PAIRS = [("red", "red"), ("circle", "red"), ("blue", "blue"), ("square", "blue")]
MIN_SHARE = 0.25  # a region of the colour this share of the largest one's size counts as a copy of the object


def regions_of(image, colour: str) -> tuple[np.ndarray, list[int]]:
    """(labelled regions of `colour`, the ids of those at least MIN_SHARE of the largest's size)."""
    regions = components(classify_colours(np.asarray(image)) == COLOUR_NAMES.index(colour))
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    return regions, [int(i) for i, s in zip(ids, sizes, strict=True) if s >= MIN_SHARE * sizes.max()]


def inside(region: np.ndarray, y: int, x: int) -> bool:
    ys, xs = np.nonzero(region)
    return bool(xs.min() <= x <= xs.max() and ys.min() <= y <= ys.max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--layers", default=None, help="comma-separated transformer names (default: all, as the test)")
    p.add_argument("--per-seed", action="store_true")
    p.add_argument("--pairs", default=None, help="comma-separated WORD:COLOUR, the colour of each word's object "
                   "(default: the first prompt's red:red,circle:red,blue:blue,square:blue)")
    args = p.parse_args()
    pairs = [tuple(x.split(":")) for x in args.pairs.split(",")] if args.pairs else PAIRS
    pipe = daguerre.load(args.model)
    request = pipe.request(args.prompt, seed=0, n=args.n, batch_size=args.n)
    layers = args.layers.split(",") if args.layers else None
    results = attention_maps(pipe.components, request, [w for w, _ in pairs], layers)
    for word, colour in pairs:
        ratio, peaks = scores(results, word, colour)
        any_peaks, twice, lines = 0, 0, []
        for i, r in enumerate(results):
            heat = r.maps[word].numpy()
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            regions, keep = regions_of(r.image.image, colour)
            twice += len(keep) > 1
            hit = any(inside(regions == k, y, x) for k in keep)
            any_peaks += hit
            boxes = [np.nonzero(regions == k) for k in keep]
            lines.append(f"  seed {i}: peak (y {y}, x {x}) {'in' if hit else 'OUT'}; "
                         + ", ".join(f"box y {b[0].min()}-{b[0].max()} x {b[1].min()}-{b[1].max()}" for b in boxes))
        print(f"{word}: {ratio:.2f}x, peak in the box {peaks:.0%}; in the box of any copy {any_peaks / args.n:.0%}; "
              f"images with the {colour} object twice: {twice}")
        if args.per_seed:
            print(*lines, sep="\n")


if __name__ == "__main__":
    main()
