"""The colour-blind semantic-map judge (issue 18, metrics/layout.py `shape_map`, docs/layout.md): a semantic map
names shapes, not colours, so the judge reads each map region's object from the foreground overlapping it,
whatever its colour, and fits its shape. It reads the world's own drawings pixel for pixel, does not care what
colour an object is drawn in (colour adherence is its own number), and fails an object drawn in the wrong shape
or not drawn at all."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from daguerre.data.shapes import (
    LABELS,
    Scene,
    ShapeObject,
    ShapesDataset,
    _make_object,
    object_masks,
    render,
    render_labels,
    tile_scenes,
)
from daguerre.metrics.layout import (
    MAP_COVERAGE,
    classify_colours,
    colour_adherence,
    format_spatial,
    mean_iou,
    predicted_map,
    shape_map,
)

SIZE = 64


def _judge(drawn: Scene, meant: Scene, size: int = SIZE):
    """The judge's reading of `drawn` against the map of `meant`: (mean IoU, the reading, the target map)."""
    target = render_labels(meant, size)
    judged = shape_map(render(drawn, size), list(object_masks(meant, size)))
    return mean_iou(judged.pred, target), judged, target


def _obj(shape: str, colour: str, position: tuple[float, float], size: str = "large") -> ShapeObject:
    return _make_object(shape, colour, size, 4, position)


def test_the_worlds_own_drawings_are_read_as_their_maps():
    data = ShapesDataset(60, seed=5, max_objects=4, placement="free")
    scores, found, right, wrong = [], 0, 0, 0
    for i in range(16):
        scene = data.scene(i)
        score, judged, target = _judge(scene, scene)
        scores.append(score)
        r, f = colour_adherence(judged.objects, [o.colour for o in scene.objects])
        right, found = right + r, found + f
        assert f == len(scene.objects) and judged.stray == 0.0
        assert np.array_equal(judged.pred > 0, target > 0)  # every object's pixels exactly
        wrong += sum(a.shape != b.shape for a, b in zip(judged.objects, scene.objects, strict=True))
    # the template fit (fit_shape) takes one small cross (scene 4: its 13-pixel box) for a diamond
    assert wrong <= 1 and np.mean(scores) > 0.97 and right == found == 44


def test_an_object_in_another_colour_scores_the_same_and_only_its_colour_adherence_drops():
    scene = Scene((_obj("circle", "red", (0.3, 0.3)), _obj("square", "blue", (0.7, 0.7), "small")))
    recoloured = Scene(tuple(replace(o, colour=c) for o, c in zip(scene.objects, ("green", "yellow"), strict=True)))
    score, judged, target = _judge(scene, scene)
    blind, judged_other, _ = _judge(recoloured, scene)
    assert blind == pytest.approx(score) and score > 0.95
    named = [o.colour for o in scene.objects]
    assert colour_adherence(judged.objects, named) == (2, 2)
    assert colour_adherence(judged_other.objects, named) == (0, 2)
    assert [o.colour for o in judged_other.objects] == ["green", "yellow"]
    colours = [(o.colour, LABELS.index(o.shape)) for o in scene.objects]  # the colour judge finds nothing there
    assert mean_iou(predicted_map(render(recoloured, SIZE), target, colours), target) < 0.5


def test_a_wrong_shape_or_a_missing_object_fails():
    red, blue = _obj("circle", "red", (0.3, 0.3)), _obj("square", "blue", (0.7, 0.7), "small")
    scene = Scene((red, blue))
    score, _, _ = _judge(scene, scene)
    for wrong in ("heart", "triangle", "cross", "ring"):
        reshaped, judged, _ = _judge(Scene((_obj(wrong, "red", (0.3, 0.3)), blue)), scene)
        assert judged.objects[0].shape == wrong and judged.objects[1].shape == "square"
        assert reshaped < 0.75 < score  # the circle's label and its pixels lost
        assert colour_adherence(judged.objects, ["red", "blue"]) == (2, 2)  # right colour, wrong shape
    missing, judged, _ = _judge(Scene((blue,)), scene)
    assert judged.objects[0].region is None and judged.objects[0].shape is None
    assert missing < 0.7 and colour_adherence(judged.objects, ["red", "blue"]) == (1, 1)


