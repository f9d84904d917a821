"""The GLIGEN adapter (issue 18, route 2; models/gligen.py): gates at zero leave the shipped shapes model exactly
unchanged, with or without boxes; the grounding tokens (Fourier features, the null token of padding objects); the
adapter trains alone on a frozen base (loss falls, base weights bit for bit), resumes exactly and saves in the
model file; scheduled sampling gives the layout to the first steps only; the CLI draws, records and replays it."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.components import build_components
from daguerre.conditioning import GligenConditioner, GroundedSteps, conditioner_for
from daguerre.config import GligenConfig, ModelConfig
from daguerre.data.layout import LayoutObject
from daguerre.models.gligen import (
    GROUNDING_FIELDS,
    GatedSelfAttention,
    Grounding,
    adapter_parameters,
    box_overlaps,
    fourier_features,
    gate_parameters,
    grounding_tensor,
    null_grounding,
    phrase_embeddings,
)
from daguerre.models.unet import UNetModel
from daguerre.pipelines.request import GenerationRequest
from daguerre.pipelines.txt2img import txt2img
from daguerre.pngmeta import parse_parameters, read_png_parameters
from daguerre.training.config import derive_model_config, load_run_config
from daguerre.weights.io import file_hash

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "daguerre" / "assets" / "configs"
SHAPES = ROOT / "src" / "daguerre" / "assets" / "models" / "shapes.safetensors"
QUICK = ["train.progress=false", "data.n=8", "data.holdout=4", "train.batch_size=4", "train.steps=6",
         "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1", "train.warmup_steps=0"]


def _with_gligen(config: ModelConfig, gligen: GligenConfig) -> ModelConfig:
    return dataclasses.replace(config, conditioning="gligen", unet=dataclasses.replace(config.unet, gligen=gligen))


def _open_gates(unet: torch.nn.Module, value: float = 0.5) -> None:
    with torch.no_grad():
        for p in gate_parameters(unet):
            p.fill_(value)


# --- the adapter at zero: the base model, exactly -------------------------------------------------------

def test_closed_gates_leave_the_shipped_shapes_model_unchanged_bit_for_bit():
    from daguerre.checkpoints import load_model

    base = load_model(SHAPES)
    cfg = base.config.unet
    unet = UNetModel(dataclasses.replace(cfg, gligen=GligenConfig(phrase_dim=base.config.text_encoder.width)))
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert not unexpected and missing and all(n.startswith("position_net.") or ".fuser." in n for n in missing)
    unet = unet.to(base.unet.dtype).eval()
    phrases = phrase_embeddings(base.text_encoder, base.tokenizer, ["a red circle", "a big blue square"])
    assert phrases.shape == (2, 96)
    layout = grounding_tensor([(0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9)], phrases, 4)[None]
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 96, generator=gen)
    t = torch.tensor([900.0, 120.0])
    with torch.no_grad():
        want = base.unet(x, t, ctx)
        assert torch.equal(unet(x, t, ctx), want)  # no boxes: the adapter does not run
        assert torch.equal(unet(x, t, ctx, layout=layout.expand(2, -1, -1)), want)  # boxes, gates at tanh(0) = 0
        _open_gates(unet)
        assert not torch.equal(unet(x, t, ctx, layout=layout.expand(2, -1, -1)), want)  # the test can fail
        assert torch.equal(unet(x, t, ctx), want)


def test_visual_positions_start_at_zero_and_give_each_position_its_cells_box_features():
    """The option's positions are the Fourier features of each cell as a box, in the boxes' own coordinates (a box
    equal to a cell gets the same features), row by row; behind closed gates they change nothing (the base model
    exactly), at zero the layers are GLIGEN's, and otherwise the adapter's output depends on them; without the
    option the adapter has no such parameters."""
    from daguerre.models.gligen import cell_boxes

    cells = cell_boxes(2, 4)
    assert torch.equal(cells[5], torch.tensor([0.25, 0.5, 0.5, 1.0]))  # row 1, column 1 of 2 x 4
    assert torch.equal(fourier_features(cells, 8)[5], fourier_features(torch.tensor([0.25, 0.5, 0.5, 1.0]), 8))
    base_cfg = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    gligen = GligenConfig(phrase_dim=base_cfg.text_encoder.width, hidden=32)
    plain = UNetModel(_with_gligen(base_cfg, gligen).unet)
    assert not any(".fuser.position." in n for n, _ in adapter_parameters(plain))
    torch.manual_seed(0)
    unet = UNetModel(_with_gligen(base_cfg, dataclasses.replace(gligen, visual_positions=True)).unet).eval()
    positions = [p for n, p in adapter_parameters(unet) if ".fuser.position." in n]
    assert positions and all(p.any() for p in positions if p.dim() == 2)  # initialised, not zero
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, base_cfg.unet.context_dim, generator=gen)
    layout = grounding_tensor([(0.1, 0.1, 0.4, 0.4)], torch.randn(1, gligen.phrase_dim, generator=gen), 4)[None]
    t = torch.tensor([500.0])
    with torch.no_grad():  # gates closed: the base model's output, whatever the positions
        assert torch.equal(unet(x, t, ctx, layout=layout), unet(x, t, ctx))
        for p in positions:
            p.zero_()
    missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".fuser.position." in n for n in missing)
    _open_gates(unet)
    for p in unet.parameters():  # the zero-initialised output layers would hide every difference
        if not p.any() and p.dim() > 0 and p not in set(positions):
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        zero = unet(x, t, ctx, layout=layout)
        plain.load_state_dict(unet.state_dict(), strict=False)
        assert torch.equal(plain(x, t, ctx, layout=layout), zero)  # positions at 0: GLIGEN's layers exactly
        for p in positions:
            torch.nn.init.normal_(p, std=0.5)
        assert not torch.allclose(unet(x, t, ctx, layout=layout), zero)


def test_attend_objects_acts_only_through_the_boxes():
    """`attend = "objects"`: no feed-forward branch (no parameters of one); closed gates = the base model;
    opened, the adapter changes the output and one phrase in two different boxes gives two different outputs;
    a value other than "all", "objects" or "boxes" is refused by key."""
    base_cfg = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    gligen = GligenConfig(phrase_dim=base_cfg.text_encoder.width, hidden=32, visual_positions=True, attend="objects")
    torch.manual_seed(0)
    unet = UNetModel(_with_gligen(base_cfg, gligen).unet).eval()
    names = [n for n, _ in adapter_parameters(unet)]
    assert not any(".fuser.ff." in n or n.endswith("alpha_dense") for n in names)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, base_cfg.unet.context_dim, generator=gen)
    phrase = torch.randn(1, gligen.phrase_dim, generator=gen)
    a = grounding_tensor([(0.0, 0.0, 0.4, 0.4)], phrase, 4)[None]
    b = grounding_tensor([(0.6, 0.6, 1.0, 1.0)], phrase, 4)[None]
    t = torch.tensor([500.0])
    for p in unet.parameters():  # the zero-initialised output layers would hide every difference
        if not p.any() and p.dim() > 0:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        assert torch.equal(unet(x, t, ctx, layout=a), plain)  # gates closed
        _open_gates(unet)
        ya, yb = unet(x, t, ctx, layout=a), unet(x, t, ctx, layout=b)
        assert not torch.allclose(ya, plain) and not torch.allclose(ya, yb)
    with pytest.raises(ValueError, match="attend"):
        load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", ["model.unet.gligen.attend='some'"])


def test_box_overlaps_marks_the_cells_a_box_covers_and_no_padding():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.3, 0.3, 0.35, 0.35], [0.0, 0.0, 1.0, 1.0]]])
    inside = box_overlaps(boxes, torch.tensor([[1.0, 1.0, 0.0]]), 4, 4).reshape(4, 4, 3)  # (row, column, object)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, :2] = True  # x in [0, 0.5), y in [0, 0.25): the top row's first two cells; not the edge's neighbours
    assert torch.equal(inside[..., 0], expected)
    small = torch.zeros(4, 4, dtype=torch.bool)
    small[1, 1] = True  # a box smaller than a cell marks the cell it lies in
    assert torch.equal(inside[..., 1], small)
    assert not inside[..., 2].any()  # padding (mask 0) is nowhere


def test_attend_boxes_changes_only_the_positions_in_the_boxes():
    """`attend = "boxes"`: the gated layer adds to a position only if an object's box overlaps its cell; elsewhere
    each token attends to itself alone, which the layer's output still changes (the self slot), the same
    whatever the objects are; a box moved moves the change."""
    torch.manual_seed(0)
    from daguerre.models.unet import CrossAttention

    dim, ctx_dim, h, w = 32, 16, 4, 4
    layer = GatedSelfAttention(dim, ctx_dim, CrossAttention(dim, dim, 2, 16, 0.0, False), None, attend="boxes").eval()
    with torch.no_grad():
        layer.alpha_attn.fill_(0.5)
    x = torch.randn(2, h * w, dim)
    tokens = torch.randn(2, 2, ctx_dim)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    left = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]])
    right = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        a = layer(x, Grounding(tokens, torch.stack([left, left]), mask), (h, w)).reshape(2, h, w, dim)
        other = layer(x, Grounding(torch.randn(2, 2, ctx_dim), torch.stack([left, left]), mask), (h, w))
        b = layer(x, Grounding(tokens, torch.stack([right, right]), mask), (h, w)).reshape(2, h, w, dim)
        alone = layer(x, Grounding(tokens, torch.stack([left, left]), torch.zeros(2, 2)), (h, w)).reshape(2, h, w, dim)
        with pytest.raises(ValueError, match="box masks need the map"):
            layer(x, Grounding(tokens, torch.stack([left, left]), mask), None)
    other = other.reshape(2, h, w, dim)
    # outside its box an object changes nothing: those positions are as with no object at all
    assert torch.equal(a[:, :, 2:], alone[:, :, 2:]) and torch.equal(b[:, :, :2], alone[:, :, :2])
    assert torch.equal(a[:, :, 2:], other[:, :, 2:])
    # inside, the object is read: another object, or none, gives another output
    assert not torch.allclose(a[:, :, :2], alone[:, :, :2]) and not torch.allclose(a[:, :, :2], other[:, :, :2])
    assert not torch.allclose(b[:, :, 2:], alone[:, :, 2:])


def test_extra_levels_add_gated_layers_where_there_is_no_transformer():
    """`extra_levels`: a `GroundingLayer` after each ResNet block of the level (shapes: 16x16, 2 down + 3 up); closed
    gates leave the shipped model exactly as it is; an object changes the map only in its box (rows from y,
    columns from x: the layer's reshapes keep the map's orientation)."""
    from daguerre.checkpoints import load_model
    from daguerre.config import check_model_config
    from daguerre.models.unet import GroundingLayer

    base = load_model(SHAPES)
    gligen = GligenConfig(phrase_dim=96, attend="boxes", visual_positions=True, extra_levels=(0,))
    unet = UNetModel(dataclasses.replace(base.config.unet, gligen=gligen))
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, GroundingLayer)]
    assert [n for n, _ in layers] == ["input_blocks.1.1", "input_blocks.2.1", "output_blocks.6.1",
                                      "output_blocks.7.1", "output_blocks.8.1"]
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert not unexpected and {n for n in missing} == {n for n, _ in adapter_parameters(unet)}
    unet = unet.to(base.unet.dtype).eval()
    phrases = phrase_embeddings(base.text_encoder, base.tokenizer, ["a red circle"])
    layout = grounding_tensor([(0.1, 0.1, 0.4, 0.4)], phrases, 4)[None].expand(2, -1, -1)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 96, generator=gen)
    t = torch.tensor([900.0, 120.0])
    with torch.no_grad():
        want = base.unet(x, t, ctx)
        assert torch.equal(unet(x, t, ctx, layout=layout), want)
        for _, layer in layers:
            layer.fuser.alpha_attn.fill_(0.5)
        assert not torch.equal(unet(x, t, ctx, layout=layout), want)  # the new layers act (the test can fail)
        assert torch.equal(unet(x, t, ctx), want)  # and not without a layout

        layer = layers[0][1].float()
        h = torch.randn(2, 64, 16, 16)
        boxes = torch.tensor([[0.0, 0.0, 0.5, 0.25]]).expand(2, 4, 4).contiguous()
        mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(2, 4)
        tokens = torch.randn(2, 4, 96)
        with_object = layer(h, Grounding(tokens, boxes, mask))
        without = layer(h, Grounding(tokens, boxes, torch.zeros(2, 4)))
    changed = (with_object - without).abs().amax(dim=(0, 1)) > 0  # (H, W)
    want_changed = torch.zeros(16, 16, dtype=torch.bool)
    want_changed[:4, :8] = True  # y in [0, 0.25): rows 0-3; x in [0, 0.5): columns 0-7
    assert torch.equal(changed, want_changed)
    with pytest.raises(ValueError, match="extra_levels"):
        check_model_config(dataclasses.replace(base.config, conditioning="gligen", unet=dataclasses.replace(
            base.config.unet, gligen=dataclasses.replace(gligen, extra_levels=(1,)))))


def test_in_box_features_say_where_each_cell_lies_in_each_box():
    """Each cell's centre relative to each box (0 at its left or top edge, 1 at its right or bottom), as sin and cos
    of pi k u and pi k v, k = 1..freqs, in the order [sin u, sin v, cos u, cos v] per frequency, cells row by row."""
    from daguerre.models.gligen import in_box_features

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]]])  # (B, N, 4)
    f = in_box_features(boxes, 2, 2, 3)  # cell centres (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)
    assert f.shape == (1, 4, 2, 12)
    rel = torch.tensor([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5]])  # in box 0 (0.5 wide, 0.5 high)
    for k in (1, 2, 3):
        got = f[0, :, 0, 4 * (k - 1):4 * k]
        torch.testing.assert_close(got, torch.cat([torch.sin(math.pi * k * rel), torch.cos(math.pi * k * rel)], -1))
    # box 1: 0.75 wide from x 0.25, 0.5 high from y 0.5; the cell at (0.75, 0.75) is its centre in y, 2/3 across
    torch.testing.assert_close(f[0, 3, 1, :4], torch.tensor([math.sin(math.pi * 2 / 3), 1.0,
                                                             math.cos(math.pi * 2 / 3), 0.0]), atol=1e-6, rtol=0)


def test_shape_freqs_let_an_object_vary_inside_its_box_and_start_as_without_them():
    """`shape_freqs`: each object's value at a position also reads where the position lies in its box (a small
    MLP, `fuser.shape`, its output layer at zero): at first the layer is the one without the option exactly;
    with the MLP trained (random here), one object changes the positions of its box differently from one another
    beyond what the attention weights do, and still changes nothing outside its box. With attend 'all' the option
    is refused, by its config key."""
    from daguerre.models.unet import CrossAttention

    torch.manual_seed(0)
    dim, ctx_dim, h, w = 32, 16, 4, 4

    def layer(freqs: int) -> GatedSelfAttention:
        torch.manual_seed(0)
        return GatedSelfAttention(dim, ctx_dim, CrossAttention(dim, dim, 2, 16, 0.0, False), None, attend="boxes",
                                  shape_freqs=freqs).eval()

    plain, shaped = layer(0), layer(4)
    assert {n for n, _ in shaped.named_parameters()} - {n for n, _ in plain.named_parameters()} == {
        "shape.0.weight", "shape.0.bias", "shape.2.weight", "shape.2.bias"}
    with torch.no_grad():
        for m in (plain, shaped):
            m.alpha_attn.fill_(0.5)
    x = torch.randn(1, h * w, dim)
    box = torch.tensor([[[0.0, 0.0, 0.5, 1.0]]])  # the left half
    objs = Grounding(torch.randn(1, 1, ctx_dim), box, torch.ones(1, 1))
    with torch.no_grad():
        assert torch.equal(shaped(x, objs, (h, w)), plain(x, objs, (h, w)))  # the MLP's output starts at zero
        torch.nn.init.normal_(shaped.shape[2].weight, std=0.5)
        got = shaped(x, objs, (h, w)).reshape(h, w, dim)
        want = plain(x, objs, (h, w)).reshape(h, w, dim)
        twin = x.reshape(h, w, dim).clone()
        twin[:, 1] = twin[:, 0]  # columns 0 and 1, both in the box, hold the same image token
        twin = twin.reshape(1, h * w, dim)
        shaped_twin = shaped(twin, objs, (h, w)).reshape(h, w, dim)
        plain_twin = plain(twin, objs, (h, w)).reshape(h, w, dim)
    assert torch.equal(got[:, 2:], want[:, 2:])  # outside the box: as without the option
    assert not torch.allclose(got[:, :2], want[:, :2])
    # without visual positions one token gets the same attention weights anywhere in the box: without the option
    # the object adds the same there; with it, what it adds depends on the place
    torch.testing.assert_close(plain_twin[:, 0], plain_twin[:, 1])
    assert not torch.allclose(shaped_twin[:, 0], shaped_twin[:, 1])
    with pytest.raises(ValueError, match="shape_freqs"):
        load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm",
                        ["model.unet.gligen.attend='all'", "model.unet.gligen.shape_freqs=4"])


def test_grounding_tokens_are_fourier_features_and_phrases_with_a_null_token_for_padding():
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    f = fourier_features(boxes, 8)
    assert f.shape == (1, 64)
    k = 3  # frequency 100^(3/8): [sin x0..y1, cos x0..y1] at offset 8k
    freq = 100.0 ** (k / 8)
    torch.testing.assert_close(f[0, 8 * k:8 * k + 4], torch.sin(freq * boxes[0]))
    torch.testing.assert_close(f[0, 8 * k + 4:8 * k + 8], torch.cos(freq * boxes[0]))
    phrases = torch.randn(2, 6)
    g = grounding_tensor([(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0)], phrases, 3)
    assert g.shape == (3, GROUNDING_FIELDS + 6) and g[:, 4].tolist() == [1.0, 1.0, 0.0]
    assert torch.equal(g[2], torch.zeros(GROUNDING_FIELDS + 6)) and torch.equal(g[:2, 5:], phrases)
    with pytest.raises(ValueError, match="3 objects; this model takes at most 2"):
        grounding_tensor([(0, 0, 1, 1)] * 3, torch.zeros(3, 6), 2)
    from daguerre.models.gligen import GroundingNet

    net = GroundingNet(GligenConfig(phrase_dim=6, hidden=16), 8)
    with torch.no_grad():
        net.null_positive_feature.normal_()
        net.null_position_feature.normal_()
        other = g.clone()
        other[2, :4], other[2, 5:] = torch.rand(4), torch.randn(6)  # a padding row's contents do not matter
        assert torch.equal(net(g[None]), net(other[None]))
        nulls = net(null_grounding(GligenConfig(max_objects=3, phrase_dim=6))[None])
        torch.testing.assert_close(nulls[0, 0], net(g[None])[0, 2])  # every padding object: the learned null token


def test_phrase_pools_are_the_end_last_and_mean_token_states_concatenated():
    """`phrase_pool` parts, checked against the encoder's own hidden states: "eot" is the pooled output GLIGEN
    reads, "last" the token before the end token, "mean" the phrase's tokens between start and end."""
    from daguerre.checkpoints import load_model

    base = load_model(SHAPES)
    te, tok = base.text_encoder, base.tokenizer
    phrases = ["a red circle", "a big blue square", ""]
    got = phrase_embeddings(te, tok, phrases, ("eot", "last", "mean"))
    assert got.shape == (3, 3 * 96) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, :96], phrase_embeddings(te, tok, phrases))  # the default: GLIGEN's pooling
    ids = tok(phrases)
    with torch.no_grad():
        hidden = te(ids, skip_layers=0).hidden.float()
    for i, text in enumerate(phrases):
        n = len(tok.encode(text))  # the phrase's tokens, at positions 1..n
        torch.testing.assert_close(got[i, :96], hidden[i, n + 1])  # the end token follows them
        torch.testing.assert_close(got[i, 96:192], hidden[i, n])
        torch.testing.assert_close(got[i, 192:], hidden[i, 1:n + 1].mean(0) if n else hidden[i, 0])
    assert phrase_embeddings(te, tok, [], ("last", "mean")).shape == (0, 192)
    run = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm")
    cfg = _with_gligen(derive_model_config(run, 3, None), GligenConfig(phrase_dim=64, phrase_pool=("eot", "last")))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    for bad in (["last", "last"], [], ["first"]):
        with pytest.raises(ValueError, match="config key unet.gligen.phrase_pool"):
            ModelConfig.from_dict({**cfg.to_dict(), "unet": {**cfg.to_dict()["unet"], "gligen": {
                **cfg.to_dict()["unet"]["gligen"], "phrase_pool": bad}}})


