"""A1111's hires fix (`enable_hr`, pipelines/hires.py): the first pass is the plain txt2img image, the result has
the hires size, its PNG parameters make it again bit for bit, the HTTP API and webuiapi switch it on, and a final
size over the limits is refused before any work."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import daguerre
from daguerre.cli import main
from daguerre.limits import LimitError, Limits
from daguerre.pipelines.common import progress_total
from daguerre.pipelines.hires import hires_size, upscaler_name
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.server.app import Server


@pytest.fixture(scope="module")
def pipe():
    return daguerre.load("random:tiny")


def _steps(pipe, **fields):
    seen = []
    images = pipe("a cat", callback=lambda info: seen.append((info["i"], info["denoised"].clone())), **fields)
    return images, seen


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic)", "Latent (nearest)", "Lanczos"])
def test_the_first_pass_is_the_plain_image_and_the_result_has_the_hires_size(pipe, upscaler):
    base = dict(seed=3, steps=3, width=32, height=32, sampler="Euler", n=2)
    plain, plain_steps = _steps(pipe, **base)
    hires, hires_steps = _steps(pipe, **base, hires_scale=1.5, hires_steps=4, hires_upscaler=upscaler,
                                hires_strength=0.5)
    assert [r.image.size for r in plain] == [(32, 32)] * 2
    assert [r.image.size for r in hires] == [(48, 48)] * 2 and [r.seed for r in hires] == [3, 4]
    # both images' first pass: step for step the plain txt2img run (same seeds, sampler, size)
    assert len(plain_steps) == 6
    for (i, a), (j, b) in zip(plain_steps, hires_steps[:6], strict=True):
        assert i == j and torch.equal(a, b)
    second = hires_steps[6:]  # then 2 images x the img2img tail of 4 steps at strength 0.5 (A1111: 3 of them)
    assert len(second) == 2 * 3 and second[0][1].shape[-2:] == (24, 24)
    params = parse_parameters(hires[0].parameters)[2]
    assert params["Size"] == "32x32" and params["Hires upscale"] == "1.5" and params["Hires steps"] == "4"
    assert params["Hires upscaler"] == upscaler and params["Denoising strength"] == "0.5"
    request = pipe.request("a cat", **base, hires_scale=1.5, hires_steps=4, hires_upscaler=upscaler, hires_strength=0.5)
    assert progress_total(request) == len(hires_steps)  # progress bars count both passes


def test_hires_size_and_upscaler_names():
    assert hires_size(32, 48, 2.0, 0, 0, 8) == (64, 96)
    assert hires_size(32, 48, 2.0, 64, 0, 8) == (64, 96)  # the height from the base aspect
    assert hires_size(32, 48, 1.0, 0, 50, 8) == (32, 48)  # snapped down to the grid
    assert upscaler_name("latent-bicubic") == "Latent (bicubic)" and upscaler_name("LANCZOS") == "Lanczos"
    with pytest.raises(ValueError, match="unknown hires upscaler 'ESRGAN_4x'.*Lanczos"):
        upscaler_name("ESRGAN_4x")


def test_bad_hires_fields_are_named(pipe):
    for fields, message in [({"hires_scale": 20.0}, "hires scale must be in"),
                            ({"hires_scale": 2.0, "hires_strength": 1.5}, "hires denoising strength"),
                            ({"hires_scale": 2.0, "hires_upscaler": "SwinIR"}, "unknown hires upscaler 'SwinIR'"),
                            ({"hires_width": -8}, "hires_width must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            pipe.request("a", steps=2, **fields)


def test_a_hires_size_over_the_limits_is_refused_before_any_work():
    limits = Limits(max_pixels=64 * 64)
    pipe = daguerre.load("random:tiny", limits=limits)
    calls = []
    assert pipe("a", steps=2, width=64, height=64, callback=calls.append)[0].image.size == (64, 64)  # base: fine
    calls.clear()
    with pytest.raises(LimitError, match=r"the hires fix's final size: size 128x128 .* is over the limit"):
        pipe("a", steps=2, width=64, height=64, hires_scale=2.0, callback=calls.append)
    assert calls == []  # refused at validation: no step ran


def test_png_parameters_read_back_and_from_png_makes_the_same_image(tmp_path, capsys):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a cat", "--model", "random:tiny", "--seed", "5", "--steps", "3", "--size", "16x16",
                 "--hires-scale", "2", "--hires-upscaler", "lanczos", "--hires-steps", "2", "--hires-denoise", "0.6",
                 "-o", str(first)]) == 0
    text = read_png_parameters(first)
    params = parse_parameters(text)[2]
    assert params["Size"] == "16x16" and params["Hires upscaler"] == "Lanczos" and params["Hires steps"] == "2"
    fields = settings_from_parameters(text).fields
    assert (fields["hires_scale"], fields["hires_upscaler"], fields["hires_steps"], fields["hires_strength"]) == (
        2.0, "Lanczos", 2, 0.6)
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "-o", str(again)]) == 0
    err = capsys.readouterr().err
    assert "Hires" not in err and "Denoising" not in err  # nothing of the hires fix is reported as not applied
    with Image.open(first) as a, Image.open(again) as b:
        assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
        assert b.info["parameters"] == text


def test_the_a1111_route_takes_enable_hr(pipe):
    server = Server(pipe, "random:tiny")
    payload = {"prompt": "x", "steps": 3, "seed": 2, "width": 32, "height": 32, "sampler_name": "Euler",
               "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 2,
               "denoising_strength": 0.4, "hr_resize_x": 0, "hr_resize_y": 0, "hr_prompt": "",
               "hr_sampler_name": None}
    status, _, body = server.handle("POST", "/sdapi/v1/txt2img", json.dumps(payload).encode())
    out = json.loads(body)
    assert status == 200, out
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    same = pipe("x", steps=3, seed=2, width=32, height=32, sampler="Euler", hires_scale=2.0,
                hires_upscaler="Latent (nearest)", hires_steps=2, hires_strength=0.4)[0]
    assert image.size == (64, 64) and np.array_equal(np.asarray(image), np.asarray(same.image))
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)" in image.info["parameters"]
    # a final size by hr_resize_x / hr_resize_y
    status, _, body = server.handle("POST", "/sdapi/v1/txt2img", json.dumps(
        {**payload, "hr_resize_x": 48, "hr_resize_y": 0}).encode())
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(json.loads(body)["images"][0]))).size == (48, 48)
    # a second pass daguerre cannot honour is refused by name; a too large size with a clear message
    for extra, names in [({"hr_prompt": "a dog"}, "hr_prompt"), ({"hr_scale": 100}, "hires scale")]:
        status, _, body = server.handle("POST", "/sdapi/v1/txt2img", json.dumps({**payload, **extra}).encode())
        assert status == 422 and names in json.loads(body)["detail"]


def test_webuiapi_txt2img_with_enable_hr(pipe):
    import webuiapi

    from conftest import serving

    with serving(Server(pipe, "random:tiny")) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.txt2img(prompt="a red circle", seed=7, width=32, height=32, steps=3, enable_hr=True,
                             hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Lanczos, hr_second_pass_steps=2)
    assert result.image.size == (48, 48)
    text = result.info["infotexts"][0]
    assert "Size: 32x32" in text and "Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 2" in text
    assert "Hires upscaler: Lanczos" in text
