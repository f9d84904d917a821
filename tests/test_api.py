"""The Python API: `daguerre.load(...)` -> Pipeline; calls return images with their seed and parameters."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import daguerre
from daguerre.pipelines.request import GenerationRequest
from daguerre.pngmeta import parse_parameters

FAST = {"steps": 2, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def pipe():
    return daguerre.load("random:tiny")


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


def test_import_daguerre_does_not_import_torch():
    code = ("import sys, daguerre; assert 'torch' not in sys.modules; load = daguerre.load; "
            "assert 'torch' not in sys.modules; assert callable(load)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_and_generate(pipe):
    assert pipe.config.name == "random:tiny" and pipe.components.vae is not None and pipe.model_hash is None
    results = pipe("a red circle", negative_prompt="blue", seed=3, n=2, **FAST)
    assert [r.seed for r in results] == [3, 4]
    for r in results:
        assert isinstance(r.image, Image.Image) and r.image.size == (16, 16) and r.image.mode == "RGB"
        prompt, negative, params = parse_parameters(r.parameters)
        assert (prompt, negative, params["Seed"], params["Steps"]) == ("a red circle", "blue", str(r.seed), "2")


def test_same_seed_same_image(pipe):
    a = pipe("a cat", seed=11, **FAST)[0].image
    b = pipe("a cat", seed=11, **FAST)[0].image
    c = pipe("a cat", seed=12, **FAST)[0].image
    assert np.array_equal(_array(a), _array(b))
    assert not np.array_equal(_array(a), _array(c))
    # image i of a request is the image of seed + i made alone
    second = pipe("a cat", seed=11, n=2, batch_size=2, **FAST)[1].image
    assert np.array_equal(_array(second), _array(c))


def test_request_object_and_overrides(pipe):
    request = GenerationRequest(prompt="a dog", seed=5, **FAST)
    from_request = pipe(request)[0]
    from_fields = pipe("a dog", seed=5, **FAST)[0]
    assert np.array_equal(_array(from_request.image), _array(from_fields.image))
    assert from_request.parameters == from_fields.parameters
    overridden = pipe(request, seed=6)[0]
    assert overridden.seed == 6 and request.seed == 5  # the caller's request is not changed
    assert pipe.request("x", tile=True, **FAST).tile is True


def test_bad_settings_are_value_errors(pipe):
    with pytest.raises(ValueError, match="unknown generation setting.*stepz"):
        pipe("a cat", stepz=3)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe("a cat", sampler="DPM++ 9M", **FAST)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe(42)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", True, "steps must be a whole number, got True"),
    ("seed", "7", "seed must be a whole number, got '7'"),
    ("seed", 1.5, "seed must be a whole number, got 1.5"),
    ("cfg_scale", "7", "cfg_scale must be a number, got '7'"),
    ("negative_prompt", None, "negative_prompt must be text, got None"),
    ("clip_skip", 1.0, "clip_skip must be a whole number, got 1.0"),
    ("width", "32", "width must be a whole number, got '32'"),
])
def test_settings_of_the_wrong_type_are_named(pipe, field, value, message):
    """Values from JSON, forms and scripts: caught at the edge, not deep inside torch."""
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe.request("a cat", **{field: value})
    assert pipe.request("a cat", seed=np.int64(3), cfg_scale=np.float32(4.5)).seed == 3  # numpy scalars are fine


def test_the_compute_dtype_covers_every_network_the_vae_included():
    p = daguerre.load("random:tiny", dtype="bf16")
    assert p.dtype == torch.bfloat16
    assert next(p.components.unet.parameters()).dtype == torch.bfloat16
    assert next(p.components.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(p.components.vae.parameters()).dtype == torch.bfloat16  # decodes in bf16, float32 retry on overflow
    with pytest.raises(ValueError, match="unknown dtype"):
        daguerre.load("random:tiny", dtype="fp8")


def test_image_pipelines_slot_in(pipe):
    red = Image.new("RGB", (16, 16), (200, 20, 20))
    out = pipe.img2img(red, "a cat", strength=0.5, seed=1, steps=2)
    assert out[0].image.size == (16, 16) and "Denoising strength: 0.5" in out[0].parameters
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))  # repaint the left half
    out = pipe.inpaint(red, mask, "a cat", seed=1, steps=2, mask_blur=0)[0].image
    kept = _array(out)[:, 8:].astype(int) - _array(red)[:, 8:].astype(int)
    assert np.abs(kept).max() <= 1  # the right half is the input's