def test_a_gligen_config_needs_a_text_model_and_says_its_route():
    base = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    cfg = _with_gligen(base, GligenConfig(phrase_dim=base.text_encoder.width))
    assert ModelConfig.from_json(cfg.to_json()) == cfg and conditioner_for(cfg).kind == "gligen"
    with pytest.raises(ValueError, match="config key conditioning: 'text' with unet.gligen set"):
        ModelConfig.from_dict({**cfg.to_dict(), "conditioning": "text"})
    with pytest.raises(ValueError, match="config key unet.gligen.fourier_freqs: 0 is out of range"):
        ModelConfig.from_dict({**cfg.to_dict(), "unet": {**cfg.to_dict()["unet"], "gligen": {
            **cfg.to_dict()["unet"]["gligen"], "fourier_freqs": 0}}})


# --- scheduled sampling ----------------------------------------------------------------------------------

def test_scheduled_sampling_gives_the_layout_to_the_first_steps_only():
    base = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    cfg = _with_gligen(base, GligenConfig(phrase_dim=base.text_encoder.width))
    box = ["a red circle:0.1,0.1,0.5,0.5"]
    seen: list[bool] = []

    def fake(x, sigma, cond=None):
        seen.append("layout" in (cond or {}))
        return x

    for fraction, grounded in ((0.3, 3), (0.25, 3), (0.0, 0), (1.0, 10)):
        req = GenerationRequest(boxes=box, steps=10, layout_steps=fraction, sampler="Euler").validate(cfg)
        denoiser = conditioner_for(cfg).scheduled(fake, req)
        assert (denoiser is fake) == (fraction == 1.0)
        seen.clear()
        for i in range(10):
            denoiser(torch.zeros(2, 1), req.sigmas[i], {"layout": torch.zeros(2, 1), "context": None})
        assert seen == [True] * grounded + [False] * (10 - grounded), fraction
        assert grounded == math.ceil(fraction * 10)
    wrapped = GroundedSteps(fake, 1.0)
    seen.clear()
    wrapped(torch.zeros(2, 1), torch.tensor([2.0, 0.5]), {"layout": 1})  # a batch half above: grounded
    assert seen == [True]
    for bad, message in ((1.5, "layout steps must be a fraction in \\[0, 1\\]"), (-0.1, "fraction")):
        with pytest.raises(ValueError, match=message):
            GenerationRequest(boxes=box, layout_steps=bad).validate(cfg)
    with pytest.raises(ValueError, match="layout steps 0.5: model 'tiny' has no GLIGEN adapter"):
        GenerationRequest(layout_steps=0.5).validate(base)
    with pytest.raises(ValueError, match="the layout has 5 objects; model 'tiny' takes at most 4"):
        GenerationRequest(boxes=box * 5).validate(cfg)
    with pytest.raises(ValueError, match="does not draw from a layout"):
        GenerationRequest(boxes=box).validate(base)


