"""Packed weights in the models daguerre opens (registry.prepare_for_inference_, precision.uses_packed_weights):
bf16 on a CPU packs the U-Net's Conv2d and Linear layers and makes the same images bit for bit; float32 keeps
torch's layers untouched, and so does the VAE (its large convolutions gained nothing)."""

from __future__ import annotations

import pytest
import torch

import daguerre
from daguerre import precision
from daguerre.components import PARTS
from daguerre.nn.conv import MIN_PACKED_CHANNELS, PackedConv2d, PackedLinear, is_pack_ready, packing_pays, unpack_

SETTINGS = dict(steps=3, n=2, batch_size=2, seed=5, width=64, height=64)
needs_onednn = pytest.mark.skipif(not packing_pays(torch.bfloat16, "cpu"), reason="no oneDNN packed kernels")


@pytest.fixture
def tiny_counts_as_large(monkeypatch):
    """The rule packs U-Nets that are not small (SD-sized); the tiny test model stands in for one."""
    monkeypatch.setattr(precision, "SMALL_MODEL_PARAMETERS", 0)


def pixels(results) -> list[bytes]:
    return [r.image.tobytes() for r in results]


def packed_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, (PackedConv2d, PackedLinear))]


@needs_onednn
def test_bf16_packs_and_makes_the_same_images(tiny_model_file, tiny_counts_as_large):
    pipe = daguerre.load(str(tiny_model_file), dtype="bf16")
    unet, vae = pipe.components.unet, pipe.components.vae
    n_layers = sum(isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and min(
        m.in_channels, m.out_channels) >= MIN_PACKED_CHANNELS) for m in unet.modules())
    assert len(packed_layers(unet)) == n_layers and not packed_layers(vae)
    assert type(unet.input_blocks[0][0]) is torch.nn.Conv2d  # 4 latent channels in: kept (measured slower)
    assert "oneDNN-packed weights" in precision.describe_run(unet)
    got = pipe("a red circle", **SETTINGS)
    assert any(m.is_packed() for m in packed_layers(unet))  # the run packed them
    plain = daguerre.load(str(tiny_model_file), dtype="bf16")
    assert unpack_(plain.components.unet) > 0
    assert not is_pack_ready(plain.components.unet)
    assert pixels(got) == pixels(plain("a red circle", **SETTINGS))
    # a one-shot run reads its networks again from the file (packed alike) between runs: the same images
    one_shot = daguerre.load(str(tiny_model_file), dtype="bf16", release_after_use=True)
    assert pixels(one_shot("a red circle", **SETTINGS)) == pixels(got)
    assert pixels(one_shot("a red circle", **SETTINGS)) == pixels(got)
    assert not any(one_shot.components.resident(part) for part in PARTS)


@needs_onednn
def test_a_lora_merged_into_a_packed_model_is_used(tiny_model_file, tiny_counts_as_large):
    """Merging writes through `.weight` (lora/apply.py): the packed layer hands its weight out and computes with
    what is written, so the image changes exactly as it does on the plain model."""
    pipe = daguerre.load(str(tiny_model_file), dtype="bf16")
    plain = daguerre.load(str(tiny_model_file), dtype="bf16")
    unpack_(plain.components.unet)
    pipe("a red circle", **SETTINGS)  # packed first
    name = next(n for n, m in pipe.components.unet.named_modules() if isinstance(m, PackedConv2d))
    assert pipe.components.unet.get_submodule(name).is_packed()
    for p in (pipe, plain):
        layer = p.components.unet.get_submodule(name)
        layer.weight.data = layer.weight.detach() * 1.5
    assert pixels(pipe("a red circle", **SETTINGS)) == pixels(plain("a red circle", **SETTINGS))


def test_fp32_keeps_torchs_layers(tiny_model_file, tiny_counts_as_large):
    pipe = daguerre.load(str(tiny_model_file), dtype="fp32")
    assert not is_pack_ready(pipe.components.unet) and not is_pack_ready(pipe.components.vae)
    assert not precision.uses_packed_weights(torch.float32, "cpu")


def test_small_models_keep_torchs_layers(tiny_model_file):
    pipe = daguerre.load(str(tiny_model_file), dtype="bf16")  # the tiny model is small: not measured, not packed
    assert not is_pack_ready(pipe.components.unet)
