"""Inpainting's "only masked" area (A1111's "Only masked", `inpaint_full_res` in its API): a crop around
the mask, grown to the aspect ratio of width x height, is redrawn at width x height and pasted back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import daguerre
from daguerre.cli import main
from daguerre.pipelines.images import blur_mask
from daguerre.pipelines.inpaint import crop_region
from daguerre.pngmeta import parse_parameters, read_png_parameters


def _mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize(("size", "box", "padding", "target", "expected"), [
    ((200, 100), (90, 40, 110, 60), 10, (32, 32), (80, 30, 120, 70)),  # square box, padded on every side
    ((200, 100), (90, 40, 110, 60), 10, (64, 32), (60, 30, 140, 70)),  # grown to 2:1 about its center
    ((200, 100), (90, 40, 110, 60), 10, (32, 64), (80, 10, 120, 90)),  # grown to 1:2
    ((200, 100), (0, 0, 10, 10), 4, (32, 32), (0, 0, 14, 14)),  # padding stops at the image's edge
    ((200, 100), (190, 45, 200, 55), 0, (64, 32), (180, 45, 200, 55)),  # grown inward at the right edge
    ((200, 100), (90, 40, 110, 60), 0, (32, 128), (90, 10, 110, 90)),  # taller than the image: its whole height
])
def test_crop_region(size, box, padding, target, expected):
    assert crop_region(_mask(*size, box), padding, *target) == expected


def test_only_masked_redraws_a_crop_at_width_x_height_and_keeps_everything_else():
    pipe = daguerre.load("random:tiny")  # 32 px native; VAE factor 2
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = _mask(128, 96, (60, 40, 76, 56))
    shapes = []
    results = pipe.inpaint(image, mask, "a cat", steps=3, seed=1, width=16, height=16, mask_blur=2,
                           inpaint_area="only masked", inpaint_padding=6, strength=1.0,
                           callback=lambda info: shapes.append(tuple(info["x"].shape)))
    out = np.asarray(results[0].image).astype(int)
    assert results[0].image.size == image.size  # the whole image comes back
    assert {shape[2:] for shape in shapes} == {(8, 8)}  # sampled at 16 x 16 pixels: the crop, not 128 x 96
    x1, y1, x2, y2 = crop_region(blur_mask(mask, 2), 6, 16, 16)
    assert x2 - x1 == y2 - y1 < 64 and (x1, y1) <= (60 - 6, 40 - 6) and (x2, y2) >= (76 + 6, 56 + 6)
    outside = np.ones(out.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    src = np.asarray(image).astype(int)
    assert np.array_equal(out[outside], src[outside])  # outside the padded crop: the input's own pixels
    assert np.abs(out[44:52, 64:72] - src[44:52, 64:72]).mean() > 10  # inside the mask: redrawn
    params = parse_parameters(results[0].parameters)[2]
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "6"
    assert params["Size"] == "16x16"


def test_only_masked_needs_a_mask_and_a_valid_padding():
    pipe = daguerre.load("random:tiny")
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="only masked"):
        pipe.img2img(image, "x", inpaint_area="only masked")
    with pytest.raises(ValueError, match="inpaint padding"):
        pipe.inpaint(image, Image.new("L", (32, 32), 255), "x", inpaint_area="only masked", inpaint_padding=-1)
    with pytest.raises(ValueError, match="inpaint area"):
        pipe.inpaint(image, Image.new("L", (32, 32), 255), "x", inpaint_area="masked")


def test_cli_only_masked(tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    _mask(64, 48, (40, 8, 52, 20)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "x", "--only-masked",
                 "--only-masked-padding", "4", "--mask-blur", "0", "--size", "16x16", "--steps", "2",
                 "--model", "random:tiny", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out)).astype(int)
    src = np.asarray(Image.open(tmp_path / "in.png")).astype(int)
    assert got.shape == src.shape  # the input's size, not --size
    assert np.array_equal(got[:, :34], src[:, :34]) and np.array_equal(got[26:], src[26:])  # outside (36,4)-(56,24)
    assert parse_parameters(read_png_parameters(out))[2]["Inpaint area"] == "Only masked"
    capsys.readouterr()


def test_server_inpaint_full_res_returns_the_whole_image():
    import base64
    import io
    import json

    from daguerre.server.app import Server

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    server = Server(daguerre.load("random:tiny"), "random:tiny")
    image, mask = Image.new("RGB", (96, 64), (20, 120, 200)), _mask(96, 64, (70, 10, 80, 20))
    base = {"init_images": [b64(image)], "mask": b64(mask), "width": 16, "height": 16, "steps": 2, "mask_blur": 0,
            "denoising_strength": 1.0}
    for full_res, size in [(True, (96, 64)), (False, (16, 16))]:
        status, _, raw = server.handle("POST", "/sdapi/v1/img2img", json.dumps({**base, "inpaint_full_res": full_res,
                                                                              "inpaint_full_res_padding": 4}).encode())
        assert status == 200, raw
        got = Image.open(io.BytesIO(base64.b64decode(json.loads(raw)["images"][0])))
        assert got.size == size
        if full_res:
            assert np.array_equal(np.asarray(got)[:, :60], np.asarray(image)[:, :60])