def test_a_gligen_model_draws_the_base_models_image_without_boxes_or_with_no_layout_steps():
    base_cfg = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    cfg = _with_gligen(base_cfg, GligenConfig(phrase_dim=base_cfg.text_encoder.width, hidden=32))
    base = build_components(base_cfg, seed=1)
    comps = build_components(cfg, seed=2)
    comps.unet.load_state_dict(base.unet.state_dict(), strict=False)
    comps.text_encoder.load_state_dict(base.text_encoder.state_dict())
    comps.vae.load_state_dict(base.vae.state_dict())
    for p in comps.unet.parameters():  # zero-initialised output layers would make every U-Net draw the same
        if not p.any() and p.dim() > 0:
            torch.nn.init.normal_(p, std=0.05)
    base.unet.load_state_dict(comps.unet.state_dict(), strict=False)
    _open_gates(comps.unet)

    def image(components, config, **fields):
        req = GenerationRequest("a red circle", steps=4, seed=5, sampler="Euler", **fields).validate(config)
        return np.asarray(txt2img(components, req)[0].image)

    box = ["a blue square:0.2,0.2,0.8,0.8"]
    want = image(base, base_cfg)
    assert np.array_equal(image(comps, cfg), want)  # no boxes: the base model
    assert np.array_equal(image(comps, cfg, boxes=box, layout_steps=0.0), want)  # grounded on no step
    grounded = image(comps, cfg, boxes=box)
    assert not np.array_equal(grounded, want)
    assert not np.array_equal(image(comps, cfg, boxes=box, layout_steps=0.5), grounded)
    pooled_cfg = _with_gligen(base_cfg, GligenConfig(phrase_dim=2 * base_cfg.text_encoder.width, hidden=32,
                                                     phrase_pool=("last", "mean")))
    pooled = build_components(pooled_cfg, seed=2)  # the pipeline embeds the phrases as the model's config says
    pooled.unet.load_state_dict({k: v for k, v in comps.unet.state_dict().items()
                                 if not k.startswith("position_net.")}, strict=False)
    for name in ("text_encoder", "vae"):
        getattr(pooled, name).load_state_dict(getattr(comps, name).state_dict())
    _open_gates(pooled.unet)
    assert not np.array_equal(image(pooled, pooled_cfg, boxes=box), want)


