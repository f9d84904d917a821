"""The evaluation classifiers: training learns, files round-trip, the shipped classifiers are accurate on held-out
ground truth, and the adherence judge passes rendered ground truth and fails deliberately wrong prompts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from daguerre.data.shapes import GRID, REGIONS, ObjectSpec, PromptSpec, Relation, sample_prompts
from daguerre.metrics.classifiers import (
    CELL_BOX,
    ClassifierConfig,
    build_classifier,
    load_classifier,
    prepare,
    read_metadata,
    scene_targets,
    scenes_from_predictions,
    shapes_config,
)
from daguerre.metrics.evaluate import EvalItem, judge_shapes
from daguerre.metrics.extractors import (
    FeatureExtractor,
    default_classifier_path,
    load_classifier_extractor,
    load_extractor,
)
from daguerre.metrics.train_classifier import (
    TEST_KEY,
    TrainSettings,
    render_scenes,
    shapes_hits,
    shapes_loss,
    shapes_scenes,
    train_classifier,
)


@pytest.fixture(scope="module")
def shapes_clf():
    return load_classifier_extractor("default", "shapes")


@pytest.fixture(scope="module")
def fashion_clf():
    return load_classifier_extractor("default", "fashion_mnist")


# --- networks and files ----------------------------------------------------------------------------

def test_shapes_classifier_overfits_one_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(shapes_config(), stages=((8, 1), (16, 1), (32, 1), (32, 1)), cell_hidden=32)
    model = build_classifier(cfg)
    scenes = shapes_scenes(TEST_KEY, 123, 0, 8)
    x, tgt = render_scenes(scenes), scene_targets(scenes, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = shapes_loss(model(x), tgt)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        hits = shapes_hits(model(x), tgt)
    assert loss.item() < 0.05 * first
    assert hits["cell"] == hits["cell_n"] and hits["colour"] == hits["colour_n"]


def test_train_classifier_writes_a_loadable_file(tmp_path):
    out = tmp_path / "clf.safetensors"
    acc = train_classifier(TrainSettings("shapes", steps=3, batch_size=8, test_n=16, seed=5), out, progress=False,
                           log=lambda _: None)
    assert set(acc) == {"cell", "shape", "colour", "size", "background", "scene"}
    info = read_metadata(out)
    assert info.config.kind == "shapes" and info.config.classes[1:] == shapes_config().classes[1:]
    assert info.training["steps"] == 3 and info.training["seed"] == 5 and info.accuracy == acc
    model, _ = load_classifier(out)
    assert not model.training
    assert out.stat().st_size < 1_000_000


def test_saved_weights_round_trip(tmp_path):
    from daguerre.metrics.classifiers import save_classifier

    torch.manual_seed(1)
    model = build_classifier(shapes_config()).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "m.safetensors"
    save_classifier(model, path, {"note": "test"}, {"cell": 0.5})
    loaded, info = load_classifier(path)
    x = render_scenes(shapes_scenes(TEST_KEY, 7, 0, 4))
    half = build_classifier(shapes_config()).eval()
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(loaded(x)["shape"], half(x)["shape"], atol=1e-5)
    assert info.training == {"note": "test"} and info.accuracy == {"cell": 0.5}


def test_not_a_classifier_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a daguerre classifier"):
        read_metadata(path)
    with pytest.raises(FileNotFoundError, match="classifier train"):
        read_metadata(tmp_path / "missing.safetensors")


def test_prepare_converts_channels_and_size():
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    gray = prepare(rgb, 1, 32)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert gray.shape == (2, 1, 32, 32) and torch.allclose(gray[:, 0], expected, atol=1e-6)
    up = prepare(torch.full((1, 1, 16, 16), 0.25), 3, 64)
    assert up.shape == (1, 3, 64, 64) and torch.allclose(up, torch.tensor(0.25))
    with pytest.raises(ValueError, match="expected images"):
        prepare(torch.zeros(1, 2, 8, 8), 3, 64)


def test_predicted_scene_relations_follow_cells():
    cfg = shapes_config()
    n = len(REGIONS)
    pred = {"shape": torch.zeros(1, n, dtype=torch.long), "colour": torch.zeros(1, n, dtype=torch.long),
            "size": torch.zeros(1, n, dtype=torch.long), "background": torch.zeros(1, dtype=torch.long)}
    pred["shape"][0, 0] = cfg.classes.index("circle")  # top left
    pred["shape"][0, 5] = cfg.classes.index("star")  # right (middle row)
    pred["colour"][0, 5] = cfg.colours.index("blue")
    (scene,) = scenes_from_predictions(pred, cfg)
    assert [o.shape for o in scene.objects] == ["circle", "star"]
    assert scene.objects[0].position == (GRID[0], GRID[0]) and scene.objects[1].region == "right"
    assert scene.objects[0].bbox[2] - scene.objects[0].bbox[0] == pytest.approx(2 * CELL_BOX)
    circle, star = ObjectSpec("circle", cfg.colours[0]), ObjectSpec("star", "blue")
    for rel, ok in (("above", True), ("to the left of", True), ("below", False), ("to the right of", False)):
        assert PromptSpec((circle, star), Relation(0, rel, 1)).matches(scene) is ok, rel
    same_row = dict(pred, shape=pred["shape"].clone())
    same_row["shape"][0, 5], same_row["shape"][0, 2] = 0, cfg.classes.index("star")  # top right
    (scene2,) = scenes_from_predictions(same_row, cfg)
    assert not PromptSpec((circle, ObjectSpec("star")), Relation(0, "above", 1)).matches(scene2)
    assert PromptSpec((circle, ObjectSpec("star")), Relation(0, "to the left of", 1)).matches(scene2)


# --- extractors ------------------------------------------------------------------------------------

def test_load_extractor_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_extractor("default", "mnist")
    with pytest.raises(FileNotFoundError, match="no classifier file"):
        load_extractor(str(tmp_path / "nope.safetensors"), "shapes")
    with pytest.raises(FileNotFoundError, match="Inception-v3 weights"):
        load_extractor(f"inception:{tmp_path / 'nope.pth'}", "shapes")
    with pytest.raises(ValueError, match="names no file"):
        load_extractor("inception:", "shapes")
    with pytest.raises(ValueError, match="trained on fashion_mnist, not shapes"):
        load_extractor(str(default_classifier_path("fashion_mnist")), "shapes")


def test_shipped_classifiers_are_feature_extractors(shapes_clf, fashion_clf):
    for clf, channels, dim in ((shapes_clf, 3, 128), (fashion_clf, 1, 128)):
        assert isinstance(clf, FeatureExtractor)
        assert len(clf.sha256) == 64 and clf.name.endswith("-classifier")
        assert default_classifier_path(clf.kind).stat().st_size < 1_000_000
        x = torch.rand(3, channels, 32, 32) * 2 - 1
        f = clf.features(x)
        assert f.shape == (3, dim) and f.dtype == torch.float32
        assert torch.allclose(clf.features(x[1:2]), f[1:2], atol=1e-5)  # batch-independent (eval-mode BN)
    assert shapes_clf.probabilities(torch.zeros(1, 3, 64, 64)) is None
    p = fashion_clf.probabilities(torch.zeros(2, 1, 32, 32))
    assert p.shape == (2, 10) and torch.allclose(p.sum(-1), torch.ones(2))


# --- the shipped classifiers on held-out ground truth ----------------------------------------------

def test_shipped_shapes_classifier_accuracy(shapes_clf):
    scenes = shapes_scenes(TEST_KEY, 99, 0, 64)  # a stream the classifier never saw
    x = render_scenes(scenes)
    pred = shapes_clf.predict(x)
    tgt = scene_targets(scenes, shapes_clf.config)
    occupied = tgt["shape"] > 0
    assert (pred["shape"] == tgt["shape"]).float().mean() >= 0.95
    assert (pred["colour"] == tgt["colour"])[occupied].float().mean() >= 0.95
    assert (pred["size"] == tgt["size"])[occupied].float().mean() >= 0.95
    assert (pred["background"] == tgt["background"]).float().mean() >= 0.95


def test_shipped_fashion_classifier_accuracy(fashion_clf, fashion_mnist):
    from daguerre.metrics.train_classifier import fashion_tensors, to_unit_range

    x, y = fashion_tensors(fashion_mnist, "test")
    idx = torch.from_numpy(np.random.default_rng(0).permutation(len(y))[:500])
    probs = fashion_clf.probabilities(to_unit_range(x[idx]))
    assert (probs.argmax(-1) == y[idx]).float().mean() >= 0.88


def _items(prompts, kind):
    return [EvalItem(kind, p.text, i, spec=p.spec, scene=p.scene) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("kind", ["single", "relation"])
def test_judge_passes_ground_truth_and_fails_wrong_prompts(shapes_clf, kind):
    prompts = sample_prompts(kind, 48, seed=4242)
    scenes = shapes_clf.predict_scenes(render_scenes([p.scene for p in prompts]))
    items = _items(prompts, kind)
    right = judge_shapes(scenes, items)
    key = "relation" if kind == "relation" else "shape_colour"
    assert np.mean([v[key] for v in right]) >= 0.95
    assert np.mean([v["all"] for v in right]) >= 0.95
    wrong = judge_shapes(scenes, items[1:] + items[:1])  # every image against another image's prompt
    assert np.mean([v[key] for v in wrong]) <= 0.1
    if kind == "relation":  # the same objects with the relation turned around
        flipped = [dataclasses.replace(it, spec=dataclasses.replace(
            it.spec, relation=Relation(it.spec.relation.object, it.spec.relation.relation, it.spec.relation.subject)))
            for it in items]
        assert np.mean([v["relation"] for v in judge_shapes(scenes, flipped)]) <= 0.1
        assert np.mean([v["shape_colour"] for v in judge_shapes(scenes, flipped)]) >= 0.95
        assert np.mean([v["reversed"] for v in judge_shapes(scenes, flipped)]) >= 0.95  # told apart from one line
        assert np.mean([v["reversed"] for v in right]) <= 0.05


def test_judge_tells_right_reversed_and_one_line_apart():
    """A relation prompt against three layouts of its two objects: the right way, reversed, side by side."""
    from daguerre.data.shapes import Scene, ShapeObject

    def obj(shape, colour, cell):
        x, y = GRID[cell % 3], GRID[cell // 3]
        return ShapeObject(shape, colour, "large", REGIONS[cell], (x, y), (x - 0.1, y - 0.1, x + 0.1, y + 0.1))

    spec = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), Relation(0, "above", 1))
    item = EvalItem("relation", "a red circle above a blue square", 0, spec=spec)
    layouts = {"right": (1, 7), "reversed": (7, 1), "one line": (3, 5)}  # cells: top / bottom, middle row
    for name, (a, b) in layouts.items():
        v = judge_shapes([Scene((obj("circle", "red", a), obj("square", "blue", b)))], [item])[0]
        assert v["shape_colour"] and (v["relation"], v["reversed"]) == (name == "right", name == "reversed"), name


def test_config_json_round_trip():
    cfg = shapes_config()
    assert ClassifierConfig.from_json(cfg.to_json()) == cfg


def test_evaluation_of_ground_truth_is_right(shapes_clf, fashion_clf, fashion_mnist):
    """The evaluation's own prompts and judge, fed the ground truth instead of a model: ~100% adherence."""
    from daguerre.metrics.evaluate import EvalSettings, eval_items, judge, summarize
    from daguerre.metrics.train_classifier import fashion_tensors, to_unit_range

    items = eval_items(EvalSettings("shapes", n=32, seed=3))
    verdicts, seen = judge(shapes_clf, render_scenes([it.scene for it in items]), items)
    summary = summarize(verdicts, items)
    assert summary["single"]["shape_colour"] >= 0.95 and summary["single"]["all"] >= 0.95
    assert summary["relation"]["relation"] >= 0.95 and summary["relation"]["all"] >= 0.95
    assert seen[0].endswith(f"on {items[0].scene.background}")

    items = eval_items(EvalSettings("fashion_mnist", n=200, seed=3))
    x, y = fashion_tensors(fashion_mnist, "test")
    picks = [int(np.flatnonzero(y.numpy() == it.label)[k]) for k, it in enumerate(items)]  # a real image per prompt
    verdicts, seen = judge(fashion_clf, to_unit_range(x[picks]), items)
    summary = summarize(verdicts, items, fashion_clf.config.classes)
    assert summary["class"]["n"] == 200 and summary["class"]["class"] >= 0.88
    assert len(summary["class"]["per_class"]) == 10
