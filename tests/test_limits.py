"""daguerre.limits: the work estimate equals PyTorch's FLOP count of the real networks, costs no torch,
every bound refuses what it should with an error naming value, limit and flag, and the default limits
accept every ordinary request (Stable Diffusion at its sizes, the shipped models at their defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import daguerre
from daguerre.config import ModelConfig, preset
from daguerre.limits import (
    DEFAULT_LIMITS,
    LimitError,
    Limits,
    add_limit_arguments,
    limits_from_args,
    request_work,
    text_tflop,
    unet_tflop,
    vae_tflop,
)
from daguerre.models.tokenizer import CLIPTokenizer
from daguerre.pipelines.prompts import chunk_bound, tokenize_chunks
from daguerre.pipelines.request import GenerationRequest
from daguerre.registry import shipped_models

TINY = preset("tiny")  # sample_size 32: a model whose native size is 32 px


# --- the estimate is PyTorch's own FLOP count -------------------------------------------------------

def _flop_count(module: torch.nn.Module, *inputs) -> float:
    """TFLOP of module(*inputs) as torch.utils.flop_counter counts it (the reference the arithmetic follows)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 1e12


def _reference_unet(cfg, h: int, w: int, context: int) -> float:
    from daguerre.models.unet import UNetModel

    with torch.device("meta"):  # shapes only: the real SD U-Net, without its 3.4 GB of weights
        unet = UNetModel(cfg)
        ctx = torch.zeros(1, context, cfg.context_dim) if cfg.context_dim else None
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        return _flop_count(unet, torch.zeros(1, cfg.in_channels, h, w), torch.zeros(1), ctx, y)


UNETS = {
    "tiny": TINY.unet,
    "sd15": preset("sd15").unet,  # 1x1-conv projections, 8 heads
    "sd21": preset("sd21").unet,  # linear projections, 64-wide heads
    "class, depth 2": dataclasses.replace(TINY.unet, context_dim=None, num_classes=5, num_heads=2, head_dim=None,
                                          channel_mult=(1, 2, 2), attention_levels=(0, 2), transformer_depth=2,
                                          use_linear_proj=True),
}


@pytest.mark.parametrize("name", UNETS)
@pytest.mark.parametrize(("h", "w", "context"), [(8, 12, 77), (5, 7, 154)])  # odd sizes: ceil at each Downsample
def test_unet_estimate_is_torch_flop_count(name, h, w, context):
    cfg = UNETS[name]
    assert unet_tflop(cfg, h, w, context) == pytest.approx(_reference_unet(cfg, h, w, context), rel=1e-12)


@pytest.mark.parametrize("cfg", [TINY.vae, preset("sd15").vae,
                                 dataclasses.replace(TINY.vae, attn_levels=(0, 1), channel_mult=(1, 2, 2))],
                         ids=["tiny", "sd15", "attention levels"])
def test_vae_estimate_is_torch_flop_count(cfg):
    from daguerre.models.autoencoder import Decoder, Encoder

    h, w, f = 4, 6, cfg.downsample_factor
    with torch.device("meta"):
        decode = _flop_count(Decoder(cfg), torch.zeros(1, cfg.latent_channels, h, w))
        encode = _flop_count(Encoder(cfg), torch.zeros(1, cfg.in_channels, h * f, w * f))
    assert vae_tflop(cfg, h, w, False) == pytest.approx(decode, rel=1e-12)
    assert vae_tflop(cfg, h, w, True) == pytest.approx(decode + encode, rel=1e-12)


def test_text_encoder_estimate_is_torch_flop_count():
    from daguerre.models.text_encoder import CLIPTextEncoder

    cfg = TINY.text_encoder
    with torch.device("meta"):
        count = _flop_count(CLIPTextEncoder(cfg), torch.zeros(1, cfg.max_length, dtype=torch.long), 0, False)
    assert text_tflop(cfg) == pytest.approx(count, rel=1e-12)


def test_request_work_adds_up_its_networks():
    cfg = preset("sd15")
    unet, vae, text = unet_tflop(cfg.unet, 64, 64, 77), vae_tflop(cfg.vae, 64, 64, False), text_tflop(cfg.text_encoder)
    got = request_work(cfg, width=512, height=512, steps=20, n=3, guided=True)
    assert got == pytest.approx(2 * text + 3 * (20 * 2 * unet + vae))
    assert 30 < got / 3 < 40  # SD 1.5 at 512x512, 20 steps: the ~36 TFLOP the flags' help quotes
    unguided = request_work(cfg, width=512, height=512, steps=20, n=1, guided=False)
    assert unguided == pytest.approx(text + 20 * unet + vae)