# --- training, resume, save and load, the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def base_model(vae_file, tmp_path_factory) -> Path:
    """A tiny text model (tiny_ldm.toml, random weights, its zero-initialised layers made non-zero) on `vae_file`."""
    from daguerre.checkpoints import save_model

    cfg = load_run_config(CONFIGS / "tiny_ldm.toml", "ldm")
    cfg.model.vae = derive_model_config(load_run_config(CONFIGS / "tiny_vae.toml", "vae"), 3, None).vae
    comps = build_components(derive_model_config(cfg, 3, None), seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for p in comps.unet.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    comps.config.provenance = {"vae_sha256": file_hash(vae_file)}
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    save_model(comps, path, dtype=torch.float16)  # as the shipped models, and the runs' files (train.save_dtype)
    return path


def _gligen_run(base_model: Path, extra: tuple[str, ...] = ()):
    return load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", [*QUICK, f"train.init_from={base_model}", *extra])


def test_the_adapter_trains_alone_on_the_frozen_base_and_is_saved_in_the_model_file(tmp_path, vae_file, base_model):
    from daguerre.checkpoints import load_model
    from daguerre.training.ldm import train_ldm

    base = load_model(base_model)
    cfg = _gligen_run(base_model, ("train.steps=60", "train.lr=3e-3", "train.min_lr=3e-3", "data.n=4",
                                   "train.ema_decay=0"))
    path = train_ldm(cfg, tmp_path / "run", vae_path=vae_file)
    model = load_model(path)
    assert model.config.conditioning == "gligen" and model.config.unet.gligen.phrase_dim == 32
    trained = model.unet.state_dict()
    for name, tensor in base.unet.state_dict().items():
        assert torch.equal(trained[name], tensor), name  # the base U-Net bit for bit
    assert model.config.text_encoder == base.config.text_encoder  # the frozen text encoder is the base's, its
    ours, theirs = model.text_encoder.state_dict(), base.text_encoder.state_dict()  # vocabulary included (unpruned)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    adapter = dict(adapter_parameters(model.unet))
    assert any(n.startswith("position_net.") for n in adapter) and any(".fuser.alpha_attn" in n for n in adapter)
    assert any(float(p.detach()) != 0 for n, p in adapter.items() if n.endswith("alpha_attn"))  # the gates opened
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 60
    assert sum(losses[-20:]) < 0.9 * sum(losses[:20])  # the adapter alone learns (1.13 to 0.95 a step when written)
    n_adapter = sum(p.numel() for p in adapter.values())  # the start-up line counts what is trained: the adapter
    assert re.search(rf"stage 2: U-Net {n_adapter / 1e6:.2f} M \(of [0-9.]+ M: the rest frozen\) parameters trained, "
                     "gligen conditioning", (tmp_path / "run" / "train.log").read_text())


def test_the_gates_learn_at_gate_lr_scale_times_the_rate_and_resume_so(tmp_path, vae_file, base_model):
    """With train.gate_lr_scale the gates sit in their own AdamW group whose learning rate is the schedule's x the
    scale: in 4 steps they move ~30x as far as without it (Adam moves a scalar about lr a step); a run paused at
    step 2 and resumed ends bitwise equal to the uninterrupted one (the scale survives the resume); a run without
    an adapter refuses the key."""
    from daguerre.checkpoints import load_model
    from daguerre.training.ldm import train_ldm

    steps = ("train.steps=4", "train.lr=1e-3", "train.min_lr=1e-3", "data.n=4", "train.ema_decay=0",
             "train.checkpoint_every=2")
    scaled_cfg = _gligen_run(base_model, (*steps, "train.gate_lr_scale=30"))

    def gates(path):
        return torch.stack([p.detach().abs().float() for n, p in adapter_parameters(load_model(path).unet)
                            if n.endswith("alpha_attn")])

    scaled = gates(train_ldm(scaled_cfg, tmp_path / "scaled", vae_path=vae_file))
    plain = gates(train_ldm(_gligen_run(base_model, steps), tmp_path / "plain", vae_path=vae_file))
    assert scaled.mean() > 10 * plain.mean(), (float(scaled.mean()), float(plain.mean()))
    train_ldm(scaled_cfg, tmp_path / "resumed", vae_path=vae_file, until=2)
    resumed = gates(train_ldm(scaled_cfg, tmp_path / "resumed", vae_path=vae_file, resume=True))
    assert torch.equal(resumed, scaled)
    with pytest.raises(ValueError, match="train.gate_lr_scale: 2.0 scales a GLIGEN adapter's gates"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["train.gate_lr_scale=2.0"])


def test_box_loss_weights_favour_small_boxes_and_keep_a_mean_of_one():
    """loss.box_weight's map: 1 outside boxes, 1 + w (1/16) / area inside one (summed where boxes overlap), scaled
    to a mean of 1 per image; padding objects and rows without objects change nothing."""
    from daguerre.training.layout import box_loss_weights

    layout = torch.zeros(3, 4, GROUNDING_FIELDS + 2)
    layout[0, 0, :5] = torch.tensor([0.0, 0.0, 0.25, 0.25, 1.0])  # 1/16 of the image: 1 + 4
    layout[0, 1, :5] = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0])  # a quarter: 1 + 1
    layout[0, 2, :4] = torch.tensor([0.0, 0.5, 0.5, 1.0])  # padding (mask 0): ignored
    layout[1, 0, :5] = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0])
    layout[1, 1, :5] = torch.tensor([0.25, 0.25, 0.5, 0.5, 1.0])  # inside the first: both add up there
    w = box_loss_weights(layout, 16, 16, 4.0)
    assert w.shape == (3, 1, 16, 16) and w.dtype == torch.float32
    torch.testing.assert_close(w.mean((1, 2, 3)), torch.ones(3))
    raw = torch.ones(16, 16)
    raw[:4, :4] = 5.0
    raw[8:, 8:] = 2.0
    torch.testing.assert_close(w[0, 0], raw / raw.mean())
    raw = torch.ones(16, 16)
    raw[:8, :8] = 2.0
    raw[4:8, 4:8] = 6.0
    torch.testing.assert_close(w[1, 0], raw / raw.mean())
    assert torch.equal(w[2], torch.ones(1, 16, 16))  # no object: uniform


