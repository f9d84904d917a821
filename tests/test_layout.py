"""Layout-to-image (issue 18): layouts read from JSON and --box with one-line refusals, their tokens, the layout
encoder inside the U-Net, the training condition (each row's layout; dropped rows empty, text-dropped rows keep
it) equal to the request's, and a tiny layout model trained, then run from the command line and from its PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.components import build_components
from daguerre.conditioning import LayoutConditioner, conditioner_for
from daguerre.config import LayoutConfig, preset
from daguerre.data.layout import (
    LayoutObject,
    draw_layout,
    encode_layout,
    layout_text,
    null_layout,
    parse_box,
    parse_layout,
    quantise,
)
from daguerre.data.shapes import LAYOUT_WORDS, ShapesDataset
from daguerre.models.unet import UNetModel
from daguerre.pipelines.request import GenerationRequest
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.training.config import derive_model_config, load_run_config
from daguerre.training.data import load_train_data
from daguerre.training.layout import layout_rows
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
QUICK = ["train.progress=false", "data.n=8", "data.holdout=4", "train.batch_size=4", "train.steps=6",
         "train.sample_every=6", "train.checkpoint_every=0", "train.log_every=2"]
CFG = LayoutConfig(vocabulary=LAYOUT_WORDS, max_objects=3, phrase_words=4, grid=8, width=32, heads=2, layers=1,
                   mlp_dim=64)


def _layout_model():
    cfg = load_run_config(CONFIGS / "tiny_layout_ldm.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    return cfg, derive_model_config(cfg, 3, None)


# --- reading layouts --------------------------------------------------------------------------------------

def test_boxes_and_layout_files_read_and_refuse_with_one_line():
    assert parse_box("a red circle:0.1, 0.2,0.4,0.5") == LayoutObject("a red circle", (0.1, 0.2, 0.4, 0.5))
    assert parse_box("red: a circle:0,0,1,1").phrase == "red: a circle"  # the last colon ends the phrase
    objects = parse_layout([{"phrase": "a blue square", "box": [0, 0.5, 0.5, 1]}], "layout.json")
    assert objects == (LayoutObject("a blue square", (0.0, 0.5, 0.5, 1.0)),)
    assert parse_layout(json.loads(layout_text(objects))) == objects
    cases = [
        (lambda: parse_box("a red circle:0.1,0.1,1.2,0.4"), "outside the image; coordinates are fractions in [0, 1]"),
        (lambda: parse_box("a red circle:0.5,0.1,0.4,0.4"), "is empty: need x1 > x0 and y1 > y0"),
        (lambda: parse_box("a red circle:0.5,0.1,0.5,0.4"), "is empty"),
        (lambda: parse_box("a red circle 0.1,0.1,0.4,0.4"), "expected PHRASE:x0,y0,x1,y1"),
        (lambda: parse_box("a red circle:0.1,0.1,0.4"), "expected PHRASE:x0,y0,x1,y1"),
        (lambda: parse_box(":0.1,0.1,0.4,0.4"), "the phrase must be non-empty"),
        (lambda: parse_box("a red circle:nan,0.1,0.4,0.4"), "outside the image"),
        (lambda: parse_layout({"phrase": "x", "box": [0, 0, 1, 1]}, "l.json"), "l.json: a layout is a list"),
        (lambda: parse_layout([{"phrase": "x", "box": [0, 0, 1, 1], "colour": "red"}], "l.json"),
         "l.json: object 0 must have exactly the keys phrase and box"),
        (lambda: parse_layout([{"phrase": "x", "box": [0, 0, 1, True]}]), "four numbers"),
        (lambda: parse_layout([{"phrase": "x", "box": [0, 0, 1, 1]}] * 65), "65 objects, more than 64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_layout_tokens_are_words_and_quantised_corners():
    tokens = encode_layout([LayoutObject("a Big red circle", (0.0, 0.5, 0.49, 1.0))], CFG)
    assert tokens.shape == (3, 8)
    ids = {w: i + 1 for i, w in enumerate(LAYOUT_WORDS)}
    assert tokens[0].tolist() == [ids["a"], ids["big"], ids["red"], ids["circle"], 0, 4, 3, 7]
    assert torch.equal(tokens[1:], null_layout(CFG)[1:]) and int(null_layout(CFG)[0, 4]) == CFG.grid
    assert (quantise(0.0, 64), quantise(0.999, 64), quantise(1.0, 64)) == (0, 63, 63)
    too_many = [LayoutObject("red circle", (0, 0, 1, 1))] * 4
    for objects, message in ((too_many, "the layout has 4 objects; this model takes at most 3"),
                             ([LayoutObject("a very big red circle", (0, 0, 1, 1))], "has 5 words; this model reads "
                                                                                      "at most 4"),
                             ([LayoutObject("a purple elephant", (0, 0, 1, 1))], "'elephant' in 'a purple elephant' "
                                                                               "is not in this model's vocabulary")):
        with pytest.raises(ValueError, match=message):
            encode_layout(objects, CFG)


def test_the_shapes_layouts_are_the_scenes_boxes_with_phrases_of_the_vocabulary():
    data = ShapesDataset(20, max_objects=4, placement="free")
    for i in range(20):
        scene, _ = data.sample(i)
        assert data.scene(i) == scene  # drawn without its caption
        layout = data.layout(i)
        assert [b for _, b in layout] == [o.bbox for o in scene.objects]
        for (phrase, _), obj in zip(layout, scene.objects, strict=True):
            assert phrase.split()[-2:] == [obj.colour, obj.shape] and set(phrase.split()) <= set(LAYOUT_WORDS)
        assert data.sample(i)[1] == ShapesDataset(20, max_objects=4, placement="free").sample(i)[1]


def test_a_layout_picture_outlines_each_box_in_its_colour():
    image = np.asarray(draw_layout([LayoutObject("a red circle", (0.25, 0.25, 0.75, 0.75))], 16, 16))
    assert tuple(image[4, 8]) == (230, 25, 25) and tuple(image[8, 8]) == (0, 0, 0)


# --- the network -----------------------------------------------------------------------------------------

def test_the_unet_reads_the_layout_through_its_layout_net():
    cfg = preset("tiny").unet
    cfg.layout = CFG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetModel(cfg).eval()
        for p in unet.parameters():  # zero-initialised output layers would hide every difference
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    one = encode_layout([LayoutObject("red circle", (0, 0, 0.5, 0.5))], CFG)[None]
    other = encode_layout([LayoutObject("red circle", (0.5, 0.5, 1, 1))], CFG)[None]
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, ctx, layout=one), unet(x, t, ctx, layout=other))
        with pytest.raises(ValueError, match="pass layout tokens exactly when"):
            unet(x, t, ctx)
    with pytest.raises(ValueError, match="must be the context_dim"):
        UNetModel(preset("tiny").unet.__class__(**{**preset("tiny").unet.__dict__, "layout": LayoutConfig()}))


# --- the condition ---------------------------------------------------------------------------------------

def test_training_drops_both_or_the_prompt_alone_and_keeps_each_rows_layout(tmp_path):
    cfg, model = _layout_model()
    cfg.data.shapes.n, cfg.data.holdout = 6, 2
    data = load_train_data(cfg.data)
    captions = [f"caption {i}" for i in range(len(data.train_pool))]
    lat = type("Lat", (), {"captions": captions, "labels": None})()
    rows = layout_rows(lat, data, model.unet.layout)
    conditioner = conditioner_for(model)
    assert isinstance(conditioner, LayoutConditioner)
    seen = []

    def text(caps, device):
        seen.extend(caps)
        return {"context": torch.zeros(len(caps), 3, 32)}

    picked = torch.tensor([0, 1, 2])
    out = conditioner.batch(picked, torch.tensor([True, False, False]), rows, torch.device("cpu"), text,
                            torch.tensor([True, True, False]))
    assert seen == ["", "", "caption 2"]
    assert torch.equal(out["layout"][0], null_layout(model.unet.layout))
    raw = data.dataset.dataset
    for k in (1, 2):  # kept: the row's layout, as a request with that layout encodes it
        objects = [{"phrase": p, "box": list(b)} for p, b in raw.layout(int(data.train_pool[k]))]
        req = GenerationRequest(prompt="x", layout=objects, cfg_scale=1).validate(model)
        cond, _ = conditioner.pair(req, torch.device("cpu"), lambda prompts: torch.zeros(len(prompts), 3, 32))
        assert torch.equal(out["layout"][k], cond["layout"][0])


def test_requests_check_the_layout_against_the_model(tmp_path):
    _, model = _layout_model()
    (tmp_path / "l.json").write_text(json.dumps([{"phrase": "a red circle", "box": [0.1, 0.1, 0.4, 0.4]}]))
    valid = GenerationRequest(layout=str(tmp_path / "l.json"), boxes=["blue square:0.5,0.5,0.9,0.9"]).validate(model)
    assert [o.phrase for o in valid.layout] == ["a red circle", "blue square"] and valid.boxes is None
    assert GenerationRequest().validate(model).layout is None  # no layout: the empty one
    plain = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    with pytest.raises(ValueError, match="does not draw from a layout"):
        GenerationRequest(boxes=["a red circle:0,0,1,1"]).validate(plain)
    with pytest.raises(ValueError, match="takes at most 4"):
        GenerationRequest(boxes=["a red circle:0,0,1,1"] * 5).validate(model)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        GenerationRequest(layout=str(tmp_path / "bad.json")).validate(model)
    (tmp_path / "big.json").write_text(" " * 300_000)
    with pytest.raises(ValueError, match="larger than 256 KiB"):
        GenerationRequest(layout=str(tmp_path / "big.json")).validate(model)
    with pytest.raises(FileNotFoundError, match="no such layout file"):
        GenerationRequest(layout=str(tmp_path / "none.json")).validate(model)
    with pytest.raises(ValueError, match="boxes must be a list"):
        GenerationRequest(boxes="a red circle:0,0,1,1").validate(model)


def test_the_server_takes_a_layout_list_and_never_a_path():
    from daguerre.server.payload import ApiError, request_from_payload

    request = request_from_payload({"layout": [{"phrase": "a red circle", "box": [0, 0, 0.5, 0.5]}]}, "txt2img")
    assert request.layout == (LayoutObject("a red circle", (0.0, 0.0, 0.5, 0.5)),)
    for bad, message in (("layout.json", "layout must be a list"), ([{"phrase": "x", "box": [0, 0, 2, 1]}],
                                                                    "outside the image")):
        with pytest.raises(ApiError, match=message):
            request_from_payload({"layout": bad}, "txt2img")


# --- end to end -----------------------------------------------------------------------------------------

def test_a_tiny_layout_model_trains_and_draws_layouts_from_the_cli(tmp_path, vae_file, capsys):
    from daguerre.checkpoints import load_model

    cfg = load_run_config(CONFIGS / "tiny_layout_ldm.toml", "ldm", QUICK)
    path = train_ldm(cfg, tmp_path / "run", vae_path=vae_file)
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000006.png")
    assert grid.size[1] > 4 * 32  # rows: layout, with caption, layout alone, training image
    comps = load_model(path)
    assert comps.config.conditioning == "layout" and comps.config.unet.layout.vocabulary == LAYOUT_WORDS
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "layout:          up to 4 objects of up to 4 words, corners on a 32x32 grid; words: a an big" in \
        capsys.readouterr().out
    (tmp_path / "l.json").write_text(json.dumps([{"phrase": "a red circle", "box": [0.1, 0.1, 0.45, 0.45]}]))
    out = tmp_path / "a.png"
    argv = ["generate", "on a white background", "--layout", str(tmp_path / "l.json"), "--box",
            "a big blue square:0.5,0.5,0.95,0.95", "--model", str(path), "--steps", "2", "--seed", "3"]
    assert main([*argv, "-o", str(out)]) == 0
    params = parse_parameters(read_png_parameters(out))[2]
    assert json.loads(params["Layout"]) == [{"phrase": "a red circle", "box": [0.1, 0.1, 0.45, 0.45]},
                                            {"phrase": "a big blue square", "box": [0.5, 0.5, 0.95, 0.95]}]
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(path), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    components = build_components(comps.config, seed=0)
    assert components.unet.layout_net is not None
    capsys.readouterr()
    assert main([*argv[:4], "--box", "a red circle:0.6,0.1,0.5,0.4", *argv[6:], "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "box [0.6, 0.1, 0.5, 0.4] is empty" in err


def test_a_model_files_layout_and_label_settings_are_bounded_before_anything_is_built():
    from daguerre.config import ModelConfig

    base = preset("tiny").to_dict()
    layout = {"vocabulary": ["red", "circle"], "max_objects": 4, "phrase_words": 4, "grid": 64, "width": 32,
              "layers": 1, "heads": 2, "mlp_dim": 64}
    ModelConfig.from_dict({**base, "unet": {**base["unet"], "layout": layout}})  # sane: read
    for change, message in (({"max_objects": 100_000}, "unet.layout.max_objects: 100000 is out of range"),
                            ({"grid": 10**9}, "unet.layout.grid"),
                            ({"vocabulary": ["red", "red"]}, "each once"),
                            ({"heads": 3}, "divisible by its heads")):
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({**base, "unet": {**base["unet"], "layout": {**layout, **change}}})
    with pytest.raises(ValueError, match="semantic_labels: 300 labels"):
        ModelConfig.from_dict({**base, "semantic_labels": ["x"] * 300})


@pytest.mark.parametrize(("extra", "message"), [
    (["loss.text_dropout=0.95"], r"loss.text_dropout: must be in \[0, 1 - loss.caption_dropout\]"),
    (["data.flip=true"], "data.flip: a layout model trains without flips"),
    (["data.kind=fashion_mnist"], "data.kind: a layout model trains on the shapes world"),
    (["model.conditioning='text'"], "loss.text_dropout: drops a layout model's prompt alone"),
])
def test_bad_layout_run_settings_name_their_key(extra, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "tiny_layout_ldm.toml", "ldm", extra)
