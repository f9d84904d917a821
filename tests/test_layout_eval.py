"""`daguerre eval` of layout and semantic-map models (issue 18, metrics/layout.py): the colour-segmentation judge
scores the shapes world's own drawings near their ceiling and catches a moved, reshaped, missing or recoloured
object; a tiny model's evaluation writes its report on held-out scenes and refuses what does not apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daguerre.cli import main
from daguerre.data.layout import LayoutObject
from daguerre.data.shapes import LABELS, Scene, ShapeObject, ShapesDataset, render, render_labels
from daguerre.metrics.layout import (
    box_iou,
    classify_colours,
    components,
    mean_iou,
    predicted_map,
    score_layout,
)
from daguerre.training.config import load_run_config
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"


def _scene_layout(data: ShapesDataset, i: int) -> tuple[Scene, list[LayoutObject]]:
    scene, _ = data.sample(i)
    return scene, [LayoutObject(p, tuple(b)) for p, b in data.layout(i)]


def test_the_judge_finds_every_object_of_the_worlds_own_drawings():
    data = ShapesDataset(40, seed=3, max_objects=4, placement="free")
    ious, right, maps = [], [], []
    for i in range(12):
        scene, objects = _scene_layout(data, i)
        scored = score_layout(render(scene, 64), objects)
        ious += [o["iou"] for o in scored]
        right += [o["right"] for o in scored]
        target = render_labels(scene, 128)
        colours = [(o.colour, LABELS.index(o.shape)) for o in scene.objects]
        maps.append(mean_iou(predicted_map(render(scene, 128), target, colours), target))
    assert np.mean(ious) > 0.85 and min(ious) > 0.7 and all(right)
    assert np.mean(maps) > 0.95


def test_the_judge_catches_a_moved_reshaped_missing_or_recoloured_object():
    red = ShapeObject("circle", "red", "large", "top left", (0.25, 0.25), (0.09, 0.09, 0.41, 0.41))
    blue = ShapeObject("square", "blue", "large", "bottom right", (0.7, 0.7), (0.0, 0.0, 0.0, 0.0))
    blue = ShapeObject(blue.shape, blue.colour, blue.size, blue.region, blue.position,
                       render_box(blue))
    objects = [LayoutObject("a red circle", red.bbox), LayoutObject("a blue square", blue.bbox)]
    good = score_layout(render(Scene((red, blue)), 64), objects)
    assert [o["right"] for o in good] == [True, True]
    moved = ShapeObject("circle", "red", "large", "top right", (0.75, 0.25), (0.59, 0.09, 0.91, 0.41))
    scored = score_layout(render(Scene((moved, blue)), 64), objects)
    assert scored[0]["iou"] == 0.0 and not scored[0]["right"] and scored[1]["right"]
    reshaped = ShapeObject("heart", "red", "large", "top left", (0.25, 0.25), red.bbox)
    scored = score_layout(render(Scene((reshaped, blue)), 64), objects)
    assert scored[0]["found_shape"] == "heart" and not scored[0]["right"]
    scored = score_layout(render(Scene((blue,)), 64), objects)
    assert scored[0]["found_box"] is None and scored[0]["iou"] == 0.0 and not scored[0]["right"]
    green = ShapeObject("circle", "green", "large", "top left", (0.25, 0.25), red.bbox)
    assert not score_layout(render(Scene((green, blue)), 64), objects)[0]["right"]
    target = render_labels(Scene((red, blue)), 64)
    colours = [("red", LABELS.index("circle")), ("blue", LABELS.index("square"))]
    assert mean_iou(predicted_map(render(Scene((red, blue)), 64), target, colours), target) > 0.9
    assert mean_iou(predicted_map(render(Scene((reshaped, blue)), 64), target, colours), target) < 0.7
    with pytest.raises(ValueError, match="names no shapes-world colour and shape"):
        score_layout(render(Scene((red,)), 64), [LayoutObject("a thing", (0, 0, 1, 1))])


def render_box(obj: ShapeObject) -> tuple[float, float, float, float]:
    """The box the world gives an object of this shape and size at its position."""
    from daguerre.data.shapes import _make_object

    return _make_object(obj.shape, obj.colour, obj.size, 4, obj.position).bbox


def test_edge_pixels_stay_with_their_object_and_regions_are_8_connected():
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 1] = (230, 25, 25)  # red
    image[2, 2] = (115, 12, 12)  # half red over black: an anti-aliased edge
    image[1, 4] = (30, 70, 235)  # blue
    colours = classify_colours(image)
    assert colours[1, 1] == colours[2, 2] != colours[1, 4] and colours[0, 0] == -1
    regions = components(colours == colours[1, 1])
    assert regions[1, 1] == regions[2, 2] > 0 and len(np.unique(regions)) == 2
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)


def test_eval_measures_a_layout_model_on_its_held_out_scenes(tmp_path, vae_file, capsys):
    quick = ["train.progress=false", "data.n=24", "data.holdout=6", "train.batch_size=4", "train.steps=2",
             "train.sample_every=0", "train.checkpoint_every=0"]
    path = train_ldm(load_run_config(CONFIGS / "tiny_layout_ldm.toml", "ldm", quick), tmp_path / "run",
                     vae_path=vae_file)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(path), "--n", "3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "layout" and report["n"] == 3 and report["scenes"]["holdout"] == 6
    assert report["objects"] == sum(len(it["objects"]) for it in report["items"])
    assert 0 <= report["mean_box_iou"] <= 1 and 0 <= report["object_accuracy"] <= 1
    assert report["ceiling"]["mean_box_iou"] > 0.6 and Image.open(out / "grid.png").size[0] == 64
    held = {it["index"] for it in report["items"]}
    from daguerre.data.split import holdout_split

    assert held <= set(holdout_split(24, 6, 0)[1].tolist())  # scenes the model never trained on
    capsys.readouterr()
    for extra, message in ((["--n", "7"], "held out 6 scenes"), (["--dataset", "shapes"], "leave out --data"),
                           (["--map-scale", "9"], "map scale must be a whole number in [1, 8]")):
        assert main(["eval", "--model", str(path), "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err