def test_pixel_weights_weigh_the_squared_error_by_position():
    from daguerre.training.losses import weighted_mse

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    snr = torch.tensor([1.0, 0.5])
    plain = weighted_mse(pred, target, snr)
    assert torch.equal(weighted_mse(pred, target, snr, torch.ones(2, 1, 8, 8)), plain)
    corner = torch.zeros(2, 1, 8, 8)
    corner[..., :2, :2] = 16.0  # mean 1: the corner's error alone
    want = (snr * (pred - target)[..., :2, :2].pow(2).mean((1, 2, 3))).mean()
    torch.testing.assert_close(weighted_mse(pred, target, snr, corner), want)


def test_box_weight_changes_a_gligen_runs_training_and_is_refused_elsewhere(tmp_path, vae_file, base_model):
    from daguerre.checkpoints import load_model
    from daguerre.training.ldm import train_ldm

    steps = ("train.steps=2", "train.lr=1e-3", "train.min_lr=1e-3", "data.n=4", "train.ema_decay=0")

    def adapter(path):
        return dict(adapter_parameters(load_model(path).unet))

    plain = adapter(train_ldm(_gligen_run(base_model, steps), tmp_path / "plain", vae_path=vae_file))
    weighted = adapter(train_ldm(_gligen_run(base_model, (*steps, "loss.box_weight=4")), tmp_path / "weighted",
                                 vae_path=vae_file))
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain)
    with pytest.raises(ValueError, match="loss.box_weight: 4.0 needs stage 'ldm' and model.conditioning 'gligen'"):
        load_run_config(CONFIGS / "tiny_ldm.toml", "ldm", ["loss.box_weight=4.0"])
    with pytest.raises(ValueError, match="loss.box_weight: must be a number >= 0, got -1"):
        _gligen_run(base_model, ("loss.box_weight=-1",))


