"""One request schema (issue 14): `GenerationRequest`'s field table drives every surface, and `validate`
returns the frozen `ValidRequest` that alone reaches the pipelines.

The surface tests walk the table, so a field added with a `cli`, `a1111` or `png` face is checked here
without an edit to this file: its flag must exist on the command of each of its tasks and be read back,
its payload keys must be accepted and read, its PNG key must round-trip. The samples below set every
such field away from its default; a field they miss fails the coverage assertions by name.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json

import pytest
from PIL import Image

import daguerre
from daguerre.cli import COMMANDS, main
from daguerre.commands.request_args import request_fields
from daguerre.config import preset
from daguerre.pipelines.fields import TASKS, surface
from daguerre.pipelines.infotext import settings_from_parameters, write_parameters
from daguerre.pipelines.request import GenerationRequest, ValidRequest
from daguerre.pipelines.txt2img import txt2img
from daguerre.pngmeta import format_parameters
from daguerre.server.app import Server
from daguerre.server.payload import FIELDS, request_from_payload

TINY = preset("tiny")
COMMAND = {"txt2img": "generate", "img2img": "img2img", "inpaint": "inpaint", "upscale": "upscale"}


def _names(face: str, task: str | None = None) -> set[str]:
    """The fields with a face on a surface (for a task)."""
    return {f.name for f in dataclasses.fields(GenerationRequest)
            if f.metadata.get(face) is not None and (task is None or task in f.metadata["tasks"])}


def _class_config():
    cfg = preset("tiny")
    cfg.conditioning, cfg.text_encoder, cfg.unet.context_dim = "class", None, None
    cfg.unet.num_classes, cfg.class_names = 3, ["circle", "square", "none"]
    return cfg


def _spatial_configs():
    """A semantic-synthesis and a layout model's configs (issue 18: their fields are --semantic, --layout, --box)."""
    from daguerre.config import LayoutConfig
    from daguerre.data.shapes import LABELS, LAYOUT_WORDS

    semantic = preset("tiny")
    semantic.concat, semantic.semantic_labels, semantic.unet.in_channels = "semantic", list(LABELS), 4 + len(LABELS)
    layout = preset("tiny")
    layout.conditioning = "layout"
    layout.unet.layout = LayoutConfig(vocabulary=LAYOUT_WORDS, width=32, heads=2, layers=1, mlp_dim=64)
    return semantic, layout


def _gligen_config():
    """A GLIGEN adapter model's config (issue 18, route 2: its field is --layout-steps)."""
    from daguerre.config import GligenConfig

    cfg = preset("tiny")
    cfg.conditioning, cfg.unet.gligen = "gligen", GligenConfig(phrase_dim=32, hidden=32)
    return cfg


SEMANTIC, LAYOUT = _spatial_configs()
MAP = Image.new("RGB", (16, 16), (128, 0, 0))  # all "circle" in the palette of docs/layout.md


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- PNG parameters --------------------------------------------------------------------------------------

PNG_SAMPLES = [  # (config, request): together they set every field with a PNG key away from its default
    (TINY, GenerationRequest(prompt="a (red:1.2) cat, with: colons", negative_prompt='blurry, "quoted"', steps=3,
                             sampler="Euler a", schedule="Karras", cfg_scale=5.5, seed=42, width=16, height=24,
                             clip_skip=2, guidance_rescale=0.25, eta=0.5)),
    (_class_config(), GenerationRequest(class_label="square", steps=2, sampler="DDIM", eta=0.3, seed=1)),
    (_class_config(), GenerationRequest(class_label=1, steps=2, seed=1)),
    (TINY, GenerationRequest(prompt="a cat", steps=2, seed=3, cfg_min_sigma=1.5, cfg_cutoff_sigma=0.75,
                             deepcache_interval=2, deepcache_depth=2, deepcache_max_sigma=3.5, tome_ratio=0.5)),
    (TINY, GenerationRequest(prompt="a cat", steps=2, seed=3, clip_guidance=250.0, clip_model="my-clip.safetensors",
                             cutouts=4, clip_repeats=2)),
    (SEMANTIC, GenerationRequest(prompt="a red circle", steps=2, seed=3, semantic_map=MAP)),
    (LAYOUT, GenerationRequest(prompt="", steps=2, seed=3, layout=[{"phrase": "a red circle", "box": [0, 0, 0.5, 1]}],
                               boxes=["blue square:0.5,0.5,1,1"])),
    (_gligen_config(), GenerationRequest(prompt="a cat", steps=2, seed=3, boxes=["blue square:0.5,0.5,1,1"],
                                         layout_steps=0.3)),
    (TINY, GenerationRequest(prompt="a cat", steps=2, seed=3, hires_scale=1.5, hires_upscaler="Latent (bicubic)",
                             hires_steps=3, hires_strength=0.4)),
    (TINY, GenerationRequest(prompt="a cat", steps=2, seed=3, hires_width=48, hires_height=32)),
]