def test_request_work_is_arithmetic_without_torch():
    """The estimate is counted on the config: validate stays fast (no network is built, torch not even imported)."""
    code = ("import sys; from daguerre.config import preset; from daguerre.limits import request_work; "
            "w = request_work(preset('sd15'), width=2048, height=2048, steps=1000, n=100, guided=True, encodes=True); "
            "assert w > 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_long_prompts_are_counted_as_the_context_they_make():
    """Each 77-token chunk lengthens the cross-attention context: a prompt of 1200 BREAKs is 1200 chunks."""
    tok = CLIPTokenizer()
    for text in ["", "a cat", "a red cat, " * 60, "cat " * 300, "a BREAK b BREAK", "日本語の猫, " * 80, "BREAK " * 50]:
        assert chunk_bound(text) >= len(tokenize_chunks(tok, text)), text
    breaks = "x BREAK " * 1200  # 9600 characters: under the prompt length limit
    assert len(tokenize_chunks(tok, breaks)) == 1200 <= chunk_bound(breaks)
    cfg = preset("sd15")
    plain = request_work(cfg, width=512, height=512, steps=20, n=1, guided=True)
    assert request_work(cfg, width=512, height=512, steps=20, n=1, guided=True, prompt_chunks=6) < 1.1 * plain
    GenerationRequest(prompt="x", width=512, height=512, steps=20, n=4).validate(cfg)
    with pytest.raises(LimitError, match="TFLOP"):  # 92k tokens of context: ~10x the work of each image
        GenerationRequest(prompt=breaks, width=512, height=512, steps=20, n=4).validate(cfg)


# --- each bound -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "says"), [
    ({"width": 100000, "height": 100000}, ["100000x100000", "--max-pixels"]),
    ({"n": 1000000}, ["1000000 images", "--max-images"]),
    ({"steps": 1001}, ["1001 steps", "limit of 1000", "--max-steps"]),
    ({"width": 256, "height": 256, "n": 100, "batch_size": 100}, ["batch size 100", "--max-batch-pixels"]),
    ({"width": 2048, "height": 2048}, ["2048x2048", "8x its native 32 px", "--max-pixels"]),  # a 32-px model
    ({"width": 256, "height": 256, "steps": 1000, "n": 100}, ["TFLOP", "--max-work"]),
    ({"prompt": "a" * 10001}, ["10001 characters", "--max-prompt-chars"]),
    ({"negative_prompt": "a" * 10001}, ["negative prompt", "--max-prompt-chars"]),
])
def test_each_default_bound_refuses_naming_value_and_flag(fields, says):
    with pytest.raises(LimitError) as e:
        GenerationRequest(**{"steps": 20, **fields}).validate(TINY)
    assert all(s in str(e.value) for s in says), str(e.value)
    GenerationRequest(**{"steps": 20, **fields}).validate(TINY, Limits.unlimited())  # the opt-out


def test_the_work_bound_counts_attention_not_just_pixels():
    """With the pixel bound raised to 2048x2048, a 32-px model is refused there by its work alone."""
    raised = dataclasses.replace(DEFAULT_LIMITS, max_pixels=2048 * 2048)
    GenerationRequest(width=2048, height=2048, steps=20).validate(TINY, dataclasses.replace(raised,
                                                                                            max_work=float("inf")))
    with pytest.raises(LimitError, match="TFLOP"):
        GenerationRequest(width=2048, height=2048, steps=20).validate(TINY, raised)
    assert request_work(TINY, width=2048, height=2048, steps=20, n=1, guided=True) > DEFAULT_LIMITS.max_work
    assert request_work(TINY, width=32, height=32, steps=20, n=1, guided=True) < 0.01  # at its own size


