"""PNG `parameters` chunk: format/parse round trips, an AUTOMATIC1111-written example, file I/O, and
the mapping to GenerationRequest fields that `--from-png` uses."""

from __future__ import annotations

import pytest
from PIL import Image

from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pngmeta import format_parameters, parse_parameters, read_png_parameters, save_png

PARAMS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": 42,
    "Size": "512x768", "Model hash": "0123456789", "Model": "sd15",
}

PROMPTS = [
    ("a cat", ""),
    ("a cat, sitting on a mat, (masterpiece:1.2)", "blurry, lowres"),
    ("time: 5:30, ratio 16:9", "text: watermark"),
    ('a "quoted" word, and \'single\' quotes', 'no "quotes"'),
    ("first line\nsecond line, with comma", "neg line 1\nneg line 2"),
    ("Steps are nice: a staircase", ""),  # looks like a key but is on a prompt line
    ("unicode ünïcödé 猫, emoji 🐱", "низкое качество"),
    ("", "only a negative"),
]


@pytest.mark.parametrize("prompt,negative", PROMPTS)
def test_round_trip(prompt, negative):
    text = format_parameters(prompt, negative, PARAMS)
    got_prompt, got_negative, got = parse_parameters(text)
    assert (got_prompt, got_negative) == (prompt, negative)
    assert got == {k: str(v) for k, v in PARAMS.items()}
    assert ("Negative prompt:" in text) == bool(negative)


@pytest.mark.parametrize("value", ["a, b", "key: value", "line\nbreak", 'has "quotes", and a comma', "C:\\models\\x"])
def test_values_with_separators_round_trip(value):
    text = format_parameters("p", "", {"Steps": 5, "Model": value, "Seed": 1})
    assert parse_parameters(text)[2] == {"Steps": "5", "Model": value, "Seed": "1"}


def test_none_values_are_dropped():
    text = format_parameters("p", "", {"Steps": 5, "Clip skip": None, "Seed": 1, "Size": "8x8"})
    assert "Clip skip" not in text and parse_parameters(text)[2] == {"Steps": "5", "Seed": "1", "Size": "8x8"}


A1111_EXAMPLE = (
    "masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0'
)


def test_a1111_example_parses():
    prompt, negative, params = parse_parameters(A1111_EXAMPLE)
    assert prompt == "masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.5>"
    assert negative == "lowres, bad anatomy, (worst quality:1.4)"
    assert params["Sampler"] == "DPM++ 2M Karras"
    assert params["Size"] == "512x768" and params["Seed"] == "1234567890" and params["Clip skip"] == "2"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"  # a JSON-quoted value
    assert params["Version"] == "v1.6.0" and len(params) == 13


def test_a1111_example_to_request_fields():
    settings = settings_from_parameters(A1111_EXAMPLE)
    assert settings.fields == {
        "prompt": "masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.5>",
        "negative_prompt": "lowres, bad anatomy, (worst quality:1.4)",
        "steps": 28, "sampler": "DPM++ 2M Karras", "cfg_scale": 7.0, "seed": 1234567890,
        "width": 512, "height": 768, "clip_skip": 2,
        "hires_scale": 2.0, "hires_upscaler": "Latent", "hires_strength": 0.7,  # the hires fix (pipelines/hires.py)
    }
    assert settings.model == "v1-5-pruned-emaonly" and settings.model_hash == "6ce0161689"
    # the LoRA is applied again from the prompt's <lora:...> tag: its hash only names the file (docs/lora.md)
    assert settings.ignored == []


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"x\.png: Steps 'many' is not a whole number"):
        settings_from_parameters("p\nSteps: many, Seed: 1, Size: 8x8", "x.png")
    with pytest.raises(ValueError, match="Size '8 by 8' is not WIDTHxHEIGHT"):
        settings_from_parameters("p\nSteps: 2, Seed: 1, Size: 8 by 8")


def test_save_and_read_png(tmp_path):
    text = format_parameters("a cat, (b:1.2)", "dog", PARAMS)
    path = save_png(Image.new("RGB", (4, 4), (10, 20, 30)), tmp_path / "a.png", text)
    assert read_png_parameters(path) == text
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no generation parameters"):
        read_png_parameters(tmp_path / "plain.png")
    with pytest.raises(FileNotFoundError):
        read_png_parameters(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        read_png_parameters(tmp_path / "junk.png")
