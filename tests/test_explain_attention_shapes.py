"""Issue 22's must-show for `daguerre explain attention`, on the shipped shapes model.

"For two-object prompts such as 'a red circle above a blue square' over 20 seeds, the map of the word 'circle' is
on average at least 3x stronger on the red object's pixels than on the rest of the image, and its peak lies inside
that object's box in at least 80% of images; likewise for the other object (objects located by colour on the plain
background)."

The 20 images are made in one batch at the model's recommended settings (25 steps of DPM++ 2M, Uniform, CFG 4) and
their objects found by colour (`metrics.layout.classify_colours`: each pixel's world colour over the background; an
object is its colour's largest 8-connected region, its box that region's bounding box). An image without the
object counts as a miss for the peak and is left out of the ratio (it has no object pixels).

Measured (docs/explain.md, "What the maps show on the shapes model"): the shipped model, token-grounded in its
seventh training phase (its card), meets the criterion with DAAM's aggregation (every cross-attention layer and
step, not normalised per pixel: DAAM's default): "circle" 7.4x, peak in the red circle's box in 18 of 20 images;
"square" 6.4x, 18 of 20 (before phase 7: 1.9x and 2 of 20, 1.3x and 0 of 20). The colour words' maps, which
found their objects before too, are held to their peaks and a ratio above 1.5.
"""

from __future__ import annotations

import numpy as np
import pytest

import daguerre
from daguerre.explain.attention import attention_maps
from daguerre.metrics.layout import COLOUR_NAMES, classify_colours, components

PROMPT = "a red circle above a blue square"
SEEDS = 20
MIN_RATIO = 3.0  # the criterion: mean over images of (mean map on the object) / (mean map elsewhere)
MIN_PEAKS = 0.8  # the share of images whose map peaks inside the object's box


@pytest.fixture(scope="module")
def results():
    pipe = daguerre.load("shapes")
    request = pipe.request(PROMPT, seed=0, n=SEEDS, batch_size=SEEDS)  # the model's recommended settings
    return attention_maps(pipe.components, request, ["red", "circle", "blue", "square"])


def _object(image, colour: str) -> np.ndarray | None:
    """(H, W) bool: the largest region of `colour` in the image, None if it has no pixel of it."""
    regions = components(classify_colours(np.asarray(image)) == COLOUR_NAMES.index(colour))
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    return regions == ids[sizes.argmax()] if len(ids) else None


def scores(results, word: str, colour: str) -> tuple[float, float]:
    """(mean ratio of the word's map on the object to elsewhere, share of images whose peak is in its box)."""
    ratios, peaks = [], 0
    for r in results:
        region = _object(r.image.image, colour)
        if region is None:
            continue
        heat = r.maps[word].numpy()
        ratios.append(float(heat[region].mean() / heat[~region].mean()))
        ys, xs = np.nonzero(region)
        py, px = np.unravel_index(heat.argmax(), heat.shape)
        peaks += bool(xs.min() <= px <= xs.max() and ys.min() <= py <= ys.max())
    return float(np.mean(ratios)), peaks / len(results)


@pytest.mark.parametrize(("word", "colour"), [("circle", "red"), ("square", "blue")])
def test_the_shape_nouns_map_peaks_on_its_object(results, word, colour):
    ratio, peaks = scores(results, word, colour)
    assert ratio >= MIN_RATIO and peaks >= MIN_PEAKS, f"{word}: {ratio:.2f}x, peak in the box in {peaks:.0%}"


@pytest.mark.parametrize(("word", "colour"), [("red", "red"), ("blue", "blue")])
def test_the_colour_words_map_peaks_on_its_object(results, word, colour):
    ratio, peaks = scores(results, word, colour)
    assert peaks >= MIN_PEAKS and ratio > 1.5, f"{word}: {ratio:.2f}x, peak in the box in {peaks:.0%}"