def test_a_shape_twice_is_two_objects_and_one_missing_is_not_hidden_by_its_twin():
    one, two = _obj("star", "red", (0.25, 0.25)), _obj("star", "green", (0.75, 0.75))
    scene = Scene((one, two))
    both, judged, _ = _judge(scene, scene)
    assert [o.shape for o in judged.objects] == ["star", "star"] and both > 0.95
    alone, judged, _ = _judge(Scene((two,)), scene)
    assert judged.objects[0].region is None and judged.objects[1].shape == "star" and alone < 0.8


def test_an_object_where_the_map_has_none_is_stray_foreground_not_an_object():
    scene = Scene((_obj("circle", "red", (0.3, 0.3)),))
    extra = Scene((*scene.objects, _obj("cross", "blue", (0.75, 0.75))))
    score, judged, _ = _judge(extra, scene)
    assert judged.stray > 0.3 and [o.shape for o in judged.objects] == ["circle"]
    assert score == pytest.approx(_judge(scene, scene)[0])


def test_an_edge_pixel_is_an_objects_when_its_own_colour_covers_more_than_half():
    """A white object's anti-aliased rim over black is gray: taking every pixel that shows some world colour as
    foreground grows the object by that rim; coverage read along the object's own colour does not."""
    scene = Scene((_obj("cross", "white", (0.5, 0.5)), _obj("heart", "gray", (0.2, 0.8), "small")))
    image = render(scene, SIZE)
    target = render_labels(scene, SIZE)
    judged = shape_map(image, list(object_masks(scene, SIZE)))
    assert np.array_equal(judged.pred, target)
    any_colour = classify_colours(np.asarray(image), MAP_COVERAGE) >= 0
    assert any_colour.sum() > (target > 0).sum()  # the rim a colour-blind judge must not take


def test_a_gray_object_over_black_is_gray_not_white_half_covered():
    """Gray is white half covered over black (and black half covered over white): a gray object drawn with a
    shade lighter (darker) and a little noise shows white (black) in most of its pixels, which must not make it
    a half-covered white (black) object, below the foreground's coverage."""
    rng = np.random.default_rng(0)
    for background in ("black", "white"):
        scene = Scene((_obj("circle", "gray", (0.3, 0.3)), _obj("cross", "gray", (0.7, 0.7))), background)
        shade = 3 if background == "black" else -3
        noisy = np.asarray(render(scene, SIZE)).astype(np.int16) + shade + rng.integers(-8, 9, (SIZE, SIZE, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        target = render_labels(scene, SIZE)
        judged = shape_map(image, list(object_masks(scene, SIZE)))
        assert mean_iou(judged.pred, target) > 0.95 and [o.colour for o in judged.objects] == ["gray", "gray"]


def test_canvases_of_tiles_are_read_per_object_and_reported(tmp_path):
    data = ShapesDataset(200, seed=3, max_objects=4, placement="free")
    scenes = [s for s in map(data.scene, range(data.n)) if s.background == "black"][:4]
    canvas = tile_scenes([scenes[0], scenes[1], scenes[2], scenes[0]], 2)  # one scene twice: twins in two tiles
    score, judged, _ = _judge(canvas, canvas, 2 * SIZE)
    assert score > 0.97 and all(o.region is not None for o in judged.objects)
    report = {"kind": "semantic map", "size": 2 * SIZE, "n": 1, "scale": 1, "tiles": 2, "mean_iou": score,
              "mean_iou_se": 0.0, "pixel_accuracy": 1.0, "objects": 4, "objects_found": 1.0,
              "colour_adherence": 0.5, "stray": 0.0, "mean_iou_by_colour": 0.4, "mean_iou_by_colour_se": 0.0,
              "ceiling": {"mean_iou": 0.99, "colour_adherence": 1.0}}
    text = format_spatial(report)
    assert "(shapes, colour-blind)" in text and "colour adherence 50.0%" in text and "by the caption's colours" in text
