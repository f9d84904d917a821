"""`daguerre eval --data FOLDER` (metrics/folder_eval.py) and `daguerre classifier train --dataset folder`, on tiny
folders of a few dozen 32x32 images and random tiny models: the held-out images are exactly those the model's
training held out, the floor, class adherence by a classifier of the folder, the CLIP score of a caption folder,
and one-line refusals instead of meaningless numbers when the data does not fit the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.data.split import holdout_split
from daguerre.metrics.classifiers import read_metadata
from daguerre.metrics.folder_data import Folder, FolderSpec, split_indices
from daguerre.metrics.folder_eval import folder_spec, reference_indices, trained_on

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
PER_CLASS = 10
HOLDOUT = 6
FAST = ["--steps", "1", "--real", "24", "--no-progress", "--batch", "3", "--n", "6"]


def make_folder(root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS, per_class: int = PER_CLASS,
                seed: int = 0, size: int = 32, mode: str = "RGB") -> Path:
    """One sub-folder per class of noisy solid-colour images."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).convert(mode).save(root / name / f"{seed}_{i:02d}.png")
    return root


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv: str) -> str:
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.startswith("daguerre ") and err.count("\n") == 1, err
    return err


def _train_classifier(capsys, data: Path, out: Path, *extra: str) -> Path:
    code, _, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(data), "--out", str(out),
                        "--holdout", str(HOLDOUT), "--width", "4", "--steps", "40", "--batch-size", "16",
                        "--no-progress", *extra)
    assert code == 0, err
    return out


