"""Semantic synthesis (issue 18): the shapes world's label maps, the palette and its refusals, the map in PNG
parameters, the condition the trainer builds (equal to the one `generate --semantic` builds), and a tiny
semantic-synthesis model trained, then run from the command line at its size and at 2x, and again from its PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.components import build_components
from daguerre.conditioning import SemanticConcat, conditioner_for
from daguerre.data.layout import PALETTE, LabelMap, label_fractions, palette_legend, read_label_map, voc_colour
from daguerre.data.shapes import COLOURS, LABELS, ShapesDataset, render, render_labels, sample_scene
from daguerre.limits import Limits
from daguerre.pipelines.request import GenerationRequest
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.training import concat, dist
from daguerre.training.config import derive_model_config, load_run_config
from daguerre.training.data import load_train_data
from daguerre.training.ldm import train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
QUICK = ["train.progress=false", "data.n=8", "data.holdout=4", "train.batch_size=4", "train.steps=6",
         "train.sample_every=6", "train.checkpoint_every=0", "train.log_every=2"]


def _semantic_config(name: str = "tiny-semantic"):
    cfg = load_run_config(CONFIGS / "tiny_semantic_ldm.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    model = derive_model_config(cfg, 3, None)
    model.name = name
    return model


# --- the shapes world's label maps ------------------------------------------------------------------------

def test_label_maps_mark_each_object_where_the_image_draws_it():
    for seed in range(5):
        scene = sample_scene(np.random.default_rng(seed), max_objects=4, placement="free")
        labels = render_labels(scene, 64)
        image = np.asarray(render(scene, 64)).astype(int)
        background = np.abs(image - COLOURS[scene.background]).sum(-1) < 30
        agree = ((labels == 0) == background).mean()
        assert agree > 0.97, agree  # only anti-aliased edge pixels may differ
        assert set(np.unique(labels)) == {0} | {LABELS.index(o.shape) for o in scene.objects}


def test_free_placement_keeps_boxes_inside_and_apart_and_takes_four_objects():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, min_objects=4, max_objects=4, placement="free")
        assert len(scene.objects) == 4
        for obj in scene.objects:
            assert 0 <= obj.bbox[0] < obj.bbox[2] <= 1 and 0 <= obj.bbox[1] < obj.bbox[3] <= 1
    # four large objects, two in a relation: placed one at a time they fit (drawn all at once: 2000 misses)
    scene = sample_scene(np.random.default_rng((0, 114)), max_objects=4, placement="free")
    assert [o.size for o in scene.objects] == ["large"] * 4 and scene.relation is not None
    with pytest.raises(ValueError, match="max_objects <= 4"):
        sample_scene(rng, max_objects=5)
    with pytest.raises(ValueError, match="unknown placement 'wild'"):
        sample_scene(rng, placement="wild")


def test_the_dataset_option_yields_each_scenes_label_map():
    data = ShapesDataset(3, size=32, label_maps=True)
    item = data[1]
    np.testing.assert_array_equal(item["label_map"].numpy(), render_labels(item["scene"], 32))
    np.testing.assert_array_equal(data.label_map(1), item["label_map"].numpy())
    assert "label_map" not in ShapesDataset(3, size=32)[1]


# --- the palette, files and the PNG parameters -------------------------------------------------------------

def test_the_palette_is_pascal_vocs():
    assert PALETTE[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert voc_colour(8) == (64, 0, 0) and voc_colour(255) == (224, 224, 192)
    assert palette_legend(LABELS[:2]) == "background #000000, circle #800000"


def test_a_map_reads_back_from_its_palette_png_and_its_rgb_form():
    labels = render_labels(sample_scene(np.random.default_rng(3), max_objects=4), 32)
    semantic = LabelMap.from_array(labels)
    buf = io.BytesIO()
    semantic.image().save(buf, format="PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert again.mode == "P"
    assert read_label_map(again, LABELS) == semantic
    assert read_label_map(again.convert("RGB"), LABELS) == semantic


def test_unknown_colours_are_refused_by_name_with_the_palette():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2, 5] = (128, 1, 0)  # an anti-aliased edge pixel
    rgb[6, 6] = (255, 255, 255)
    with pytest.raises(ValueError) as e:
        read_label_map(Image.fromarray(rgb), LABELS, "semantic map m.png")
    message = str(e.value)
    assert "\n" not in message and "m.png has colours that name no label: #800100, #ffffff" in message
    assert "first at x=5, y=2" in message and "circle #800000" in message
    rgb[6, 6] = voc_colour(len(LABELS))  # a palette colour past the model's labels
    rgb[2, 5] = 0
    with pytest.raises(ValueError, match="#c00000"):
        read_label_map(Image.fromarray(rgb), LABELS)


def test_the_encoded_map_round_trips_and_bad_text_is_refused_before_decompressing():
    semantic = LabelMap.from_array(render_labels(sample_scene(np.random.default_rng(1)), 64))
    text = semantic.encode()
    assert text.startswith("64x64 ") and "," not in text and ":" not in text
    assert LabelMap.decode(text, 64 * 64) == semantic
    with pytest.raises(ValueError, match="over the limit"):
        LabelMap.decode(text, 64 * 63)
    bomb = "4096x4096 " + base64.b64encode(__import__("zlib").compress(bytes(4096 * 4096))).decode()
    with pytest.raises(ValueError, match="over the limit of 1000000"):
        LabelMap.decode(bomb, 1_000_000)
    for bad in ("64x64", "64x64 !!!", "x64 AAAA", "64x64 " + base64.b64encode(b"not zlib").decode(),
                "2x2 " + base64.b64encode(__import__("zlib").compress(bytes(5))).decode()):
        with pytest.raises(ValueError, match="semantic map"):
            LabelMap.decode(bad, 1_000_000)


# --- the condition ---------------------------------------------------------------------------------------

def test_label_fractions_are_each_cells_share_of_every_label():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :2] = 3  # the top-left 4x4 cell is half label 3
    out = label_fractions(labels, 9, 4)
    assert out.shape == (1, 9, 2, 2)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 2, 2))
    assert float(out[0, 3, 0, 0]) == 0.5 and float(out[0, 0, 0, 0]) == 0.5 and float(out[0, 0, 1, 1]) == 1.0


def test_the_trainers_condition_is_the_pipelines_for_the_same_map(tmp_path):
    cfg = load_run_config(CONFIGS / "tiny_semantic_ldm.toml", "ldm", ["data.n=6", "data.holdout=2"])
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    data = load_train_data(cfg.data)
    comps = build_components(derive_model_config(cfg, 3, None), seed=3)
    inputs = concat.build_concat_inputs(comps.config, cfg, data, comps.vae, tmp_path / "cache", dist.DistEnv())
    assert isinstance(inputs, concat.SemanticInputs) and inputs.pixels.shape == (4, 32, 32)
    rows = torch.tensor([2, 0])
    c, y = inputs.step(rows, torch.zeros(2, dtype=torch.long), [], torch.device("cpu"))
    assert y is None and c.shape == (2, len(LABELS), 16, 16)
    raw = data.dataset.dataset
    for k, row in enumerate(rows.tolist()):
        semantic = LabelMap.from_array(raw.label_map(int(data.train_pool[row])))
        req = GenerationRequest(prompt="", semantic_map=semantic.image()).validate(comps.config)
        torch.testing.assert_close(c[k:k + 1], conditioner_for(comps.config).concat.request_input(comps.config, req)
                                   ["concat"], rtol=0, atol=0)


def test_requests_check_the_map_against_the_model():
    model = _semantic_config()
    semantic = LabelMap.from_array(render_labels(sample_scene(np.random.default_rng(2)), 32))
    valid = GenerationRequest(semantic_map=semantic.image()).validate(model)
    assert (valid.width, valid.height, valid.semantic_map) == (32, 32, semantic)
    bigger = GenerationRequest(semantic_map=semantic, width=64, height=64).validate(model)
    np.testing.assert_array_equal(bigger.semantic_map.array(), semantic.array().repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="draws from a semantic map: give one"):
        GenerationRequest(prompt="x").validate(model)
    with pytest.raises(ValueError, match="does not draw from a semantic map"):
        GenerationRequest(semantic_map=semantic).validate(derive_model_config(load_run_config(
            CONFIGS / "tiny_ldm.toml", "ldm"), 3, None))
    with pytest.raises(ValueError, match="not a positive multiple of 4"):
        GenerationRequest(semantic_map=semantic.resized(30, 32)).validate(model)
    with pytest.raises(ValueError, match="pixels"):  # a map over the input-image limit is refused
        GenerationRequest(semantic_map=semantic).validate(model, Limits(max_input_pixels=32 * 31))
    with pytest.raises(ValueError, match="knows 9 labels"):
        GenerationRequest(semantic_map=LabelMap.from_array(np.full((32, 32), 9, np.uint8))).validate(model)
    with pytest.raises(ValueError, match="use `daguerre generate --semantic"):
        SemanticConcat().check_task(model, "img2img")


def test_the_server_reads_a_base64_map_and_never_a_path():
    from daguerre.server.payload import ApiError, request_from_payload

    semantic = LabelMap.from_array(render_labels(sample_scene(np.random.default_rng(2)), 32))
    buf = io.BytesIO()
    semantic.image().save(buf, format="PNG")
    request = request_from_payload({"prompt": "", "semantic_map": base64.b64encode(buf.getvalue()).decode()},
                                   "txt2img")
    assert read_label_map(request.semantic_map, LABELS) == semantic
    with pytest.raises(ApiError, match="semantic_map"):
        request_from_payload({"semantic_map": "/etc/passwd"}, "txt2img")


# --- end to end -----------------------------------------------------------------------------------------

def test_a_tiny_semantic_model_trains_and_draws_maps_from_the_cli(tmp_path, vae_file, capsys):
    from daguerre.checkpoints import load_model

    cfg = load_run_config(CONFIGS / "tiny_semantic_ldm.toml", "ldm", QUICK)
    path = train_ldm(cfg, tmp_path / "run", vae_path=vae_file)
    assert (tmp_path / "run" / "samples" / "step_00000006.png").is_file()
    comps = load_model(path)
    assert comps.config.concat == "semantic" and comps.config.semantic_labels == list(LABELS)
    assert comps.config.unet.in_channels == 4 + len(LABELS)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "map labels:      background #000000, circle #800000, square #008000" in capsys.readouterr().out
    semantic = LabelMap.from_array(render_labels(sample_scene(np.random.default_rng(4), max_objects=4), 32))
    semantic.image().save(tmp_path / "map.png")
    out = tmp_path / "a.png"
    argv = ["generate", "a red circle", "--semantic", str(tmp_path / "map.png"), "--model", str(path), "--steps", "2",
            "--seed", "5"]
    assert main([*argv, "-o", str(out)]) == 0
    params = parse_parameters(read_png_parameters(out))[2]
    assert LabelMap.decode(params["Semantic map"], 1e6) == semantic and Image.open(out).size == (32, 32)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(path), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert main([*argv, "--size", "64x64", "-o", str(tmp_path / "big.png")]) == 0  # convolutional: a 2x map
    assert Image.open(tmp_path / "big.png").size == (64, 64)
    bad = np.asarray(semantic.image().convert("RGB")).copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(tmp_path / "bad.png")
    capsys.readouterr()
    assert main([*argv[:2], "--semantic", str(tmp_path / "bad.png"), *argv[4:], "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "colours that name no label: #010203" in err


def test_a_semantic_run_may_start_from_a_text_model_and_its_own_autoencoder(tmp_path):
    """`--init MODEL` with `--vae MODEL`: the model's own file is the autoencoder, and the U-Net's input grows by
    the map's channels, which start at zero, so the grown network computes what the model did."""
    from daguerre.checkpoints import save_model
    from daguerre.models.unet import UNetModel
    from daguerre.training.init import init_ldm
    from daguerre.weights.io import file_hash

    vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    text_cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm")
    text_cfg.model.vae = vae
    source = build_components(derive_model_config(text_cfg, 3, None), seed=1)
    for p in source.unet.parameters():  # zero-initialised output layers would make every U-Net equal
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    source.config.provenance = {"vae_sha256": "0" * 64}  # trained on another file's autoencoder
    path = tmp_path / "text.safetensors"
    save_model(source, path)
    model = _semantic_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetModel(model.unet).eval()
    with pytest.raises(ValueError, match="not on this run's --vae"):
        init_ldm(path, unet, None, "1" * 64)
    record = init_ldm(path, unet, None, file_hash(path))  # --vae is the model file itself: accepted
    assert record["new_tensors"]["unet"] == 0
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 5, 32)
    semantic = torch.rand(1, len(LABELS), 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(unet(torch.cat([x, semantic], 1), t, ctx), source.unet(x, t, ctx))
