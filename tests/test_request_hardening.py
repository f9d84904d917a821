"""Careless or hostile generation requests cost nothing and never yield a black image reported as success:
NaN / infinite settings, sizes of 0, bracket bombs in prompts, images that declare billions of pixels,
models whose weights are NaN, and PNG parameters that name a random: model (daguerre issue 13)."""

from __future__ import annotations

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import daguerre
from daguerre.cli import main
from daguerre.config import TextEncoderConfig, preset
from daguerre.guidance import cfg_denoiser, rescale_guidance
from daguerre.limits import LimitError, Limits
from daguerre.models.text_encoder import CLIPTextEncoder
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.pipelines.images import load_image, load_mask, open_image
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.prompts import MAX_EMPHASIS_DEPTH, encode_weighted, parse_emphasis
from daguerre.pipelines.request import MAX_MASK_BLUR, GenerationRequest, NonFiniteError
from daguerre.pngmeta import save_png

TINY = preset("tiny")
FAST = {"steps": 2, "width": 32, "height": 32, "seed": 1}


@pytest.fixture(scope="module")
def pipe():
    return daguerre.load("random:tiny")


# --- sizes and numbers ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "says"), [({"width": 0, "height": 0}, "width must be a positive number of "
                                                "pixels, got 0"),
                                              ({"height": -64}, "height must be a positive number of pixels, got -64")])
def test_a_size_of_zero_or_less_is_an_error_not_the_default_size(fields, says):
    with pytest.raises(ValueError, match=says):
        GenerationRequest(**fields).validate(TINY)


def test_size_0x0_on_the_command_line_is_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "o.png"
    code = main(["generate", "a", "--model", "random:tiny", "--size", "0x0", "--steps", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "0" in err and "size" in err.lower() and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


NON_FINITE = [
    ({"cfg_scale": float("inf")}, "cfg_scale"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"guidance_rescale": float("nan")}, "guidance_rescale"),
    ({"task": "img2img", "strength": float("nan")}, "strength"),
    ({"task": "upscale", "upscale_factor": float("nan")}, "upscale_factor"),
    ({"task": "upscale", "upscale_factor": float("inf")}, "upscale_factor"),
    ({"eta": float("nan")}, "eta"),
]


@pytest.mark.parametrize(("fields", "name"), NON_FINITE)
def test_nan_and_infinite_settings_are_refused_by_name(fields, name):
    req = GenerationRequest(init_image=Image.new("RGB", (32, 32)), **fields)
    with pytest.raises(ValueError, match=f"{name}.*(nan|inf)"):
        req.validate(TINY)


def test_cfg_inf_on_the_command_line_and_infinity_over_http_are_refused(tmp_path, capsys, pipe):
    from daguerre.server.app import Server

    out = tmp_path / "o.png"
    assert main(["generate", "a", "--model", "random:tiny", "--cfg", "inf", "--steps", "2", "-o", str(out)]) == 2
    assert "cfg_scale" in capsys.readouterr().err and not out.exists()
    status, _, body = Server(pipe, "random:tiny").handle("POST", "/sdapi/v1/txt2img",
                                                         b'{"prompt": "a", "steps": 2, "cfg_scale": Infinity}')
    assert status == 422 and "cfg_scale" in json.loads(body)["detail"]


def test_wrong_types_are_named():
    for fields, name in [({"tile": "yes"}, "tile"), ({"sampler": 3}, "sampler"),
                         ({"schedule": ["Karras"]}, "schedule")]:
        with pytest.raises(ValueError, match=name):
            GenerationRequest(**fields).validate(TINY)


def test_clip_skip_beyond_the_text_encoder_and_huge_mask_blur_are_refused():
    layers = TINY.text_encoder.layers
    GenerationRequest(clip_skip=layers).validate(TINY)
    with pytest.raises(ValueError, match=f"clip skip {layers + 1}"):
        GenerationRequest(clip_skip=layers + 1).validate(TINY)
    image, mask = Image.new("RGB", (32, 32)), Image.new("L", (32, 32), 255)
    inpaint = {"task": "inpaint", "init_image": image, "mask": mask}
    GenerationRequest(mask_blur=MAX_MASK_BLUR, **inpaint).validate(TINY)
    with pytest.raises(ValueError, match=f"mask blur .* got {10**9}"):  # blurs the mask away to nothing
        GenerationRequest(mask_blur=10**9, **inpaint).validate(TINY)


# --- prompts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bomb", "depth"), [("(" * 4900 + "a" + ")" * 4900, 4900), ("[" * 5000 + "a", 5000),
                                             ("(a:1.1)".join(["(("] * 1000), 2000), ("(a [b " * 1600, 3200)])
def test_deep_bracket_nesting_is_an_error_naming_the_depth(bomb, depth):
    for fields in ({"prompt": bomb}, {"negative_prompt": bomb}):
        with pytest.raises(ValueError, match=rf"nest {depth} deep, over the limit of 32"):
            GenerationRequest(**fields).validate(TINY)
    with pytest.raises(ValueError, match=rf"nest {depth} deep"):
        parse_emphasis(bomb)