def test_a_gligen_run_needs_its_base_model():
    from daguerre.training.ldm import train_ldm

    cfg = load_run_config(CONFIGS / "tiny_gligen_ldm.toml", "ldm", QUICK)
    with pytest.raises(ValueError, match="a GLIGEN adapter trains on a frozen text-to-image model: name it with"):
        train_ldm(cfg, "/nonexistent/run", vae_path=SHAPES)


def test_a_gligen_run_resumes_exactly(tmp_path, vae_file, base_model):
    from safetensors.torch import load_file

    from daguerre.training.ldm import train_ldm

    whole = train_ldm(_gligen_run(base_model), tmp_path / "whole", vae_path=vae_file)
    train_ldm(_gligen_run(base_model), tmp_path / "paused", vae_path=vae_file, until=3)
    resumed = train_ldm(_gligen_run(base_model), tmp_path / "paused", vae_path=vae_file, resume=True)
    a, b = load_file(whole), load_file(resumed)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not bad, bad[:8]


def test_a_gligen_model_draws_boxes_from_the_cli_and_its_png_replays(tmp_path, vae_file, base_model, capsys):
    from daguerre.training.ldm import train_ldm

    path = train_ldm(_gligen_run(base_model), tmp_path / "run", vae_path=vae_file)
    out = tmp_path / "a.png"
    boxes = ["--box", "a red circle:0.1,0.1,0.45,0.45", "--box", "a big blue square:0.5,0.5,0.95,0.95"]
    common = ["--model", str(path), "--steps", "4", "--seed", "3"]
    argv = ["generate", "on a white background", *boxes, "--layout-steps", "0.5", *common]
    assert main([*argv, "-o", str(out)]) == 0
    params = parse_parameters(read_png_parameters(out))[2]
    assert params["Layout steps"] == "0.5" and "a big blue square" in params["Layout"]
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(path), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    capsys.readouterr()
    assert main(["info", str(path)]) == 0  # info says which layout route the file has
    assert "GLIGEN adapter, up to 4 objects" in capsys.readouterr().out
    assert main(["generate", "x", *boxes, "--layout-steps", "2", *common, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layout steps must be a fraction in [0, 1]" in err
    assert main(["generate", "x", "--layout-steps", "0.3", "--model", str(base_model), "-o", str(tmp_path / "y.png"),
                 "--steps", "1"]) == 2
    assert "has no GLIGEN adapter" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--n", "1", "--steps", "2", "--layout-steps", "0.5", "--out",
                 str(tmp_path / "eval")]) == 0  # measured as route 1 is, at any scheduled fraction
    import json

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["sampling"] == {"steps": 2, "layout_steps": 0.5} and len(report["items"]) == 1


