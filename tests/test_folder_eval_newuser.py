"""What a new user following docs/training.md meets in `daguerre eval --data FOLDER` (issue 17, tried on a CIFAR-10
subset as a folder): the folder classifier's held-out split must be the model's, and every command eval suggests
for training one says so, with the model's `--holdout` and `--data-seed` (the photos recipes hold out 500 images,
the classifier's default is 64: a judge trained with the default has seen most of the images eval measures)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from daguerre.cli import main
from test_eval_folder import COLOURS, FAST, HOLDOUT, _model, make_folder

TINY = ["--width", "4", "--steps", "40", "--batch-size", "16", "--no-progress"]


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _suggested(err: str) -> list[str]:
    """The `daguerre classifier train ...` command quoted in an eval message, as argv (without `daguerre`)."""
    found = re.search(r"`daguerre (classifier train [^`]*)`", err)
    assert found, err
    return shlex.split(found.group(1))


@pytest.fixture()
def setup(tmp_path):
    folder = make_folder(tmp_path / "photos", per_class=10)
    model = _model(tmp_path / "model.safetensors", folder, classes=sorted(COLOURS), seed=3)
    return tmp_path, folder, model


def test_the_warning_names_the_command_with_the_models_split_and_that_command_silences_it(setup, capsys):
    base, folder, model = setup
    code, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(folder),
                     "--out", str(base / "default.safetensors"), *TINY)  # as training.md's step 3 had it
    assert code == 0, err
    code, err = _run(capsys, "eval", "--model", str(model), "--classifier", str(base / "default.safetensors"), *FAST,
                     "--out", str(base / "ev1"))
    assert code == 0, err
    assert "held-out images measured here" in err
    argv = _suggested(err)
    assert f"--holdout {HOLDOUT} --data-seed 3" in " ".join(argv)
    argv[argv.index("FILE")] = str(base / "judge.safetensors")
    code, err = _run(capsys, *argv, *TINY)
    assert code == 0, err
    code, err = _run(capsys, "eval", "--model", str(model), "--classifier", str(base / "judge.safetensors"), *FAST,
                     "--out", str(base / "ev2"))
    assert code == 0, err
    assert "held-out images measured here" not in err
    assert json.loads((base / "ev2" / "report.json").read_text())["warnings"] == []


def test_a_refused_classifier_names_a_command_with_the_models_split(setup, capsys):
    base, folder, model = setup
    code, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(folder), "--size", "16",
                     "--out", str(base / "c16.safetensors"), *TINY)
    assert code == 0, err
    code, err = _run(capsys, "eval", "--model", str(model), "--classifier", str(base / "c16.safetensors"), *FAST,
                     "--out", str(base / "ev"))
    assert code == 2 and "reads 16x16 RGB images" in err
    assert " ".join(_suggested(err)).endswith(f"--holdout {HOLDOUT} --data-seed 3 --size 32 --channels 3 --out FILE")


def test_a_test_folder_hint_has_no_split(tmp_path, capsys):
    """With a separate test folder every image is held out: the hint has no --holdout to copy."""
    folder = make_folder(tmp_path / "photos", per_class=10)
    test = make_folder(tmp_path / "test", per_class=10, seed=5)
    model = _model(tmp_path / "model.safetensors", folder, classes=sorted(COLOURS))
    code, err = _run(capsys, "classifier", "train", "--dataset", "folder", "--data", str(folder), "--size", "16",
                     "--out", str(tmp_path / "c16.safetensors"), *TINY)
    assert code == 0, err
    code, err = _run(capsys, "eval", "--model", str(model), "--data", str(test), "--holdout", "all", "--classifier",
                     str(tmp_path / "c16.safetensors"), *FAST, "--out", str(tmp_path / "ev"))
    assert code == 2 and "--holdout" not in " ".join(_suggested(err))
