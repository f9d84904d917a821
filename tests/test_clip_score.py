"""CLIP score (metrics/clip_score.py): the definition on known cosines, the score of real images against
transformers' CLIP on the same weights, and `daguerre eval --clip` (the report, the table, the shipped
CLIP by default, the note when it is not installed, the refusal for a model without prompts)."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from daguerre.checkpoints.clip_file import load_clip, save_clip
from daguerre.cli import main
from daguerre.metrics.clip_score import clip_scores, pair_scores, summarize_scores
from daguerre.models.clip import CLIPModel, init_clip_

transformers = pytest.importorskip("transformers")
from test_clip_file import tiny_config  # noqa: E402
from test_clip_model import hf_config  # noqa: E402

FAST = ["--steps", "2", "--real", "8", "--no-progress", "--batch", "4", "--n", "2"]


def test_pair_scores_are_100_times_the_clamped_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    text = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [0.0, 0.5], [4.0, 3.0]])
    want = torch.tensor([0.0, 100 / math.sqrt(2), 100.0, 100 * 24 / 25])  # a negative cosine counts as 0
    assert torch.allclose(pair_scores(image, text), want, atol=1e-4)
    with pytest.raises(ValueError, match="one shape"):
        pair_scores(image, text[:2])
    s = summarize_scores(torch.tensor([10.0, 20.0, 30.0]))
    assert (s["mean"], s["std"], s["n"]) == (20.0, 10.0, 3) and s["stderr"] == pytest.approx(10 / math.sqrt(3))


def test_clip_scores_match_transformers_clip(tmp_path):
    """Images in [-1, 1] at the model's size (preprocess only normalises) against their texts, by daguerre
    loading a transformers folder, equal to 100 max(cos, 0) of transformers' own features."""
    cfg = tiny_config()
    torch.manual_seed(0)
    hf = transformers.CLIPModel(hf_config(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_clip(tmp_path / "hf")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    texts = ["a red circle", "a blue square above a green triangle", "a photo of a shirt"]
    ours = clip_scores(model, images, texts, batch=2)
    from daguerre.models.tokenizer import CLIPTokenizer

    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=((images + 1) / 2 - mean) / std)
        txt = hf.get_text_features(input_ids=CLIPTokenizer()(texts))
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    want = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert torch.allclose(ours, want, atol=1e-4), (ours, want)
    with pytest.raises(ValueError, match="one text per image"):
        clip_scores(model, images, texts[:2])


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    save_clip(init_clip_(CLIPModel(tiny_config()), torch.Generator().manual_seed(0)), path)
    return path


def test_eval_reports_the_clip_score(tmp_path, capsys, clip_file):
    out = tmp_path / "ev"
    code = main(["eval", "--model", "random:tiny", "--dataset", "shapes", *FAST, "--clip", str(clip_file),
                 "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    cs = json.loads((out / "report.json").read_text())["clip_score"]
    assert cs["clip"]["file"] == str(clip_file) and len(cs["clip"]["sha256"]) == 64
    assert [cs[k]["n"] for k in ("all", "single", "relation")] == [4, 2, 2]
    assert len(cs["per_image"]) == 4 and all(0 <= s <= 100 for s in cs["per_image"])
    assert cs["all"]["mean"] == pytest.approx(sum(cs["per_image"]) / 4, abs=1e-3)
    assert cs["single"]["reference"]["n"] == 2  # the rendered scenes of the same prompts
    assert "CLIP score (100 x max(cos, 0)) by" in stdout and "rendered scenes" in stdout


def test_eval_uses_the_models_shipped_clip_or_notes_its_absence(tmp_path, capsys, clip_file, monkeypatch):
    import daguerre.registry as registry

    monkeypatch.setitem(registry.CLIP_FOR_MODEL, "random:tiny", "tiny-clip")
    monkeypatch.setattr(registry, "shipped_clips", lambda: {})
    code = main(["eval", "--model", "random:tiny", "--dataset", "shapes", *FAST, "--out", str(tmp_path / "a")])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "is not installed" in report["clip_score"]["skipped"] and "no CLIP score" in err
    assert "CLIP score: skipped" in stdout
    monkeypatch.setattr(registry, "shipped_clips", lambda: {"tiny-clip": clip_file})
    assert main(["eval", "--model", "random:tiny", "--dataset", "shapes", *FAST, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["clip_score"]["clip"]["spec"] == "tiny-clip" and report["clip_score"]["all"]["n"] == 4


def test_eval_clip_needs_a_text_model_and_an_existing_clip(tmp_path, capsys, clip_file):
    from daguerre.commands.eval import _clip_judge
    from daguerre.config import preset

    config = preset("tiny")
    config.conditioning, config.class_names = "class", ["a", "b"]
    class_model = types.SimpleNamespace(config=config)
    with pytest.raises(ValueError, match="class-conditioned: it has no prompts"):
        _clip_judge(str(clip_file), "my-model", class_model, "cpu")
    assert _clip_judge(None, "shapes", class_model, "cpu") is None  # no --clip: nothing to score
    code = main(["eval", "--model", "random:tiny", "--dataset", "shapes", *FAST, "--clip", "no-such-clip",
                 "--out", str(tmp_path / "c")])
    assert code != 0 and "nor a shipped CLIP" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any model work
