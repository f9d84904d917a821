"""bench/conv_forms.py: the convolution forms measured equal F.conv2d; daguerre.nn.conv: the packed layers equal
nn.Conv2d / nn.Linear bit for bit in bfloat16 while holding their weights once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conv_forms  # noqa: E402  (the forms bench/conv_shapes.py times; daguerre runs none of them)
from daguerre.nn.conv import PackedConv2d, PackedLinear, pack_for_inference_, packing_pays

CL = torch.channels_last
needs_onednn = pytest.mark.skipif(not packing_pays(torch.bfloat16, "cpu"), reason="no oneDNN packed kernels")
# (batch, in, out, height, width, kernel, stride, padding): the U-Net's 3x3 s1 p1 and s2 p1 (Downsample), the
# VAE's s2 p0 (after its own padding), 1x1 skips and projections, at odd and non-square sizes
SHAPES = [(2, 8, 6, 7, 5, 3, 1, 1), (1, 16, 4, 9, 9, 3, 2, 1), (2, 8, 6, 7, 6, 3, 2, 0), (2, 5, 3, 4, 7, 1, 1, 0),
          (1, 3, 8, 11, 3, 3, 1, 1)]


def _inputs(b, c, o, h, w, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(o, c, k, k, generator=g) / (c * k * k) ** 0.5).to(dtype).contiguous(memory_format=CL)
    return x, weight, torch.randn(o, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forms_equal_conv2d(shape, dtype):
    b, c, o, h, w, k, s, p = shape
    x, weight, bias = _inputs(b, c, o, h, w, k, dtype)
    ref = F.conv2d(x.float(), weight.float(), bias.float(), stride=s, padding=p)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: a few roundings of outputs of size ~1-3
    outs = {"im2col": conv_forms.im2col_conv2d(x, weight, bias, s, p, max_elements=40)}  # several bands
    if s == 1:
        outs["shifted"] = conv_forms.shifted_conv2d(x, weight, bias, p)
    if k == 1 and s == 1 and p == 0:
        outs["1x1"] = conv_forms.conv1x1_as_linear(x, weight, bias)
    for name, y in outs.items():
        assert y.shape == ref.shape and y.dtype == dtype, name
        assert y.is_contiguous(memory_format=CL), name  # channels_last out
        err = (y.float() - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()) * (4 if name == "shifted" else 1), (name, err)


def test_im2col_bands_do_not_change_the_result():
    x, weight, bias = _inputs(2, 8, 6, 9, 7, 3, torch.float32)
    whole = conv_forms.im2col_conv2d(x, weight, bias, 1, 1, max_elements=1 << 20)
    for limit in (1, 72, 200):  # one row per band (the minimum), and bands of a few rows
        assert torch.equal(conv_forms.im2col_conv2d(x, weight, bias, 1, 1, max_elements=limit), whole)


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_packed_conv_equals_conv2d_bit_for_bit(shape, channels_last):
    b, c, o, h, w, k, s, p = shape
    x, weight, bias = _inputs(b, c, o, h, w, k, torch.bfloat16)
    if not channels_last:
        x = x.contiguous()
    layer = nn.Conv2d(c, o, k, stride=s, padding=p).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    ref = layer(x)
    packed = PackedConv2d.of(layer)
    with torch.inference_mode():
        y = packed(x)
        assert packed.is_packed()
        assert torch.equal(y, ref)
        assert y.is_contiguous(memory_format=CL) == ref.is_contiguous(memory_format=CL)
        assert y.stride() == ref.stride()
        # another input shape packs again (a layout for one shape can be 200x slower at another)
        x2 = torch.randn(1, c, h + 3, w + 1, dtype=torch.bfloat16).contiguous(memory_format=CL)
        assert torch.equal(packed(x2), F.conv2d(x2, weight, bias, stride=s, padding=p))
        assert packed._packed_for == tuple(x2.shape)


@needs_onednn
@pytest.mark.parametrize("rows", [(2,), (3, 7), (2, 5, 4)])
def test_packed_linear_equals_linear_bit_for_bit(rows):
    layer = nn.Linear(24, 40).to(torch.bfloat16)
    plain = nn.Linear(24, 40, bias=False).to(torch.bfloat16)
    x = torch.randn(*rows, 24, dtype=torch.bfloat16)
    refs = layer(x), plain(x)
    with torch.inference_mode():
        for ref, packed in zip(refs, (PackedLinear.of(layer), PackedLinear.of(plain)), strict=True):
            assert torch.equal(packed(x), ref)
            assert packed.is_packed()


@needs_onednn
def test_packed_layer_holds_one_copy_and_gives_the_weight_back():
    layer = nn.Conv2d(16, 32, 3, padding=1).to(torch.bfloat16).to(memory_format=CL)
    weight = layer.weight.detach().clone()
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=CL)
    packed = PackedConv2d.of(layer)
    count = sum(p.numel() for p in packed.parameters())
    with torch.inference_mode():
        packed(x)
    param = packed._parameters["weight"]
    assert param.stride() == (0, 0, 0, 0) and param.untyped_storage().nbytes() <= param.element_size()  # no copy
    assert sum(p.numel() for p in packed.parameters()) == count and param.dtype == torch.bfloat16
    assert torch.equal(packed.state_dict()["weight"], weight)  # a checkpoint written from it is the model
    assert packed.is_packed()  # state_dict does not unpack
    assert torch.equal(packed.stored_weight(), weight) and packed.stored_weight().is_contiguous(memory_format=CL)


@needs_onednn
def test_a_weight_changed_through_dot_weight_is_used():
    """What a LoRA merge does (lora/apply.py: `param = layer.weight; param.data = merged`)."""
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    packed = PackedLinear.of(layer)
    with torch.inference_mode():
        packed(x)
    param = packed.weight
    assert not packed.is_packed()
    merged = param.detach() * 2
    param.data = merged
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, merged, layer.bias))
        assert packed.is_packed()  # packed again, from the merged values
        assert torch.equal(packed(x), F.linear(x, merged, layer.bias))


@needs_onednn
def test_other_dtypes_and_gradients_take_torchs_call():
    layer = nn.Conv2d(4, 6, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    packed = PackedConv2d.of(layer)
    with torch.inference_mode():
        packed(x)
    packed.float()  # unpacks, then casts: float32 is torch's call, bit for bit
    assert not packed.is_packed() and packed.weight.dtype == torch.float32
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(packed.state_dict())
    xf = x.float().requires_grad_()
    assert torch.equal(packed(xf), ref(xf))
    packed.to(torch.bfloat16)
    out = packed(x)  # gradients on (the weight requires them): torch's call, and they flow
    out.sum().backward()
    assert packed.weight.grad is not None and not packed.is_packed()


def test_packing_is_for_bf16_on_a_cpu_only():
    assert not packing_pays(torch.float32, "cpu")
    assert not packing_pays(torch.float16, "cpu")
    assert not packing_pays(torch.bfloat16, "cuda")


@needs_onednn
def test_a_packed_unet_equals_the_plain_one_bit_for_bit():
    from daguerre.config import preset
    from daguerre.models.unet import UNetModel

    torch.manual_seed(0)
    model = UNetModel(preset("tiny").unet).to(torch.bfloat16).to(memory_format=CL).eval()
    for p in model.parameters():  # the zero-initialised output layers random too, so every layer counts
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, model.cfg.in_channels, 16, 16, dtype=torch.bfloat16).contiguous(memory_format=CL)
    t = torch.tensor([999, 10])
    ctx = torch.randn(2, 5, model.cfg.context_dim, dtype=torch.bfloat16) if model.cfg.context_dim else None
    with torch.inference_mode():
        ref = model(x, t, ctx)
        n = pack_for_inference_(model)
        assert n == sum(isinstance(m, (PackedConv2d, PackedLinear)) for m in model.modules()) > 0
        assert pack_for_inference_(model) == 0  # idempotent
        assert torch.equal(model(x, t, ctx), ref)
        assert torch.equal(model(x, t, ctx), ref)  # the packed weights reused


@needs_onednn
def test_released_to_meta_without_unpacking():
    """Components.release moves a network to the meta device: a packed layer drops its packed weight there
    instead of unpacking it first (a memory pass over the whole U-Net for nothing)."""
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    packed = PackedLinear.of(layer)
    with torch.inference_mode():
        packed(torch.randn(2, 8, dtype=torch.bfloat16))
    packed._unpack = lambda: pytest.fail("unpacked on the way to the meta device")
    packed.to("meta")
    assert not packed.is_packed() and packed._parameters["weight"].is_meta
    assert packed._parameters["weight"].shape == (8, 8)