def _model(path: Path, root: Path | None, *, classes: list[str] | None = None, holdout: int = HOLDOUT,
           seed: int = 0, split: str | None = "random", captions: str = "auto") -> Path:
    """A random tiny model file whose provenance says it was trained on `root` (None: no provenance), as
    training/export.py writes it; class-conditional on `classes` when given."""
    from daguerre.checkpoints import save_model
    from daguerre.components import build_components
    from daguerre.config import preset

    cfg = preset("tiny")
    if classes is not None:
        cfg.conditioning, cfg.text_encoder, cfg.unet.context_dim = "class", None, None
        cfg.unet.num_classes, cfg.class_names = len(classes) + 1, list(classes)
    comps = build_components(cfg, seed=0)
    if root is not None:
        data = {"kind": "folder", "root": str(root.resolve()), "size": 32, "seed": seed, "captions": captions,
                "channels": 3, "on_error": "skip", **({"split": split} if split else {})}
        comps.config.provenance = {"stage": "ldm", "data": data, "run_config": {"data": {
            "kind": "folder", "size": 32, "seed": seed, "holdout": holdout,
            "folder": {"root": str(root), "captions": captions, "channels": 3, "crop": "center"}}}}
    save_model(comps, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A class folder, its classifier, a class-conditional model trained on it, and a text model."""
    base = tmp_path_factory.mktemp("folder-eval")
    folder = make_folder(base / "colours")
    capsys = _NoCapture()
    classifier = _train_classifier(capsys, folder, base / "colours.safetensors")
    return {"base": base, "folder": folder, "classifier": classifier,
            "class_model": _model(base / "class.safetensors", folder, classes=sorted(COLOURS)),
            "text_model": _model(base / "text.safetensors", folder)}


class _NoCapture:
    def readouterr(self):
        return "", ""


# --- the folder, its split, what a model records -----------------------------------------------------

def test_the_held_out_images_are_those_training_held_out(tmp_path):
    root = make_folder(tmp_path / "f")
    folder = Folder(FolderSpec(str(root), 32, holdout=HOLDOUT, seed=3))
    n = 3 * PER_CLASS
    train, held = holdout_split(n, HOLDOUT, 3)
    assert folder.held.tolist() == held.tolist() and folder.train.tolist() == train.tolist()
    assert folder.class_names == sorted(COLOURS) and folder.labels.tolist() == [k for k in range(3)
                                                                               for _ in range(PER_CLASS)]
    # at most half of a small folder, as training reduces data.holdout; runs before the random split held out
    # the last images
    assert len(split_indices(n, 100, 0)[1]) == n // 2
    assert split_indices(n, 4, 0, "last")[1].tolist() == [26, 27, 28, 29]
    x, kept = folder.images(folder.held[:2])
    assert x.shape == (2, 3, 32, 32) and -1 <= x.min() and x.max() <= 1 and kept.tolist() == held[:2].tolist()
    # a moved copy keeps its fingerprint, another folder does not
    copy = tmp_path / "copy"
    root.rename(copy)
    assert Folder(FolderSpec(str(copy), 32)).fingerprint == folder.fingerprint
    assert Folder(FolderSpec(str(make_folder(tmp_path / "g", seed=1)), 32)).fingerprint != folder.fingerprint


def test_the_real_and_floor_images_never_overlap(tmp_path):
    root = make_folder(tmp_path / "f")
    folder = Folder(FolderSpec(str(root), 32, holdout=HOLDOUT))
    real, floor = reference_indices(folder, 5, 1000, seed=0)
    assert set(real) == set(folder.held) and set(floor) <= set(folder.train) and len(floor) == 5
    test = Folder(FolderSpec(str(root), 32, holdout=None))  # a test folder: every image held out
    real, floor = reference_indices(test, 5, 10, seed=0)
    assert len(floor) == 5 and len(real) == 10 and not set(real) & set(floor)
    with pytest.raises(ValueError, match="--n 25: the floor needs as many real images of the train split"):
        reference_indices(folder, 25, 1000, seed=0)


def test_trained_on_reads_the_models_provenance(tmp_path):
    from daguerre.checkpoints import load_model

    root = make_folder(tmp_path / "f")
    rec = trained_on(load_model(_model(tmp_path / "m.safetensors", root, holdout=8, seed=5)).config)
    assert (rec.kind, rec.root, rec.size, rec.channels, rec.holdout, rec.seed, rec.split) == (
        "folder", str(root.resolve()), 32, 3, 8, 5, "random")
    old = trained_on(load_model(_model(tmp_path / "old.safetensors", root, split=None)).config)
    assert old.split == "last"  # a run from before the random split
    config = load_model(_model(tmp_path / "none.safetensors", None)).config
    assert trained_on(config) is None
    plan = folder_spec(config, str(root), None, None, "m")
    assert (plan.spec.holdout, plan.spec.seed, plan.spec.size) == (64, 0, 32) and plan.floor is None
    assert "records no training data" in plan.notes[0]


# --- the classifier of a folder ------------------------------------------------------------------------

def test_classifier_train_on_a_folder_learns_the_train_split_and_tests_on_the_held_out(world, capsys):
    info = read_metadata(world["classifier"])
    c, data = info.config, info.training["data"]
    assert (c.kind, c.classes, c.image_size, c.in_channels) == ("folder", tuple(sorted(COLOURS)), 32, 3)
    assert (data["train_images"], data["test"]["images"], data["holdout"]) == (3 * PER_CLASS - HOLDOUT, HOLDOUT,
                                                                              HOLDOUT)
    assert data["root"] == str(world["folder"].resolve()) and len(data["fingerprint"]) == 64
    assert 0 <= info.accuracy["class"] <= 1 and info.training["cpu_seconds"] >= 0
    assert info.accuracy["class"] == 1.0  # three colours, told apart after 40 steps
    code, stdout, err = _run(capsys, "classifier", "test", str(world["classifier"]))
    assert code == 0, err
    assert f"held-out split of {data['root']} ({HOLDOUT} images)" in stdout and "class 100.00%" in stdout
    assert f"trained 40 steps in {info.training['seconds']} s ({info.training['cpu_seconds']} CPU s)" in stdout


def test_folder_classifier_reads_only_the_train_split(tmp_path, monkeypatch):
    from daguerre.metrics import train_classifier as tc

    root = make_folder(tmp_path / "f")
    loaded = []
    real_load = Folder.load
    monkeypatch.setattr(Folder, "load", lambda self, idx: loaded.append(list(idx)) or real_load(self, idx))
    data = tc.load_folder_data(tc.FolderTraining(str(root), holdout=HOLDOUT, data_seed=2))
    train, held = holdout_split(3 * PER_CLASS, HOLDOUT, 2)
    assert loaded == [train.tolist(), held.tolist()]
    assert data.train[0].dtype == torch.uint8 and data.train[1].tolist() == [k // PER_CLASS for k in train]


def test_classifier_with_a_test_folder(tmp_path, capsys):
    train = make_folder(tmp_path / "train")
    test = make_folder(tmp_path / "test", seed=1, per_class=4)
    out = tmp_path / "c.safetensors"
    code, _, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(train), "--test-data",
                        str(test), "--out", str(out), "--width", "4", "--steps", "2", "--no-progress")
    assert code == 0, err
    data = read_metadata(out).training["data"]
    assert data["train_images"] == 3 * PER_CLASS and data["test"]["which"] == "all" and data["test"]["images"] == 12
    code, stdout, _ = _run(capsys, "classifier", "test", str(out))
    assert code == 0 and f"test folder {test.resolve()} (12 images)" in stdout


def test_classifier_train_refusals(tmp_path, capsys):
    train = make_folder(tmp_path / "train")
    out = str(tmp_path / "c.safetensors")
    other = make_folder(tmp_path / "other", {"cat": (1, 2, 3), "dog": (4, 5, 6)})
    err = _refused(capsys, "classifier", "train", "--dataset", "folder", "--data", str(train), "--test-data",
                   str(other), "--out", out, "--steps", "1", "--no-progress")
    assert "has the classes cat, dog" in err and "blue, green, red" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    err = _refused(capsys, "classifier", "train", "--dataset", "folder", "--data", str(flat), "--out", out)
    assert "has no class sub-folders" in err and "daguerre train clip" in err
    err = _refused(capsys, "classifier", "train", "--dataset", "folder", "--out", out)
    assert "needs --data FOLDER" in err
    err = _refused(capsys, "classifier", "train", "--dataset", "folder", "--data", str(train), "--holdout", "0",
                   "--out", out)
    assert "0 test images" in err
    assert not Path(out).exists()


def test_a_changed_folder_no_longer_has_the_recorded_accuracy(tmp_path, capsys):
    root = make_folder(tmp_path / "f")
    out = _train_classifier(capsys, root, tmp_path / "c.safetensors")
    make_folder(root, seed=9, per_class=1)  # one new image per class
    err = _refused(capsys, "classifier", "test", str(out))
    assert "changed since the classifier was trained" in err


# --- daguerre eval --data -------------------------------------------------------------------------------

def test_eval_class_model_against_its_folder(world, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, "eval", "--model", str(world["class_model"]), "--data", str(world["folder"]),
                             "--classifier", str(world["classifier"]), *FAST, "--out", str(out))
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert r["dataset"] == "folder" and r["data"]["root"] == str(world["folder"].resolve())
    assert (r["data"]["holdout"], r["data"]["seed"], r["data"]["split"]) == (HOLDOUT, 0, "random")
    assert r["adherence"]["class"]["n"] == 6 and set(r["adherence"]["class"]["per_class"]) == set(COLOURS)
    assert [s["class_name"] for s in r["samples"]] == ["blue", "blue", "green", "green", "red", "red"]
    assert all(s["prompt"] == "" for s in r["samples"])  # class labels, not prompts
    d = r["distribution"]
    assert (d["n_generated"], d["n_real"], d["n_floor"]) == (6, HOLDOUT, 6) and "is" in d
    assert d["fd"] > d["fd_floor"]  # noise from a random model vs real images; real vs real is closer
    assert r["classifier"]["accuracy"]["class"] == 1.0 and r["classifier"]["accuracy_on_real"] == 1.0
    assert r["extractor"]["accuracy"]["class"] == 1.0  # the classifier is the feature space too
    assert "held-out accuracy class 100.0%" in stdout and stdout.count("held-out accuracy") == 2
    assert "100.0% on the real images here" in stdout
    assert f"{HOLDOUT} of {3 * PER_CLASS} images held out, random split, seed 0" in stdout
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 2 * 64


def test_eval_of_a_folder_model_without_data_uses_its_training_folder(world, tmp_path, capsys):
    code, _, err = _run(capsys, "eval", "--model", str(world["class_model"]), "--classifier",
                        str(world["classifier"]), *FAST, "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert "measuring against the model's training folder" in err


def test_eval_text_model_prompts_the_class_captions(world, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, "eval", "--model", str(world["text_model"]), "--data", str(world["folder"]),
                             "--classifier", str(world["classifier"]), *FAST, "--out", str(out))
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert [s["prompt"] for s in r["samples"]][::2] == ["a photo of a blue", "a photo of a green",
                                                        "a photo of a red"]
    assert r["adherence"]["class"]["n"] == 6


def test_eval_against_a_separate_test_folder(world, tmp_path, capsys):
    test = make_folder(tmp_path / "test", seed=4, per_class=5)
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(world["class_model"]), "--data", str(test), "--classifier",
            str(world["classifier"]), *FAST, "--out", str(out)]
    err = _refused(capsys, *argv)
    assert "not on --data" in err and "pass --holdout all" in err
    code, stdout, err = _run(capsys, *argv, "--holdout", "all")
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    d = r["distribution"]
    assert r["data"]["holdout"] == "all" and (d["n_real"], d["n_floor"]) == (15 - 6, 6)  # disjoint, all test images
    assert "a test folder" in stdout


def test_eval_caption_folder_with_a_clip(tmp_path, capsys):
    from daguerre.checkpoints.clip_file import save_clip
    from daguerre.config import CLIP_PRESETS
    from daguerre.models.clip import CLIPModel, init_clip_

    root = tmp_path / "captioned"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(20):
        root.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    clip = tmp_path / "clip.safetensors"
    save_clip(init_clip_(CLIPModel(CLIP_PRESETS["tiny"]()), torch.Generator().manual_seed(0)), clip)
    model = _model(tmp_path / "m.safetensors", root)
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, "eval", "--model", str(model), "--data", str(root), "--clip", str(clip),
                             *FAST, "--out", str(out))
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    names = sorted(f"{i}.png" for i in range(20))  # the folder's order
    held = {f"picture number {names[k][:-4]}" for k in holdout_split(20, HOLDOUT, 0)[1]}
    assert {s["prompt"] for s in r["samples"]} == held  # the held-out images' captions
    assert r["extractor"]["name"].startswith("clip-image") and r["classifier"] is None
    assert "CLIP score" in r["adherence"]["skipped"]
    cs = r["clip_score"]
    assert cs["caption"]["n"] == 6 and cs["caption"]["reference"]["n"] == HOLDOUT
    assert "real images" in stdout
    err = _refused(capsys, "eval", "--model", str(model), "--data", str(root), *FAST, "--out", str(tmp_path / "x"))
    assert "no feature space for --data" in err and "--clip FILE" in err


@pytest.mark.parametrize("case, message", [
    ("other classes", "draws the classes blue, green, red, --data"),
    ("no classes", "is class-conditional on blue, green, red, but --data"),
    ("classifier size", "reads 16x16 RGB images, the model draws 32x32 RGB"),
    ("classifier channels", "reads 32x32 grayscale images, the model draws 32x32 RGB"),
    ("classifier of another folder", "was trained on the folder"),
    ("classifier of other classes", "knows the classes cat, dog"),
    ("shapes classifier", "is the shapes classifier, not one of a folder's classes"),
    ("dataset flag", "was trained on the folder"),
    ("missing folder", "which is not on this machine: evaluate it with --data FOLDER"),
    ("too small for the floor", "the floor needs as many real images of the train split"),
])
def test_eval_refuses_data_that_does_not_fit(world, tmp_path, capsys, case, message):
    from daguerre.metrics.extractors import default_classifier_path

    base, folder, model, classifier = tmp_path, world["folder"], world["class_model"], world["classifier"]
    data, extra = [str(folder)], []
    if case == "other classes":
        data = [str(make_folder(base / "pets", {"cat": (1, 2, 3), "dog": (4, 5, 6), "fox": (7, 8, 9)}))]
        extra = ["--holdout", "all"]
    elif case == "no classes":
        flat = base / "flat"
        flat.mkdir()
        for i in range(12):
            Image.new("RGB", (32, 32)).save(flat / f"{i}.png")
        data, extra = [str(flat)], ["--holdout", "all"]
    elif case == "classifier size":
        classifier = _train_classifier(capsys, folder, base / "c16.safetensors", "--size", "16")
    elif case == "classifier channels":
        classifier = _train_classifier(capsys, folder, base / "gray.safetensors", "--channels", "1")
    elif case == "classifier of another folder":
        classifier = _train_classifier(capsys, make_folder(base / "twin", seed=7), base / "twin.safetensors")
    elif case == "classifier of other classes":
        classifier = _train_classifier(capsys, make_folder(base / "pets", {"cat": (1, 2, 3), "dog": (4, 5, 6)}),
                                       base / "pets.safetensors")
    elif case == "shapes classifier":
        classifier = default_classifier_path("shapes")
    elif case == "dataset flag":
        data, extra = [], ["--dataset", "fashion_mnist"]
    elif case == "missing folder":
        model, data = _model(base / "m.safetensors", base / "gone"), []
    elif case == "too small for the floor":
        extra = ["--n", "30"]
    argv = ["eval", "--model", str(model), *(["--data", *data] if data else []), "--classifier", str(classifier),
            *FAST, *extra, "--out", str(base / "ev")]
    assert message in _refused(capsys, *argv)
    assert not (base / "ev" / "report.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--holdout", "all"], "--holdout and --data-seed choose the held-out images of --data FOLDER"),
    (["--data", "FOLDER", "--dataset", "shapes"], "leave out --dataset"),
    (["--data", "FOLDER", "--prompts", "single"], "leave out --prompts"),
    (["--data", "FOLDER", "--holdout", "some"], "--holdout 'some': give a number"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["--data", "FOLDER", "--extractor", "clip"], "--extractor clip measures in the image tower of the --clip"),
    (["--data", "FOLDER", "--extractor", "inception:/no/such.pth"], "no Inception-v3 weights file"),
])
def test_eval_data_flag_errors(world, tmp_path, capsys, argv, message):
    argv = [str(world["folder"]) if a == "FOLDER" else a for a in argv]
    err = _refused(capsys, "eval", "--model", str(world["class_model"]), *argv, *FAST, "--out", str(tmp_path / "ev"))
    assert message in err


def test_a_classifier_that_saw_the_held_out_images_is_a_warning(world, tmp_path, capsys):
    clf = _train_classifier(capsys, world["folder"], tmp_path / "c.safetensors", "--data-seed", "1")
    code, _, err = _run(capsys, "eval", "--model", str(world["class_model"]), "--classifier", str(clf), *FAST,
                        "--out", str(tmp_path / "ev"))
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert "held-out images measured here" in err and report["warnings"]


def test_eval_of_a_model_trained_on_the_folder(tmp_path, capsys, vae_file):
    """End to end with a real (3-step) training run: eval reads the folder, its size and held-out split from the
    model file as training wrote them, and the held-out images it measures are those training held out."""
    from daguerre.training.config import load_run_config
    from daguerre.training.ldm import train_ldm

    configs = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
    root = make_folder(tmp_path / "colours")
    sets = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0",
            "data.kind='folder'", f"data.root='{root}'", "data.holdout=5", "data.seed=3", "train.steps=3",
            "train.batch_size=4", "model.conditioning='class'"]
    cfg = load_run_config(configs / "tiny_ldm.toml", "ldm", sets)
    model = train_ldm(cfg, tmp_path / "run", vae_path=vae_file)
    clf = tmp_path / "c.safetensors"
    _train_classifier(capsys, root, clf, "--holdout", "5", "--data-seed", "3")
    out = tmp_path / "ev"
    code, _, err = _run(capsys, "eval", "--model", str(model), "--classifier", str(clf), *FAST, "--out", str(out))
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert (r["data"]["holdout"], r["data"]["seed"], r["data"]["split"]) == (5, 3, "random")
    assert r["data"]["trained_on"]["root"] == str(root.resolve()) and not r["warnings"]
    assert r["distribution"]["n_real"] == 5 and r["adherence"]["class"]["n"] == 6
    from daguerre.checkpoints import load_model
    from daguerre.training.data import load_train_data

    plan = folder_spec(load_model(model).config, str(root), None, None, "m")
    assert Folder(plan.spec).held.tolist() == load_train_data(cfg.data).holdout.tolist()  # training's own split


def test_a_dataset_folder_of_train_and_test(world, tmp_path, capsys):
    """ROOT/train/<class> and ROOT/test/<class> (CIFAR-10's layout): the classifier trains on train/ and tests on
    test/; eval measures against test/ (all of it never trained on) with the floor drawn from train/."""
    from daguerre.metrics.folder_data import split_layout

    root = tmp_path / "dataset"
    make_folder(root / "train")
    make_folder(root / "test", seed=5, per_class=4)
    assert split_layout(root) == (root / "train", root / "test") and split_layout(root / "train") is None
    clf = tmp_path / "c.safetensors"
    code, _, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(root), "--out", str(clf),
                        "--width", "4", "--steps", "2", "--no-progress")
    assert code == 0, err
    data = read_metadata(clf).training["data"]
    assert (data["train_images"], data["test"]["which"], data["test"]["images"]) == (3 * PER_CLASS, "all", 12)
    model = _model(tmp_path / "m.safetensors", root / "train", classes=sorted(COLOURS))
    out = tmp_path / "ev"
    code, _, err = _run(capsys, "eval", "--model", str(model), "--data", str(root), "--classifier", str(clf), *FAST,
                        "--out", str(out))
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["root"] == str((root / "test").resolve()) and r["data"]["holdout"] == "all"
    assert r["data"]["floor_folder"]["root"] == str((root / "train").resolve())
    assert (r["distribution"]["n_real"], r["distribution"]["n_floor"]) == (12, 6) and not r["warnings"]
    text = _model(tmp_path / "t.safetensors", root / "train")  # a text model: prompted with the class captions
    code, _, err = _run(capsys, "eval", "--model", str(text), "--data", str(root), "--classifier", str(clf), *FAST,
                        "--out", str(tmp_path / "ev-text"))
    assert code == 0, err
    r = json.loads((tmp_path / "ev-text" / "report.json").read_text())
    assert r["samples"][-1]["prompt"] == "a photo of a red" and r["adherence"]["class"]["n"] == 6
    err = _refused(capsys, "eval", "--model", str(model), "--data", str(root), "--holdout", "5", "--classifier",
                   str(clf), *FAST, "--out", str(tmp_path / "ev2"))
    assert "its test folder is the held-out set; leave out --holdout" in err


def test_a_test_folder_needs_no_caption_file_of_its_own(world, tmp_path, capsys):
    """A text model trained on metadata.jsonl captions, measured on a test folder of class sub-folders without
    one: the test folder's own captions (none needed: the prompts are the class captions)."""
    train = make_folder(tmp_path / "train")
    rows = [{"file_name": p.relative_to(train).as_posix(), "text": f"a photo of a {p.parent.name}"}
            for p in sorted(train.rglob("*.png"))]
    (train / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    model = _model(tmp_path / "m.safetensors", train, captions="metadata")
    test = make_folder(tmp_path / "test", seed=3, per_class=5)
    code, _, err = _run(capsys, "eval", "--model", str(model), "--data", str(test), "--holdout", "all",
                        "--classifier", str(_train_classifier(capsys, train, tmp_path / "c.safetensors")), *FAST,
                        "--out", str(tmp_path / "ev"))
    assert code == 0, err
    r = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert r["samples"][0]["prompt"] == "a photo of a blue" and r["adherence"]["class"]["n"] == 6


def test_inception_score_of_a_few_images_is_not_split_into_single_images():
    """Splits of one image always score IS 1: 12 sure images of 3 classes score 3, not 1."""
    from daguerre.metrics.evaluate import distribution_scores

    class Sure:
        name, sha256 = "sure", "0" * 64

        def features(self, images):
            return images.flatten(1)[:, :4].float()

        def probabilities(self, images):
            return torch.nn.functional.one_hot(images[:, 0, 0, 0].round().long(), 3).float()

    x = torch.arange(3).repeat(4).float()[:, None, None, None].expand(12, 1, 2, 2)
    x = x + torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.01
    scores = distribution_scores(Sure(), x, x, x)
    assert scores["is"]["splits"] == 1 and scores["is"]["mean"] == pytest.approx(3.0, rel=1e-3)
