"""Routing (issue 18 point 3): without --model, a layout or a semantic map goes to a shipped model that draws from
it, read from the shipped models' own headers: the default model when it does, else the first other by name; with
none, one line that says so and asks for --model. The shipped folder is a temporary one here
(`checkpoints.shipped.models_folder`), holding tiny models of each kind."""

from __future__ import annotations

from pathlib import Path

import torch

from daguerre.checkpoints import save_model
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.registry import DEFAULT_MODEL, shipped_model_for
from daguerre.training.config import derive_model_config, load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"
SHAPES_CLASSES = None  # the tiny configs are text, layout, semantic and GLIGEN models: no class labels


def _model(folder: Path, name: str, config: str) -> Path:
    """A tiny model of the run config `config` (random weights, fp16) shipped in `folder` as NAME."""
    cfg = load_run_config(CONFIGS / f"{config}.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    path = folder / f"{name}.safetensors"
    save_model(build_components(derive_model_config(cfg, 3, SHAPES_CLASSES), seed=0), path, dtype=torch.float16)
    return path


def test_a_layout_or_a_map_goes_to_the_first_shipped_model_by_name_that_draws_from_it(shipped):
    _model(shipped, DEFAULT_MODEL, "tiny_ldm")  # the default: text only
    _model(shipped, "b-semantic", "tiny_semantic_ldm")
    _model(shipped, "c-layout", "tiny_layout_ldm")
    _model(shipped, "d-gligen", "tiny_gligen_ldm")
    assert shipped_model_for(semantic_map=False, layout=True) == "c-layout"
    assert shipped_model_for(semantic_map=True, layout=False) == "b-semantic"
    assert shipped_model_for(semantic_map=True, layout=True) is None  # no shipped model takes both
    (shipped / "c-layout.safetensors").unlink()
    assert shipped_model_for(semantic_map=False, layout=True) == "d-gligen"  # a GLIGEN model draws from boxes too


def test_the_default_model_comes_first_when_it_draws_from_the_request(shipped):
    _model(shipped, "a-layout", "tiny_layout_ldm")
    _model(shipped, DEFAULT_MODEL, "tiny_gligen_ldm")
    assert shipped_model_for(semantic_map=False, layout=True) == DEFAULT_MODEL


def test_an_adapter_file_is_routed_by_its_own_header(shipped, tmp_path):
    """A shipped adapter file records its whole model's config: routing reads it without its base."""
    from daguerre.checkpoints.adapter import ADAPTER_FORMAT, BASE_NAME_KEY, BASE_SHA_KEY
    from daguerre.fileio import atomic_save_safetensors
    from daguerre.weights.io import read_shapes

    whole = _model(tmp_path, "whole", "tiny_gligen_ldm")
    metadata = {**read_shapes(whole)[1], "format": ADAPTER_FORMAT, BASE_NAME_KEY: "missing", BASE_SHA_KEY: "0" * 64}
    atomic_save_safetensors({"model.diffusion_model.position_net.null_position_feature": torch.zeros(64)},
                            shipped / "z-gligen.safetensors", metadata)
    assert shipped_model_for(semantic_map=False, layout=True) == "z-gligen"


def test_no_shipped_model_for_the_request_is_one_line_asking_for_model(shipped, tmp_path, capsys):
    _model(shipped, DEFAULT_MODEL, "tiny_ldm")
    out = str(tmp_path / "x.png")
    assert main(["generate", "x", "--box", "a red circle:0.1,0.1,0.4,0.4", "--steps", "1", "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no shipped model draws from a layout: name one with --model" in err
    from daguerre.data.layout import LabelMap

    path = tmp_path / "map.png"
    LabelMap.from_array(torch.zeros(32, 32, dtype=torch.uint8).numpy()).image().save(path)
    assert main(["generate", "x", "--semantic", str(path), "--steps", "1", "-o", out]) == 2
    assert "no shipped model draws from a semantic map: name one with --model (a model trained with " \
        "shapes_semantic_ldm.toml" in capsys.readouterr().err
    _model(shipped, "semantic", "tiny_semantic_ldm")  # a map alone would go to it, a map and boxes cannot
    argv = ["generate", "x", "--semantic", str(path), "--box", "a red circle:0.1,0.1,0.4,0.4", "--steps", "1"]
    assert main([*argv, "-o", out]) == 2
    assert "no shipped model draws from a semantic map and a layout: name one with --model (a model trained with " \
        "shapes_semantic_ldm.toml or shapes_layout_ldm.toml" in capsys.readouterr().err
    assert not Path(out).exists()
