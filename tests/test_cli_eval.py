"""`daguerre eval` end to end on tiny random models (report.json, grid.png, table, one-line errors), the dataset
taken from a checkpoint's provenance, and `daguerre classifier train|test`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.metrics.evaluate import dataset_of
from daguerre.metrics.extractors import default_classifier_path

FAST = ["--steps", "2", "--real", "24", "--no-progress", "--batch", "4"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_shapes_end_to_end(tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, "eval", "--model", "random:tiny", "--dataset", "shapes", "--n", "3", "--seed", "7",
                             "--cfg", "3", *FAST, "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "shapes" and report["model"]["spec"] == "random:tiny"
    # the precision that ran (random:tiny is fp32 under auto), not the flag's "auto"; no int8, not compiled
    m = report["model"]
    assert (m["dtype"], m["quantize"], m["compile"]) == ("fp32", "none", False)
    s = report["settings"]
    assert (s["n"], s["seed"], s["steps"], s["cfg_scale"], s["kinds"]) == (3, 7, 2, 3.0, ["single", "relation"])
    assert s["sampler"] == "DPM++ 2M"  # daguerre generate's default
    assert report["extractor"]["sha256"] == report["classifier"]["sha256"] and len(report["extractor"]["sha256"]) == 64
    assert set(report["adherence"]) == {"single", "relation"}
    assert set(report["adherence"]["relation"]) >= {"n", "shape_colour", "relation", "reversed", "all"}
    assert "relation" not in report["adherence"]["single"]
    d = report["distribution"]
    assert (d["n_generated"], d["n_real"], d["n_floor"]) == (6, 24, 6)
    assert d["fd"] >= 0 and d["fd_floor"] >= 0 and "is" not in d  # no Inception Score for the shapes world
    assert d["fd"] > d["fd_floor"]  # noise images are far from rendered scenes; real vs real is close
    assert [x["seed"] for x in report["samples"]] == list(range(7, 13))
    assert [x["kind"] for x in report["samples"]] == ["single"] * 3 + ["relation"] * 3
    assert report["timing"]["seconds_per_image"] > 0
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 3 * 64
    assert "Frechet distance" in stdout and "shape_colour" in stdout and "KID" in stdout
    rel = report["adherence"]["relation"]
    both, right, turned = (round(rel[k] * 3) for k in ("shape_colour", "relation", "reversed"))
    assert (f"of the {both} relation images with both objects right: {right} the right way round, {turned} reversed, "
            f"{both - right - turned} on one line") in stdout


def test_eval_fashion_reports_inception_score(tmp_path, capsys, fashion_mnist):
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, "eval", "--model", "random:tiny", "--dataset", "fashion_mnist", "--n", "10",
                             *FAST, "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["adherence"]) == {"class"}
    assert report["adherence"]["class"]["n"] == 10 and len(report["adherence"]["class"]["per_class"]) == 10
    assert [x["prompt"] for x in report["samples"]][:2] == ["a photo of a t-shirt", "a photo of a pair of trousers"]
    d = report["distribution"]
    assert 1 <= d["is"]["mean"] <= 10 and 1 <= d["is_real"]["mean"] <= 10
    assert "Inception Score" in stdout


def test_eval_takes_the_dataset_from_the_checkpoint(tmp_path, capsys):
    from daguerre.checkpoints import save_model
    from daguerre.components import build_components
    from daguerre.config import preset

    comps = build_components(preset("tiny"), seed=0)
    comps.config.provenance = {"stage": "ldm", "data": {"kind": "shapes", "n": 10, "seed": 0}}
    path = tmp_path / "m.safetensors"
    save_model(comps, path)
    code, _, err = _run(capsys, "eval", "--model", str(path), "--prompts", "single", "--n", "2", *FAST,
                        "--out", str(tmp_path / "ev"))
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["dataset"] == "shapes" and report["settings"]["kinds"] == ["single"]
    assert report["model"]["file"] == str(path) and len(report["model"]["sha256"]) == 64


def test_dataset_of_reads_provenance_and_run_config():
    class Cfg:
        provenance = {"run_config": {"data": {"kind": "fashion_mnist"}}}

    assert dataset_of(Cfg()) == "fashion_mnist"
    Cfg.provenance = {"data": {"kind": "folder"}}
    assert dataset_of(Cfg()) is None


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:tiny"], "does not say which dataset it was trained on; pass --dataset"),
    (["--model", "random:tiny", "--dataset", "shapes", "--prompts", "single,pairs"], "unknown prompt kind(s) pairs"),
    (["--model", "random:tiny", "--dataset", "shapes", "--n", "0"], "--n 0 is too small"),
    (["--model", "random:tiny", "--dataset", "shapes", "--real", "1"], "--real 1 is too small"),
    (["--model", "random:tiny", "--dataset", "fashion_mnist", "--prompts", "single"], "one per class"),
    (["--model", "random:tiny", "--dataset", "shapes", "--sampler", "Bogus"], "Bogus"),
    (["--model", "random:tiny", "--dataset", "shapes", "--extractor", "inception:/no/such.pth"],
     "no Inception-v3 weights file"),
    (["--model", "random:tiny", "--dataset", "shapes", "--classifier", "/no/such.safetensors"], "no classifier file"),
    (["--model", "/no/such/model.safetensors", "--dataset", "shapes"], "no model"),
])
def test_eval_user_errors_are_one_line(tmp_path, capsys, argv, message):
    n = [] if "--n" in argv else ["--n", "2"]
    code, _, err = _run(capsys, "eval", *argv, *n, "--steps", "1", "--no-progress", "--out", str(tmp_path / "ev"))
    assert code == 2
    assert err.startswith("daguerre eval: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ev" / "report.json").exists()


def test_eval_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _run(capsys, "eval", "--model", "random:tiny", "--dataset", "shapes", "--out", str(f))
    assert code == 2 and "name a folder" in err


def test_classifier_train_and_test_commands(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code, stdout, err = _run(capsys, "classifier", "train", "--dataset", "shapes", "--out", str(out), "--steps", "2",
                             "--batch-size", "4", "--test-n", "16", "--no-progress")
    assert code == 0, err
    assert stdout.strip() == str(out) and "wrote" in err
    code, stdout, err = _run(capsys, "classifier", "test", str(default_classifier_path("shapes")), "--n", "32")
    assert code == 0, err
    lines = {ln.split()[0]: float(ln.split()[1].rstrip("%")) for ln in stdout.splitlines() if ln.startswith("  ")}
    assert set(lines) == {"cell", "shape", "colour", "size", "background", "scene"}
    assert lines["cell"] >= 95
    code, _, err = _run(capsys, "classifier", "test", str(tmp_path / "none.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "no classifier file" in err


def test_classifier_train_rejects_bad_settings(tmp_path, capsys):
    code, _, err = _run(capsys, "classifier", "train", "--dataset", "shapes", "--out", str(tmp_path / "c.safetensors"),
                        "--steps", "-3")
    assert code == 2 and "steps >= 1" in err and err.count("\n") == 1
    assert not (tmp_path / "c.safetensors").exists()


def test_inception_score_of_images_grouped_by_class_is_not_split_by_class():
    """Generated images come grouped by prompt; IS splits must each mix all classes (10 sure classes -> 10)."""
    from daguerre.metrics.evaluate import distribution_scores

    class Sure:  # features: the pixels; probabilities: one-hot by the image's constant value (its class)
        name, sha256 = "sure", "0" * 64

        def features(self, images):
            return images.flatten(1)[:, :4].float()

        def probabilities(self, images):
            return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 10).float()

    grouped = torch.arange(10).repeat_interleave(100).float()[:, None, None, None].expand(1000, 1, 2, 2)
    noise = torch.randn(1000, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.01
    scores = distribution_scores(Sure(), grouped + noise, grouped + noise, grouped + noise)
    assert scores["is"]["mean"] > 9.0 and scores["is_real"]["mean"] > 9.0


def test_missing_fashion_mnist_fails_before_any_image_is_made(tmp_path, capsys, monkeypatch):
    """The real images are read first: without Fashion-MNIST, eval says what to install before generating."""
    import daguerre.data.fashion_mnist as fm
    import daguerre.metrics.evaluate as ev

    monkeypatch.setattr(fm, "DEFAULT_ROOT", str(tmp_path / "nowhere"))
    made = []
    monkeypatch.setattr(ev, "generate", lambda *a, **k: made.append(1) or [])
    code, _, err = _run(capsys, "eval", "--model", "random:tiny", "--dataset", "fashion_mnist", "--n", "10", *FAST,
                        "--out", str(tmp_path / "ev"))
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err and not made