def test_the_gligen_condition_of_training_drops_both_or_the_prompt_alone():
    from daguerre.training.layout import GroundingTable

    base = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    cfg = _with_gligen(base, GligenConfig(max_objects=2, phrase_dim=3))
    table = GroundingTable(torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]], [[0, 0, 1, 1], [0.2, 0.2, 0.3, 0.3]]]),
                           torch.tensor([[1, -1], [0, 1]]), torch.arange(6.0).reshape(2, 3))
    rows = table[torch.tensor([0, 1])]
    torch.testing.assert_close(rows[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.5, 1.0, 3.0, 4.0, 5.0]))
    assert not rows[0, 1].any()

    class Data:
        captions = ["a red circle", "a blue square"]
        layouts = table

    seen = []
    conditioner = conditioner_for(cfg)
    assert isinstance(conditioner, GligenConditioner)
    out = conditioner.batch(torch.tensor([0, 1]), torch.tensor([True, False]), Data(), torch.device("cpu"),
                            lambda caps, device: seen.append(caps) or {"context": torch.zeros(2, 1, 1)},
                            torch.tensor([True, True]))
    assert seen == [["", ""]] and not out["layout"][0].any() and torch.equal(out["layout"][1], rows[1])
    req = GenerationRequest(layout=[LayoutObject("a red circle", (0.1, 0.1, 0.5, 0.5))]).validate(cfg)
    cond, uncond = conditioner.pair(req, torch.device("cpu"), lambda p: torch.zeros(len(p), 1, 1),
                                    lambda p: torch.arange(3.0)[None].expand(len(p), 3))
    torch.testing.assert_close(cond["layout"][0, 0], torch.tensor([0.1, 0.1, 0.5, 0.5, 1.0, 0.0, 1.0, 2.0]))
    assert not uncond["layout"].any() and uncond["layout"].shape == (1, 2, 8)


