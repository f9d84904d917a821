"""The hexagon demonstration's parts (docs/lora.md): the shapes world draws a hexagon without changing any scene
it samples, the hexagon folder is images with captions, and the judge tells a hexagon from the world's shapes."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from daguerre.data.shapes import EXTRA_SHAPES, SHAPES, ShapesDataset, render, sample_scene
from daguerre.metrics.hexagon import (
    HEXAGON,
    hexagon_scene,
    judge_accuracy,
    judge_shape,
    judge_shape_iou,
    write_folder,
)

# sha256 of the first 200 scenes of ShapesDataset(seed=0) (pixels and captions), computed before the hexagon was
# added to the renderer: the world's data (and every cached latent of it) is unchanged
WORLD_SHA256 = "5ada5bf537386abc06bc395d4b27303fdb22657858cc5797d1616fe48f7bbeb5"


def test_the_hexagon_leaves_every_sampled_scene_bit_for_bit():
    ds = ShapesDataset(200, seed=0)
    h = hashlib.sha256()
    for i in range(200):
        scene, text = ds.sample(i)
        h.update(np.asarray(render(scene)).tobytes())
        h.update(text.encode())
    assert h.hexdigest() == WORLD_SHA256
    assert HEXAGON in EXTRA_SHAPES and HEXAGON not in SHAPES
    rng = np.random.default_rng(0)
    assert not any(o.shape == HEXAGON for _ in range(300) for o in sample_scene(rng).objects)


def test_the_hexagon_is_drawn_as_a_regular_hexagon():
    scene = hexagon_scene(np.random.default_rng(3))
    obj = scene.objects[0]
    x0, y0, x1, y1 = obj.bbox
    assert abs((y1 - y0) / (x1 - x0) - np.sqrt(3) / 2) < 1e-9  # flat top and bottom: height / width = sqrt(3) / 2
    big = render(scene, 256)
    assert judge_shape(big, obj.colour) == HEXAGON


def test_the_folder_is_images_with_captions_naming_the_hexagon(tmp_path):
    captions = write_folder(tmp_path, 6, seed=1)
    assert len(captions) == 6 and all(HEXAGON in c for c in captions)
    assert len(set(captions)) > 1  # the world's phrasings
    for i, text in enumerate(captions):
        assert (tmp_path / f"hexagon_{i:03d}.txt").read_text().strip() == text
        assert Image.open(tmp_path / f"hexagon_{i:03d}.png").size == (64, 64)
    assert write_folder(tmp_path / "again", 6, seed=1) == captions  # seeded


def test_the_judge_tells_hexagons_from_the_worlds_shapes():
    for judge in ("fit", "iou"):
        report = judge_accuracy(n=4, seed=5, judge=judge)
        assert report["hexagon_recall"] == 1.0
        assert report["others_called_hexagon"] == 0.0
        assert min(report["accuracy"].values()) >= 0.75


def _single(shape: str, seed: int, size: str, blur: float = 0.0) -> tuple[Image.Image, str]:
    """One object of `shape` and `size` (blurred by `blur` pixels: as soft as a generated one), and its colour."""
    from PIL import ImageFilter

    from daguerre.data.shapes import REGIONS, Scene, _make_object

    scene = hexagon_scene(np.random.default_rng(seed), shape)
    o = scene.objects[0]
    scene = Scene((_make_object(shape, o.colour, size, REGIONS.index(o.region), o.position),), scene.background)
    return render(scene).filter(ImageFilter.GaussianBlur(blur)), o.colour


def test_the_fit_judge_tells_soft_hexagons_from_circles():
    # the first judge (mask IoU in the box) calls soft hexagons circles (and here a soft circle a hexagon)
    calls = {(shape, seed): _single(shape, seed, "small", 0.7) for shape in (HEXAGON, "circle") for seed in range(12)}
    assert all(judge_shape(image, colour) == shape for (shape, _), (image, colour) in calls.items())
    assert sum(judge_shape_iou(image, colour) != shape for (shape, _), (image, colour) in calls.items()) >= 4


def test_the_fit_judge_finds_hexagons_as_the_shapes_autoencoder_draws_them():
    from daguerre.metrics.hexagon import _round_trip

    shapes = [HEXAGON, "circle"] * 3
    objects = [_single(shape, i, "large") for i, shape in enumerate(shapes)]
    images = _round_trip("shapes", [image for image, _ in objects])
    assert images[0].size == (64, 64)
    assert [judge_shape(im, colour) for im, (_, colour) in zip(images, objects, strict=True)] == shapes


def test_the_judge_wants_the_prompts_colour_not_a_mix_of_it():
    from daguerre.data.shapes import Scene, _make_object

    scene = Scene((_make_object("circle", "gray", "large", 4, (0.5, 0.5)),), "black")
    image = render(scene)
    assert judge_shape(image, "gray") == "circle"
    assert judge_shape(image, "white") is None  # grey on black is white at half coverage: not a white object
    assert judge_shape(image, "black") is None  # the background's own colour


def test_the_judge_finds_no_object_of_an_absent_colour():
    scene = hexagon_scene(np.random.default_rng(0))
    image = render(scene)
    absent = next(c for c in ("red", "blue") if c != scene.objects[0].colour)
    assert judge_shape(image, absent) is None


def test_prompts_follow_the_worlds_grammar():
    from daguerre.data.shapes import parse_caption
    from daguerre.metrics.hexagon import hexagon_prompts

    prompts = dict((c, p) for p, c in hexagon_prompts())
    assert prompts["red"] == "a large red hexagon" and prompts["orange"] == "a large orange hexagon"
    assert prompts["black"] == "a large black hexagon on a white background"  # never black on black
    circle = dict((c, p) for p, c in hexagon_prompts(shape="circle"))
    spec = parse_caption(circle["black"])  # the world's own parser reads a world shape's prompt
    assert spec.background == "white" and spec.objects[0].shape == "circle"
    plain = dict((c, p) for p, c in hexagon_prompts(size=None))  # the "a red hexagon"
    assert plain["red"] == "a red hexagon" and plain["orange"] == "an orange hexagon"


def test_adherence_refuses_an_unknown_shape_or_size():
    import pytest

    from daguerre.metrics.hexagon import hexagon_adherence

    with pytest.raises(ValueError, match="octagon"):
        hexagon_adherence("shapes", [], shape="octagon")
    with pytest.raises(ValueError, match="huge"):
        hexagon_adherence("shapes", [], size="huge")