ORDINARY = [  # (preset, request fields) that daguerre must run under the default limits
    ("sd15", {"width": 512, "height": 512, "n": 4, "steps": 20}),
    ("sd15", {"width": 512, "height": 512, "n": 4, "batch_size": 4, "steps": 20, "prompt": "a photo, " * 150}),
    ("sd15", {"width": 768, "height": 512, "n": 2, "steps": 30, "sampler": "Euler a"}),
    ("sd15", {"width": 1024, "height": 1024, "steps": 20}),
    ("sd21", {"width": 768, "height": 768, "n": 2, "steps": 25}),
    ("sd21-base", {"width": 512, "height": 512, "n": 4, "steps": 20}),
    ("tiny", {"n": 100, "steps": 50}),
]


@pytest.mark.parametrize(("name", "fields"), ORDINARY)
def test_default_limits_accept_ordinary_requests(name, fields):
    GenerationRequest(**fields).validate(preset(name))


def test_default_limits_accept_img2img_and_inpaint_at_sd_sizes():
    from PIL import Image

    image, mask = Image.new("RGB", (512, 512), "gray"), Image.new("L", (512, 512), 255)
    for task in ("img2img", "inpaint"):
        GenerationRequest(task=task, init_image=image, mask=mask if task == "inpaint" else None, n=4,
                          steps=20).validate(preset("sd15-inpaint" if task == "inpaint" else "sd15"))


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_default_limits_accept_the_shipped_models_at_their_defaults(name):
    with safe_open(str(shipped_models()[name]), "pt") as f:
        config = ModelConfig.from_dict(json.loads(f.metadata()["daguerre_config"]))
    from daguerre.conditioning import conditioner_for
    from daguerre.data.layout import LabelMap

    side = config.sample_size  # a semantic-synthesis model needs its map (all background will do)
    blank = torch.zeros(side, side, dtype=torch.uint8).numpy()
    label_map = LabelMap.from_array(blank) if conditioner_for(config).concat.takes_map else None
    req = GenerationRequest(prompt="a red circle", n=16, semantic_map=label_map).validate(config)
    assert req.width == config.sample_size and req.steps == config.defaults.get("steps", 20)


# --- the Python API and the flags ------------------------------------------------------------------------

def test_daguerre_load_applies_default_limits_unless_given_others():
    pipe = daguerre.load("random:tiny")
    assert pipe.limits == DEFAULT_LIMITS
    with pytest.raises(LimitError, match="--max-pixels"):
        pipe.request("a", width=2048, height=2048)
    with pytest.raises(LimitError, match="6 steps"):
        daguerre.load("random:tiny", limits=Limits(max_steps=5)).request("a", steps=6)
    pipe.limits = Limits.unlimited()
    assert pipe.request("a", width=2048, height=2048).width == 2048  # checked, not run
    with pytest.raises(ValueError, match="pipeline's"):
        pipe("a", limits=Limits.unlimited())
    with pytest.raises(ValueError, match="Limits"):
        daguerre.load("random:tiny", limits={"max_steps": 5})


def test_flags_make_limits_and_refuse_non_positive_values():
    p = argparse.ArgumentParser()
    add_limit_arguments(p)
    assert limits_from_args(p.parse_args([])) == DEFAULT_LIMITS
    args = p.parse_args(["--max-pixels", "10", "--max-batch-pixels", "20", "--max-images", "3", "--max-steps", "4",
                         "--max-work", "0.5", "--max-input-pixels", "6", "--max-prompt-chars", "7"])
    assert limits_from_args(args) == Limits(10, 20, 3, 4, 0.5, 6, 7)
    for bad in ("0", "-1", "nan", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--max-work", bad])


def test_the_pixel_bound_follows_the_model_unless_set():
    """By default one image may have 2048x2048 pixels, and at most 8x the model's native size per side: the
    shipped 64-px shapes model takes A1111 clients' default 512x512, not the 2048x2048 that once held a server
    for minutes; --max-pixels replaces both."""
    shapes = dataclasses.replace(TINY, sample_size=64)
    GenerationRequest(width=512, height=512, steps=1).validate(shapes)
    with pytest.raises(LimitError, match=r"2048x2048 .* this model's limit of 0.262 MP \(8x its native 64 px"):
        GenerationRequest(width=2048, height=2048, steps=1).validate(shapes)
    assert DEFAULT_LIMITS.pixel_limit(512) == DEFAULT_LIMITS.pixel_limit(None) == 2048 * 2048  # SD: the slider's
    assert Limits(max_pixels=10**8).pixel_limit(64) == 10**8