def test_shapes_gligen_ldm_fits_the_shipped_shapes_model():
    """The real run's [model] is the shipped model's architecture plus the adapter: `--init` copies every tensor of
    the model and adds only the adapter's, the phrases are as wide as its text encoder's pooled output."""
    from daguerre.checkpoints.vae_file import load_vae
    from daguerre.training.export import networks
    from daguerre.training.init import init_ldm

    cfg = load_run_config(CONFIGS / "shapes_gligen_ldm.toml", "ldm")
    cfg.model.vae = load_vae(SHAPES, torch.device("cpu"))[1].vae
    model = derive_model_config(cfg, 3, None)
    assert model.conditioning == "gligen" and not cfg.loss.train_text_encoder
    assert model.unet.gligen.phrase_pool == ("eot", "last") and model.unet.gligen.phrase_dim == 192  # 96 a part
    unet, te, _ = networks(model, None, 0)
    record = init_ldm(SHAPES, unet, te, file_hash(SHAPES))
    names = {n for n, _ in adapter_parameters(unet)}
    assert record["new_tensors"]["unet"] == len(names) and record["new_tensors"]["text_encoder"] == 0


def test_a_layout_model_is_refused_a_diffusers_export_by_name(tmp_path):
    from daguerre.checkpoints.diffusers_folder import save_diffusers

    base = derive_model_config(load_run_config(CONFIGS / "tiny_ldm.toml", "ldm"), 3, None)
    comps = build_components(_with_gligen(base, GligenConfig(phrase_dim=32, hidden=16)), seed=0)
    with pytest.raises(ValueError, match="a layout model \\(conditioning 'gligen'\\) has no diffusers form"):
        save_diffusers(comps, tmp_path / "out")
    assert not (tmp_path / "out").exists()