@pytest.mark.parametrize(("config", "request_"), PNG_SAMPLES)
def test_every_png_field_round_trips_through_the_parameters_text(config, request_):
    valid = request_.validate(config)
    prompt, negative, params = write_parameters(valid, config.name, "0123456789")
    read = settings_from_parameters(format_parameters(prompt, negative, params), "sample")
    assert read.model == config.name and read.model_hash == "0123456789" and read.ignored == []
    assert set(read.fields) <= _names("png")
    again = GenerationRequest(**read.fields).validate(config)
    assert write_parameters(again, config.name, "0123456789") == (prompt, negative, params)
    # the sampler and schedule are written resolved (A1111 names, "Automatic" as the schedule it picks)
    assert again.choice == valid.choice
    for name in _names("png") - {"sampler", "schedule"}:
        assert getattr(again, name) == getattr(valid, name), name


def test_the_png_samples_cover_every_png_field():
    covered = set()
    for config, request_ in PNG_SAMPLES:
        prompt, negative, params = write_parameters(request_.validate(config), config.name, None)
        covered |= set(settings_from_parameters(format_parameters(prompt, negative, params)).fields)
    assert covered == _names("png")


def test_the_table_writes_a1111_order_and_the_model_after_the_size():
    valid = PNG_SAMPLES[0][1].validate(TINY)
    prompt, negative, params = write_parameters(valid, "m", "0123456789")
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                            "Clip skip", "Guidance rescale", "Eta"]
    assert format_parameters(prompt, negative, params) == (
        'a (red:1.2) cat, with: colons\nNegative prompt: blurry, "quoted"\nSteps: 3, Sampler: Euler a, Schedule type: '
        "Karras, CFG scale: 5.5, Seed: 42, Size: 16x24, Model hash: 0123456789, Model: m, Clip skip: 2, "
        "Guidance rescale: 0.25, Eta: 0.5")


# --- the command line ------------------------------------------------------------------------------------

