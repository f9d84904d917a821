"""Zero-shot evaluation of a CLIP model (metrics/zero_shot.py): the prompt set is the shapes world's grammar,
the held-out scenes are not a training stream, an oracle that sees only colours scores colour 1 and shape at
chance, and an exported CLIP file's evaluation runs from the Python API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daguerre.cli import main
from daguerre.data.shapes import COLOURS, SHAPES, ShapesDataset, parse_caption
from daguerre.metrics import zero_shot as zs
from daguerre.training.clip import build_clip, write_clip
from daguerre.training.config import derive_clip_config, load_run_config


def test_prompts_are_every_colour_and_shape_in_the_worlds_grammar():
    prompts = zs.shape_colour_prompts()
    assert len(prompts) == len(SHAPES) * len(COLOURS) == len({p for _, _, p in prompts})
    for shape, colour, text in prompts:
        spec = parse_caption(text)  # the grammar's inverse reads back what the prompt asks for
        assert len(spec.objects) == 1 and (spec.objects[0].shape, spec.objects[0].colour) == (shape, colour)
    assert ("circle", "orange", "an orange circle") in prompts and ("star", "red", "a red star") in prompts


def test_held_out_scenes_are_not_the_training_stream():
    train = ShapesDataset(50, seed=0, min_objects=1, max_objects=1)
    held = ShapesDataset(50, seed=zs.HELDOUT_SEED, min_objects=1, max_objects=1)
    assert all(train.sample(i)[0] != held.sample(i)[0] for i in range(50))


class ColourOracle(torch.nn.Module):
    """A stand-in CLIP that knows colours only: an image embeds as the one-hot of its object's colour (the
    median of the pixels that differ from the corner's background), a prompt as the one-hot of its colour word."""

    image_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.visual_projection = torch.nn.Linear(1, 1)
        self.tokenizer = zs.clip_tokenizer(load_run_config(None, "clip").model)
        self.names = list(COLOURS)
        self.rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for img in images:
            pixels = img.flatten(1).T  # (H W, 3)
            fg = pixels[(pixels - img[:, 0, 0]).abs().amax(1) > 0.2]
            colour = fg.median(0).values
            out.append(F.one_hot(torch.cdist(colour[None], self.rgb).argmin(), len(self.names)).float())
        return torch.stack(out)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        words = [self.tokenizer.decode(row).split() for row in ids]
        return torch.stack([F.one_hot(torch.tensor(self.names.index(w[1])), len(self.names)).float()
                            for w in words])


def test_an_oracle_of_colours_scores_colour_one_and_shape_at_chance():
    tokenizer = zs.clip_tokenizer(load_run_config(None, "clip").model)
    result = zs.shapes_zero_shot(ColourOracle(), tokenizer, n=120)
    assert result["colour_accuracy"] == 1.0 and result["images"] == 120 and result["prompts"] == 96
    # every colour's prompts tie, argmax takes the first shape ("circle"): shape right only for circles
    circles = np.mean([ShapesDataset(120, seed=zs.HELDOUT_SEED, min_objects=1, max_objects=1).sample(i)[0]
                       .objects[0].shape == "circle" for i in range(120)])
    assert result["shape_accuracy"] == pytest.approx(circles) and result["both_accuracy"] == pytest.approx(circles)
    assert result["shape_accuracy"] < 0.3


def test_retrieval_counts_equal_captions_as_one_answer():
    oracle = ColourOracle()
    scenes = ShapesDataset(8, seed=zs.HELDOUT_SEED, min_objects=1, max_objects=1)
    items = [scenes[i] for i in range(8)]
    captions = [f"a {it['scene'].objects[0].colour} circle" for it in items]  # the oracle reads the colour word
    images = torch.stack([it["image"] for it in items])
    assert zs.retrieval_accuracy(oracle, oracle.tokenizer, images, captions)["retrieval_accuracy"] == 1.0
    with pytest.raises(ValueError, match="at least 1 image"):
        zs.shapes_zero_shot(oracle, oracle.tokenizer, n=0)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    cfg = load_run_config(None, "clip", ["data.size=32"])
    model = build_clip(cfg.model, 0).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    tokens = sorted(set(zs.clip_tokenizer(cfg.model)(["a red circle"]).flatten().tolist()))
    write_clip(model, cfg, {"steps": 0}, tokens, {"kind": "shapes"}, {}, path)
    return path


def test_an_exported_file_loads_and_its_zero_shot_evaluation_runs(clip_file, tmp_path, capsys):
    from daguerre.checkpoints.clip_file import load_clip

    model = load_clip(clip_file)
    result = zs.zero_shot(model, "shapes", 20)
    assert {"shape_accuracy", "colour_accuracy", "both_accuracy"} <= set(result)
    assert all(0.0 <= result[k] <= 1.0 for k in ("shape_accuracy", "colour_accuracy", "both_accuracy"))
    out = tmp_path / "zs.json"
    assert main(["train", "zero-shot", str(clip_file), "--n", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shape_accuracy" in printed and json.loads(out.read_text())["shapes"] == result
    with pytest.raises(ValueError, match="choose one of shapes, fashion_mnist"):
        zs.zero_shot(model, "folder", 5)
    assert main(["train", "zero-shot", str(clip_file), "--n", "0"]) == 2
    assert "--n 0: give at least 1 image" in capsys.readouterr().err


def test_fashion_zero_shot_scores_classes(fashion_mnist):
    cfg = load_run_config(None, "clip", ["data.kind=fashion_mnist", "data.size=32", "model.vision.channels=1",
                                         "model.image_mean=[0.5]", "model.image_std=[0.5]"])
    model = build_clip(derive_clip_config(cfg, 1), 0).eval()
    result = zs.fashion_zero_shot(model, zs.clip_tokenizer(model.clip_config), n=30, root=fashion_mnist)
    assert 0.0 <= result["class_accuracy"] <= 1.0 and result["images"] == 30 and result["prompts"] == 10


def test_the_shipped_shapes_clip_has_its_card_and_reads_shapes():
    """The shipped shapes CLIP: its card states its file's hash and recipe, and on held-out single objects it
    names shape and colour as the card says (>= 95% both right on the first 200 scenes of the stream)."""
    import re

    from daguerre.registry import clip_for_model, open_clip, shipped_clips
    from daguerre.weights.io import file_hash

    path = shipped_clips()[clip_for_model("shapes")]
    card = path.with_suffix(".md").read_text(encoding="utf-8")
    assert re.search(r"\| sha256 \| `([0-9a-f]{64})`", card).group(1) == file_hash(path)
    assert "make model-shapes-clip" in card and "Zero-shot accuracy" in card
    assert path.stat().st_size < 4 * 1000**2
    result = zs.zero_shot(open_clip("shapes-clip"), "shapes", 200)
    assert result["both_accuracy"] >= 0.95 and result["colour_accuracy"] >= 0.95
