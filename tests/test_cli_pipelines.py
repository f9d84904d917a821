"""`daguerre img2img | inpaint | upscale` end to end on `--model random:tiny`: PNGs whose A1111
`parameters` parse back, the same pixels as the Python pipeline, grids, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from daguerre.cli import main
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.registry import open_model

COMMON = ["--model", "random:tiny", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "in.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:16, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def _params(path):
    return parse_parameters(read_png_parameters(path))


def test_img2img_writes_images_grid_and_parameters(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["img2img", str(files / "in.png"), "a red circle", "--strength", "0.6", "--n", "2",
               "--negative", "blurry", "-o", str(out), *COMMON])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000-5.png", "00001-6.png", "grid-00000-5.png"]
    assert len(printed) == 3
    prompt, negative, params = _params(out / "00001-6.png")
    assert (prompt, negative) == ("a red circle", "blurry")
    assert params["Seed"] == "6" and params["Steps"] == "2" and params["Denoising strength"] == "0.6"
    assert params["Size"] == "32x32" and params["Model"] == "random:tiny"
    assert Image.open(out / "grid-00000-5.png").size == (64, 32)

    # the CLI's image is the Python pipeline's image for the same request
    from daguerre.pipelines.img2img import img2img
    from daguerre.pipelines.request import GenerationRequest

    comps, _ = open_model("random:tiny")
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=2, seed=6, task="img2img",
                                init_image=str(files / "in.png"), strength=0.6)
    ref = img2img(comps, request.validate(comps.config))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00001-6.png")), np.asarray(ref.image))


def test_inpaint_keeps_unmasked_pixels(files, tmp_path):
    out = tmp_path / "x.png"
    rc = main(["inpaint", str(files / "in.png"), str(files / "mask.png"), "a cat", "--mask-blur", "0",
               "--fill", "latent-noise", "--strength", "1", "-o", str(out), *COMMON])
    assert rc == 0
    got = np.asarray(Image.open(out))
    src = np.asarray(Image.open(files / "in.png"))
    keep = np.asarray(Image.open(files / "mask.png")) == 0
    np.testing.assert_array_equal(got[keep], src[keep])
    params = _params(out)[2]
    assert params["Mask blur"] == "0" and params["Masked content"] == "latent noise"


def test_upscale_fallback_doubles_the_size(files, tmp_path, capsys):
    out = tmp_path / "up.png"
    assert main(["upscale", str(files / "small.png"), "--scale", "2", "-o", str(out), *COMMON]) == 0
    assert "not a super-resolution model" in capsys.readouterr().err
    assert Image.open(out).size == (32, 32)
    params = _params(out)[2]
    assert params["Hires upscale"] == "2" and params["Denoising strength"] == "0.4"


@pytest.mark.parametrize("argv, message", [
    (["img2img", "{files}/missing.png"], "no such image"),
    (["img2img", "{files}/in.png", "--strength", "1.5"], "strength must be in [0, 1]"),
    (["inpaint", "{files}/in.png", "{files}/small.png"], "mask {files}/small.png is 16x16"),
    (["img2img", "{files}/in.png", "--class", "cat"], "not class-conditional"),
    (["upscale", "{files}/in.png", "--scale", "0.5"], "upscale factor"),
])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    argv = [a.format(files=files) for a in argv]
    assert main([*argv, "-o", str(out), *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message.format(files=files) in err
    assert not out.exists()  # nothing written
