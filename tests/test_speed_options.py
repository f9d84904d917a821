"""--quantize int8 and --compile as the CLI, the Python API and the PNG parameters carry them (issue 15).

The int8 layers themselves are tests/test_quantize.py's, the compiled U-Net tests/test_compile.py's; here:
the options reach the networks, the PNG records int8 weights and `--from-png` applies them again, bad
values are named, and the automatic thread count sees a quantised U-Net at its real size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import daguerre
from daguerre import registry
from daguerre.cli import main
from daguerre.commands.generate import set_threads
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.precision import describe_run
from daguerre.quantize import is_quantized, weight_count

COMMON = ["--model", "random:tiny", "--steps", "3", "--size", "32", "--dtype", "bf16"]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_load_quantizes_the_u_net_and_the_text_encoder_and_says_so(monkeypatch):
    import daguerre.quantize

    asked = []
    real = daguerre.quantize.quantize_int8_
    monkeypatch.setattr(daguerre.quantize, "quantize_int8_", lambda module: asked.append(module) or real(module))
    plain = daguerre.load("random:tiny", dtype="bf16")
    pipe = daguerre.load("random:tiny", dtype="bf16", quantize="int8")
    assert asked == [pipe.components.unet, pipe.components.text_encoder]  # (tiny's text layers are too small)
    assert is_quantized(pipe.components.unet) and not is_quantized(pipe.components.vae)  # the VAE stays
    assert weight_count(pipe.components.unet) == weight_count(plain.components.unet)
    assert "int8 weights" in describe_run(pipe.components.unet)
    assert "int8" not in describe_run(plain.components.unet)
    assert daguerre.load("random:tiny", dtype="bf16", quantize="none").components.unet.state_dict()


def test_an_unknown_quantization_is_named():
    with pytest.raises(ValueError, match="unknown quantization 'int4': use one of none, int8"):
        registry.open_model("random:tiny", quantize="int4")


def test_the_png_records_int8_weights_and_from_png_applies_them_again(tmp_path):
    first, again, plain = tmp_path / "int8.png", tmp_path / "again.png", tmp_path / "plain.png"
    assert main(["generate", "a red circle", "--seed", "3", "--quantize", "int8", "-o", str(first), *COMMON]) == 0
    params = parse_parameters(read_png_parameters(first))[2]
    assert params["Weights"] == "int8" and params["Precision"] == "bf16"
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "-o", str(again)]) == 0
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    # the record matters: without int8 weights the same settings draw another image, with no Weights key
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "--quantize", "none",
                 "-o", str(plain)]) == 0
    assert not np.array_equal(_pixels(plain), _pixels(first))
    assert "Weights" not in parse_parameters(read_png_parameters(plain))[2]


def test_a_png_weights_key_is_read_and_a_bad_one_is_named():
    assert settings_from_parameters("a cat\nSteps: 3, Seed: 1").quantize == "none"
    settings = settings_from_parameters("a cat\nSteps: 3, Seed: 1, Weights: int8")
    assert settings.quantize == "int8" and not settings.ignored
    with pytest.raises(ValueError, match="x.png: Weights 'int4' is not one of none, int8"):
        settings_from_parameters("a cat\nSteps: 3, Seed: 1, Weights: int4", "x.png")


def test_the_cli_refuses_an_unknown_quantization_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--quantize", "int4", "-o", str(tmp_path / "x.png"), *COMMON])
    assert "int4" in capsys.readouterr().err


def test_compile_reaches_the_u_net(monkeypatch):
    compiled = []
    monkeypatch.setattr("daguerre.compile.compile_for_inference_", lambda module: compiled.append(module))
    pipe = daguerre.load("random:tiny", compile=True)
    assert compiled == [pipe.components.unet]


def test_compile_and_int8_together_are_refused_by_name():
    with pytest.raises(ValueError, match="int8-quantised layers"):
        daguerre.load("random:tiny", dtype="bf16", quantize="int8", compile=True)


def test_automatic_threads_count_the_int8_weights(monkeypatch):
    """A quantised U-Net's int8 weights are buffers: counted as parameters only, Stable Diffusion would look
    small and run on one thread."""
    import argparse

    seen = []
    monkeypatch.setattr("daguerre.precision.auto_threads", lambda device, size: seen.append(size))
    pipe = daguerre.load("random:tiny", dtype="bf16", quantize="int8")
    set_threads(argparse.Namespace(threads=0), pipe.components)
    assert seen == [weight_count(pipe.components.unet)]
    assert seen[0] > sum(p.numel() for p in pipe.components.unet.parameters())


def test_auto_sees_a_quantised_u_net_at_its_real_size(monkeypatch):
    """`set_compute_dtype(..., "auto")` and the channels_last rule count the int8 weights too: counted as
    parameters only, the quantised `shapes` U-Net (10 M weights, 0.36 M left as parameters) looked like a model
    under auto's 5 M threshold and was cast back to float32."""
    from daguerre import precision
    from daguerre.api import set_compute_dtype

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    pipe = daguerre.load("shapes", quantize="int8")
    assert pipe.dtype == set_compute_dtype(pipe.components, "auto") == torch.bfloat16
    assert is_quantized(pipe.components.unet)