def test_a_5000_deep_prompt_is_refused_whatever_the_limits():
    bomb = "(" * 5000 + "a" + ")" * 5000
    with pytest.raises(LimitError, match="10001 characters"):
        GenerationRequest(prompt=bomb).validate(TINY)
    with pytest.raises(ValueError, match="nest 5000 deep"):  # no RecursionError, no quadratic time
        GenerationRequest(prompt=bomb).validate(TINY, Limits.unlimited())


def test_nesting_up_to_the_limit_parses():
    [(text, weight)] = parse_emphasis("(" * MAX_EMPHASIS_DEPTH + "a" + ")" * MAX_EMPHASIS_DEPTH)
    assert text == "a" and weight == pytest.approx(1.1**32)
    assert parse_emphasis("\\(" * 5000) == [("(" * 5000, 1.0)]  # escaped brackets are text, not depth


def test_weights_that_overflow_are_refused():
    with pytest.raises(ValueError, match="weight"):
        parse_emphasis("(a:99999999)")
    with pytest.raises(ValueError, match="weight"):
        parse_emphasis("(" * 30 + "a:9)" + ")" * 29)  # 9 x 1.1^29 = 143
    assert parse_emphasis("(" * 20 + "a:9)" + ")" * 19)[0][1] == pytest.approx(9 * 1.1**19)  # 55: allowed