def _parser(task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    COMMANDS[COMMAND[task]][1](parser)
    return parser


@pytest.mark.parametrize("task", TASKS)
def test_every_cli_flag_of_a_task_is_on_its_command(task):
    parser = _parser(task)
    options = {s for a in parser._actions for s in a.option_strings}
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    for f, flag in surface(GenerationRequest, "cli", task):
        assert set(flag.names) <= (positionals if flag.positional else options), (f.name, flag.names)
    other = {n for t in TASKS if t != task for _, flag in surface(GenerationRequest, "cli", t) for n in flag.names}
    mine = {n for _, flag in surface(GenerationRequest, "cli", task) for n in flag.names}
    assert not (other - mine) & options  # a flag of another task's fields is not offered


ARGV = {
    "txt2img": ["--semantic=map.png", "--layout", "l.json", "--box", "a red circle:0,0,1,1", "--layout-steps", "0.3",
                "--hires-scale", "2", "--hires-size", "64x48", "--hires-upscaler", "latent-bicubic", "--hires-steps",
                "4", "--hires-denoise", "0.3"],
    "img2img": ["in.png", "--strength", "0.5", "--resize", "fit"],
    "inpaint": ["in.png", "m.png", "--strength", "0.5", "--resize", "fit", "--mask-blur", "2", "--fill",
                "latent-noise", "--only-masked", "--only-masked-padding", "8"],
    "upscale": ["in.png", "--strength", "0.5", "--resize", "fit", "--scale", "3", "--noise-level", "5"],
}
COMMON_ARGV = ["a cat", "-N", "blurry", "--steps", "3", "--sampler", "Euler", "--schedule", "Karras", "--cfg", "5",
               "--seed", "7", "--size", "16x24", "--class", "1", "--clip-skip", "2", "--cfg-min-sigma", "1.5",
               "--cfg-cutoff", "0.5", "--deepcache", "2", "--deepcache-depth", "2", "--deepcache-max-sigma", "3",
               "--tome", "0.5", "--fast", "--clip-guidance", "--clip", "my-clip", "--cutouts", "4",
               "--clip-repeats", "3", "--eta", "0.5", "--n", "2", "--batch-size", "2", "--tile", "--lora",
               "x.safetensors:0.5"]


@pytest.mark.parametrize("task", TASKS)
def test_every_cli_flag_is_read_into_its_field(task):
    argv = ARGV[task][:2 if task == "inpaint" else 1] + COMMON_ARGV + ARGV[task][2 if task == "inpaint" else 1:]
    fields = request_fields(_parser(task).parse_args(argv), task)
    assert set(fields) == _names("cli", task)
    request = GenerationRequest(task=task, **fields)
    for name in fields:  # each flag moved its field away from the default
        assert getattr(request, name) != getattr(GenerationRequest(), name), name
    assert (request.width, request.height, request.prompt, request.tile) == (16, 24, "a cat", True)
    if task == "inpaint":
        assert (request.inpaint_fill, request.inpaint_area, request.mask) == ("latent noise", "only masked", "m.png")


def test_flags_left_out_keep_the_request_defaults():
    assert request_fields(_parser("inpaint").parse_args(["in.png", "m.png"]), "inpaint") == {
        "init_image": "in.png", "mask": "m.png"}


# --- AUTOMATIC1111 payloads ------------------------------------------------------------------------------

def test_every_payload_key_of_the_table_is_accepted_by_its_endpoints():
    for f, payload in surface(GenerationRequest, "a1111"):
        tasks = f.metadata["tasks"]
        for key in payload.keys:
            assert ("txt2img" not in tasks) or FIELDS["txt2img"].get(key) == "map", (f.name, key)
            if {"img2img", "inpaint"} & set(tasks):
                assert FIELDS["img2img"].get(key) == "map", (f.name, key)


def test_every_payload_field_is_read():
    image, mask = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (32, 32), 255)
    txt2img_payload = {"prompt": "a", "negative_prompt": "b", "steps": 3, "sampler_name": "Euler",
                       "scheduler": "Karras", "cfg_scale": 5, "seed": 7, "width": 16, "height": 24, "eta": 0.5,
                       "s_min_uncond": 1.5, "cfg_cutoff_sigma": 0.5, "deepcache_interval": 2, "deepcache_depth": 2,
                       "deepcache_max_sigma": 3.0, "tome_ratio": 0.5, "fast": True, "clip_guidance": 250,
                       "clip_model": "shapes-clip", "cutouts": 4, "clip_repeats": 3,
                       "override_settings": {"CLIP_stop_at_last_layers": 2}, "batch_size": 2, "n_iter": 2}
    inpaint_payload = {**txt2img_payload, "init_images": [_b64(image)], "denoising_strength": 0.5, "resize_mode": 2,
                       "mask": _b64(mask), "mask_blur": 2, "inpainting_fill": 2, "inpaint_full_res": True,
                       "inpaint_full_res_padding": 8}
    read = {}
    spatial_payload = {**txt2img_payload, "semantic_map": _b64(image),
                       "layout": [{"phrase": "a red circle", "box": [0, 0, 1, 1]}], "layout_steps": 0.3,
                       "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 4,
                       "hr_resize_x": 64, "hr_resize_y": 48, "denoising_strength": 0.3}
    for payload, endpoint in ((spatial_payload, "txt2img"), (inpaint_payload, "img2img")):
        request = request_from_payload(payload, endpoint, settings={"CLIP_stop_at_last_layers": (1,)})
        names = _names("a1111", request.task)
        read |= {name: getattr(request, name) for name in names}
        for name in names:
            assert getattr(request, name) != getattr(GenerationRequest(), name), name
    assert set(read) == _names("a1111")
    assert (read["n"], read["batch_size"], read["inpaint_fill"], read["resize_mode"]) == (4, 2, "latent noise", "fit")


# --- ValidRequest: checked once, the only request the pipelines take ----------------------------------

