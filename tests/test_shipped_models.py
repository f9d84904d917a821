"""The models that ship inside the package: present, documented, small, and doing what their cards say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import daguerre
from daguerre.registry import open_model, shipped_models
from daguerre.weights.io import file_hash

BUDGET_BYTES = 80 * 1000**2  # issues 16 and 18: every shipped weight file together under 80 MB


def test_shipped_models_have_cards_with_their_hash_and_fit_the_budget():
    models = shipped_models()
    assert "fashion" in models
    assets = Path(daguerre.__file__).parent / "assets"
    weights = sorted(assets.rglob("*.safetensors"))
    assert set(models.values()) <= set(weights)
    assert sum(p.stat().st_size for p in weights) < BUDGET_BYTES, [p.name for p in weights]
    for name, path in models.items():
        card = path.with_suffix(".md")
        assert card.is_file(), f"{name} has no model card {card.name}"
        text = card.read_text(encoding="utf-8")
        assert re.search(r"\| sha256 \| `([0-9a-f]{64})`", text).group(1) == file_hash(path), name
        assert "Training time" in text and "Measured scores" in text and "make model-" in text


def test_shipped_fashion_model_draws_the_class_it_is_asked_for():
    """Every class prompt, once, at the model's recommended settings, judged by the shipped classifier."""
    from daguerre.data.fashion_mnist import CAPTION_NOUNS
    from daguerre.metrics.extractors import load_classifier_extractor
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img

    comps, model_hash = open_model("fashion")
    assert comps.config.defaults["cfg_scale"] == 3.0 and comps.config.text_encoder.token_ids is not None
    prompts = [f"a photo of {noun}" for noun in CAPTION_NOUNS]
    images = []
    for i, prompt in enumerate(prompts):
        out = txt2img(comps, GenerationRequest(prompt=prompt, seed=i).validate(comps.config), model_hash=model_hash)
        assert out[0].image.size == (32, 32) and f"Model hash: {model_hash}" in out[0].parameters
        images.append(torch.from_numpy(np.asarray(out[0].image, dtype=np.float32)) / 127.5 - 1)
    judge = load_classifier_extractor("default", "fashion_mnist")
    predicted = judge.probabilities(torch.stack(images)[:, None]).argmax(1)
    assert (predicted == torch.arange(10)).sum() >= 9, predicted.tolist()


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_info_describes_a_shipped_model_by_name(name, capsys):
    from daguerre.cli import main

    assert main(["info", name, "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "recommends:" in out and "trained:" in out


@pytest.mark.parametrize(("kind", "verdict", "least"), [("single", "shape_colour", 10), ("relation", "relation", 7)])
def test_shipped_shapes_model_draws_what_the_evaluation_prompts_ask_for(kind, verdict, least):
    """The default model on 12 evaluation prompts of each kind, at its recommended settings, judged as
    `daguerre eval` judges (the shipped attribute classifier). Its card reports 97% of single-object
    and 80% of relation prompts right over 100; 10 / 7 of 12 is well below that, and far above what the
    models before could do (82% single; relations 22%, the relation word ignored)."""
    from daguerre.data.shapes import sample_prompts
    from daguerre.metrics.evaluate import PROMPT_KEY, EvalItem, judge_shapes
    from daguerre.metrics.extractors import load_classifier_extractor
    from daguerre.pipelines.request import GenerationRequest
    from daguerre.pipelines.txt2img import txt2img
    from daguerre.registry import default_model_name

    assert default_model_name() == "shapes"
    comps, _ = open_model("shapes")
    prompts = sample_prompts(kind, 12, PROMPT_KEY)
    images = []
    for i, p in enumerate(prompts):
        image = txt2img(comps, GenerationRequest(prompt=p.text, seed=i).validate(comps.config))[0].image
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    scenes = load_classifier_extractor("default", "shapes").predict_scenes(torch.stack(images))
    verdicts = judge_shapes(scenes, [EvalItem(kind, p.text, i, spec=p.spec) for i, p in enumerate(prompts)])
    right = sum(v[verdict] for v in verdicts)
    assert right >= least, (right, [p.text for p, v in zip(prompts, verdicts, strict=True) if not v[verdict]])