@pytest.mark.parametrize("unit", ["(a)", "a)", "(a:1.1)", "a:", "[a](b)", "(a[b]c) BREAK ", "\\(", "(a" * 30 + "b"])
def test_parsing_is_linear_in_the_prompt_length(unit):
    """~200k characters of each pattern parse in well under a second; the old parser took seconds to minutes
    (a rescale of every earlier run per bracket, and runs merged by repeated string concatenation)."""
    text = unit * (200_000 // len(unit))
    start = time.perf_counter()
    try:
        parse_emphasis(text)
    except ValueError as e:  # refused for its depth: as fast
        assert "deep" in str(e)
    assert time.perf_counter() - start < 2.0


def test_a_zero_mean_chunk_is_weighted_without_dividing_by_its_mean():
    """An untrained text encoder's final LayerNorm gives chunks of mean ~0: A1111's mean restore divided by it
    and turned the context infinite (random:tiny at clip skip 2 made NaN, saved as a black image)."""
    torch.manual_seed(0)
    te = CLIPTextEncoder(TextEncoderConfig(width=32, layers=2, heads=2, mlp_dim=64)).eval()
    tok = CLIPTokenizer()
    with torch.no_grad():
        for skip in (0, 1):
            z = encode_weighted(te, tok, ["a (red:1.2) cat, colon: text", "(x:0.5)"], skip_layers=skip)
            plain = encode_weighted(te, tok, ["a red cat, colon: text", "x"], skip_layers=skip)
            assert torch.isfinite(z).all() and z.abs().max() <= 100 * plain.abs().max()


# --- non-finite results are errors, never black images -----------------------------------------------------

def _nan_model(part: str):
    pipe = daguerre.load("random:tiny")
    with torch.no_grad():
        for p in getattr(pipe.components, part).parameters():
            p.fill_(float("nan"))
    return pipe


@pytest.mark.parametrize(("part", "names"), [("unet", ["final latents", "U-Net"]),
                                             ("vae", ["decoded pixels", "VAE"]),
                                             ("text_encoder", ["final latents", "text encoder"])])
def test_nan_weights_raise_naming_the_broken_network(part, names):
    with pytest.raises(NonFiniteError) as e:
        _nan_model(part)("a cat", **FAST)
    assert "NaN" in str(e.value) and "weights are broken" in str(e.value)
    assert all(n in str(e.value) for n in names), str(e.value)


def test_extreme_but_finite_settings_that_overflow_name_the_settings(pipe):
    with pytest.raises(NonFiniteError, match=r"cfg scale 1e\+38"):
        pipe("a cat", cfg_scale=1e38, **FAST)
    assert np.asarray(pipe("a cat", cfg_scale=7, **FAST)[0].image).std() > 0


def test_nan_weights_checkpoint_fails_on_the_command_line_and_over_http(tmp_path, capsys):
    from daguerre.checkpoints import save_model
    from daguerre.server.app import Server

    broken = _nan_model("unet")
    path = tmp_path / "nan.safetensors"
    save_model(broken.components, path)
    out = tmp_path / "o.png"
    code = main(["generate", "a", "--model", str(path), "--steps", "2", "--size", "32x32", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "weights are broken" in err and not out.exists(), err
    status, _, body = Server(broken, "nan").handle("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "steps": 2}')
    assert status != 200 and "NaN" in json.loads(body)["detail"]


def test_guidance_rescale_of_a_constant_prediction_stays_finite():
    guided, cond = torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(rescale_guidance(guided, cond, 0.7), guided)
    with pytest.raises(ValueError, match="finite"):
        cfg_denoiser(lambda x, s, c: x, {}, float("inf"))


# --- input images ---------------------------------------------------------------------------------------

def _png_declaring(path, width: int, height: int, rows: int = 1):
    """A PNG of one colour whose header declares width x height; its data holds `rows` rows (all of them
    when rows == height: a complete, valid image, compressed about 1000:1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + gray pixels
    data = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding an image's pixels fails the test: the refusals below must come from the header alone."""
    def load(self):
        raise AssertionError(f"decoded a {self.size} image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_an_image_declaring_20000x20000_is_refused_from_its_header(tmp_path, no_decoding):
    bomb = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 5000  # a few KB that would decode to 400 MB (1.2 GB as RGB)
    for limits in (Limits(), Limits.unlimited()):  # PIL's decompression-bomb guard holds under any limits
        with pytest.raises(ValueError, match=r"bomb\.png declares too many pixels .*400000000 pixels"):
            load_image(bomb, "RGB", limits)
        with pytest.raises(ValueError, match=r"bomb\.png declares too many pixels .*400000000 pixels"):
            load_mask(bomb, limits)
    bomb = _png_declaring(tmp_path / "bomb2.png", 10000, 10000)  # 100 MP: inside PIL's warning zone
    with pytest.raises(ValueError, match=r"bomb2\.png declares too many pixels"):
        load_image(bomb, "RGB", Limits.unlimited())
    for fields in ({"task": "img2img", "init_image": bomb},
                   {"task": "inpaint", "init_image": Image.new("RGB", (32, 32)), "mask": bomb}):
        with pytest.raises(ValueError, match="bomb2.png"):
            GenerationRequest(**fields).validate(TINY)


def test_a_complete_8000x8000_png_is_refused_before_decoding(tmp_path, no_decoding):
    big = _png_declaring(tmp_path / "big.png", 8000, 8000, rows=8000)  # a valid PNG: 64 MP in ~70 KB
    assert big.stat().st_size < 200_000
    for load in (load_image, load_mask):
        with pytest.raises(LimitError, match=r"big\.png is 8000x8000 .*--max-input-pixels"):
            load(big)
    with pytest.raises(LimitError, match="big.png"):
        GenerationRequest(task="img2img", init_image=big).validate(TINY)
    with pytest.raises(LimitError, match="upload"):
        open_image(big.open("rb"), "upload")


def test_input_images_within_the_limit_load(tmp_path):
    small = _png_declaring(tmp_path / "small.png", 64, 48, rows=48)
    assert load_image(small, "RGB", Limits(max_input_pixels=64 * 48)).size == (64, 48)
    with pytest.raises(LimitError):
        load_image(small, "RGB", Limits(max_input_pixels=64 * 48 - 1))
    with pytest.raises(LimitError, match="in-memory"):  # a PIL image is held to the same bound
        load_image(Image.new("RGB", (64, 48)), "RGB", Limits(max_input_pixels=100))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"junk\.png is not a readable image"):
        load_image(junk)
    with pytest.raises(ValueError, match="file path or a PIL image"):
        load_image(12345)


# --- settings read from a PNG ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["random:sd15", "/dev/zero", "../models/x.safetensors", "~/m.ckpt"])
def test_png_parameters_never_select_a_random_model_or_a_path(model):
    settings = settings_from_parameters(f"a cat\nSteps: 2, Seed: 1, Size: 32x32, Model: {model}")
    assert settings.model is None
    assert any(model in note for note in settings.ignored), settings.ignored
    name = settings_from_parameters("a\nSteps: 2, Seed: 1, Size: 32x32, Model: v1-5-pruned-emaonly").model
    assert name == "v1-5-pruned-emaonly"  # a name stays: the command tells whether it is available


def test_from_png_naming_random_sd15_does_not_build_it(tmp_path, capsys, monkeypatch):
    import daguerre.registry

    opened = []
    real_open = daguerre.registry.open_model

    def open_model(spec=None, **kw):
        opened.append(spec)
        return real_open("random:tiny", **kw)

    monkeypatch.setattr(daguerre.registry, "open_model", open_model)
    png = tmp_path / "in.png"
    text = "a cat\nSteps: 2, Sampler: Euler, Seed: 3, Size: 32x32, Model: random:sd15"
    save_png(Image.new("RGB", (32, 32)), png, text)
    code = main(["generate", "--from-png", str(png), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "random:sd15" not in opened and "random:sd15" in err  # the note names what was ignored


def test_png_size_with_non_ascii_digits_is_an_error_naming_it():
    with pytest.raises(ValueError, match="Size"):
        settings_from_parameters("a\nSteps: 2, Seed: 1, Size: ²x²")