def test_a_valid_request_is_frozen_and_resolved():
    valid = GenerationRequest(prompt="x", steps=4, sampler="DPM++ 2M Karras", n=3).validate(TINY)
    assert isinstance(valid, ValidRequest) and valid.config == TINY
    assert (valid.sampler, valid.choice.a1111_name, valid.choice.a1111_schedule) == ("DPM++ 2M Karras", "DPM++ 2M",
                                                                                     "Karras")
    assert list(valid.seeds) == [valid.seed, valid.seed + 1, valid.seed + 2] and valid.sampler_steps == 4
    assert valid.sigmas.dtype.is_floating_point and len(valid.sigmas) == 5 and float(valid.sigmas[-1]) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        valid.steps = 9
    image = Image.new("RGB", (37, 34))
    valid = GenerationRequest(task="img2img", init_image=image, strength=0.5, steps=4).validate(TINY)
    assert isinstance(valid.init_image, Image.Image)  # loaded, center-cropped to the model's grid
    assert valid.init_image.size == (valid.width, valid.height) == (36, 32)
    assert valid.sampler_steps == 3  # A1111's img2img tail: int(0.5 x 4) + 1 steps


def test_pipelines_take_only_a_valid_request_of_their_task_and_model():
    comps = daguerre.load("random:tiny").components
    with pytest.raises(TypeError, match="takes a ValidRequest.*validate it first"):
        txt2img(comps, GenerationRequest(prompt="x", steps=1))
    img2img_request = GenerationRequest(task="img2img", init_image=Image.new("RGB", (32, 32)), steps=1)
    with pytest.raises(ValueError, match="a img2img request given to the txt2img pipeline"):
        txt2img(comps, img2img_request.validate(comps.config))
    other = dataclasses.replace(comps.config, name="other", sample_size=64)
    with pytest.raises(ValueError, match="validated for model 'other'"):
        txt2img(comps, GenerationRequest(steps=1).validate(other))


@pytest.fixture
def counted(monkeypatch):
    """How often requests are validated and sampler names resolved."""
    import daguerre.diffusion.sampler_names as names

    calls = {"validate": 0, "resolve": 0}
    validate, resolve = GenerationRequest.validate, names.resolve_sampler

    def counting_validate(self, *args, **kwargs):
        calls["validate"] += 1
        return validate(self, *args, **kwargs)

    def counting_resolve(*args, **kwargs):
        calls["resolve"] += 1
        return resolve(*args, **kwargs)

    monkeypatch.setattr(GenerationRequest, "validate", counting_validate)
    monkeypatch.setattr(names, "resolve_sampler", counting_resolve)
    return calls


def test_the_api_validates_once_and_resolves_the_sampler_once(counted):
    pipe = daguerre.load("random:tiny")
    assert len(pipe("x", steps=2, seed=1, n=3, batch_size=2, sampler="Euler a")) == 3
    assert counted == {"validate": 1, "resolve": 1}
    valid = pipe.request("x", steps=2, seed=1)
    assert pipe.request(valid) is valid  # a valid request of this model and limits is not checked again
    assert pipe(valid)[0].seed == 1 and counted == {"validate": 2, "resolve": 2}


def test_the_server_validates_once_and_resolves_the_sampler_once(counted):
    server = Server(daguerre.load("random:tiny"), "random:tiny")
    body = json.dumps({"prompt": "x", "steps": 2, "seed": 1, "batch_size": 2, "n_iter": 2}).encode()
    status, _, raw = server.handle("POST", "/sdapi/v1/txt2img", body)
    assert status == 200 and len(json.loads(raw)["images"]) == 4
    assert counted == {"validate": 1, "resolve": 1}


def test_the_cli_validates_once_and_resolves_the_sampler_once(counted, tmp_path, capsys):
    assert main(["generate", "x", "--model", "random:tiny", "--steps", "2", "--n", "2", "-o", str(tmp_path)]) == 0
    assert counted == {"validate": 1, "resolve": 1}
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["img2img", str(image), "--model", "random:tiny", "--steps", "2", "-o", str(tmp_path / "o.png")]) == 0
    assert counted == {"validate": 2, "resolve": 2}


def test_from_png_replays_the_class_of_a_class_conditional_image(tmp_path):
    """The Class key is read back like every PNG field: replaying a class-conditional image needs no --class."""
    text = format_parameters("", "", {"Steps": 2, "Seed": 3, "Size": "16x16", "Class": "square"})
    fields = settings_from_parameters(text).fields
    assert fields["class_label"] == "square"
    valid = GenerationRequest(**fields).validate(_class_config())
    assert valid.class_index == 1
