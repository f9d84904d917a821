"""The LDM U-Net against diffusers' UNet2DConditionModel on identical random weights, and its key mapping.

Oracles: diffusers' `get_timestep_embedding`, `UNet2DConditionModel` (built from our exported config and
loaded strictly through our weight mapping), and diffusers' own SD single-file converter
`convert_ldm_unet_checkpoint`, which reads our state-dict keys as Stable Diffusion checkpoint keys.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
import torch.nn as nn

from daguerre.checkpoints.unet_keys import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from daguerre.config import UNetConfig, preset
from daguerre.models.unet import UNetModel
from daguerre.nn.embeddings import timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

ATOL = 1e-4  # max abs difference allowed between daguerre and diffusers in float32
NORM_WEIGHT_NOISE = 0.1  # norm scales are 1 + this * noise, other vectors this * noise
SD_PREFIX = "model.diffusion_model."

# The real `unet/config.json` files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
HUB_SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": DOWN, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": UP,
}
HUB_SD21 = {
    **HUB_SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True,
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with noise at a realistic scale (std 1/sqrt(fan_in); norm scales near 1).

    Default init zeroes the output convolutions, which would make any two U-Nets agree trivially.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    std = p[0].numel() ** -0.5
                    p.uniform_(-(3**0.5) * std, 3**0.5 * std, generator=g)
                else:
                    p.uniform_(-NORM_WEIGHT_NOISE, NORM_WEIGHT_NOISE, generator=g)
                    if name == "weight" and isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                        p.add_(1.0)
    return model


def random_unet(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    """A daguerre U-Net with random weights, allocated once (built on the meta device)."""
    with torch.device("meta"):
        model = UNetModel(cfg)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def diffusers_twin(model: UNetModel, sample_size: int = 8) -> UNet2DConditionModel:
    """diffusers' U-Net for model.cfg, sharing model's tensors, through our config export and weight mapping."""
    config = unet_config_to_diffusers(model.cfg, sample_size)
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)
    ref.load_state_dict(unet_state_dict_to_diffusers(model.state_dict(), model.cfg), strict=True, assign=True)
    return ref.eval()


def inputs(cfg: UNetConfig, h: int, w: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    context = None if cfg.context_dim is None else torch.randn(2, 77, cfg.context_dim, generator=g)
    y = None if cfg.num_classes is None else torch.tensor([0, cfg.num_classes - 1])
    return {"x": x, "timesteps": torch.tensor([981.0, 37.5]), "context": context, "y": y}


def assert_matches_diffusers(model: UNetModel, h: int, w: int, check_time: bool = True) -> None:
    a = inputs(model.cfg, h, w)
    ref = diffusers_twin(model)
    with torch.no_grad():
        ours = model(**a)
        theirs = ref(a["x"], a["timesteps"], encoder_hidden_states=a["context"], class_labels=a["y"]).sample
    assert ours.shape == theirs.shape == (2, model.cfg.out_channels, h, w)
    assert ours.std() > 0.1  # not trivially zero
    err = (ours - theirs).abs().max().item()
    assert err < ATOL, f"max abs difference {err}"
    if check_time:  # swapping the two timesteps changes the output: the time embedding reaches it
        b = {**a, "timesteps": a["timesteps"].flip(0)}
        with torch.no_grad():
            assert (model(**b) - ours).abs().max() > 1e-3


# --- timestep embedding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [320, 33])
def test_timestep_embedding_matches_diffusers(dim):
    t = torch.tensor([0, 1, 17.25, 999.0, 500.5])
    ours = timestep_embedding(t, dim)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.dtype == torch.float32 and ours.shape == (5, dim)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    scalar = get_timestep_embedding(torch.tensor([7.0]), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(torch.tensor(7), dim), scalar, atol=1e-6, rtol=0)


# --- numerical parity with diffusers ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_sd_unet_matches_diffusers(name):
    model = random_unet(preset(name).unet)
    assert_matches_diffusers(model, 16, 16, check_time=False)
    del model
    gc.collect()


def small_configs() -> dict[str, UNetConfig]:
    tiny = preset("tiny").unet
    return {
        "tiny": tiny,
        "class_conditional": dataclasses.replace(tiny, num_classes=10),
        # three levels, attention skipping the middle level, linear projections, two blocks deep, head counts
        "odd_layout": UNetConfig(
            in_channels=3, out_channels=5, model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=3,
            attention_levels=(0, 2), num_heads=2, head_dim=None, transformer_depth=2, context_dim=24,
            use_linear_proj=True, norm_groups=8, upcast_attention=True,
        ),
    }


@pytest.mark.parametrize("name", list(small_configs()))
def test_small_unet_matches_diffusers(name):
    model = random_unet(small_configs()[name])
    assert_matches_diffusers(model, 16, 16)
    if name == "odd_layout":  # sizes that do not halve evenly: the upsamplers land on the skip sizes
        assert_matches_diffusers(model, 13, 10)


# --- daguerre-only configurations, training ---------------------------------------------------------------

def self_attention_config() -> UNetConfig:
    return dataclasses.replace(preset("tiny").unet, context_dim=None, num_classes=3, transformer_depth=2)


def test_unet_without_context_runs_and_trains():
    cfg = self_attention_config()
    model = random_unet(cfg).train()
    assert not any(".attn2." in k or ".norm2." in k for k in model.state_dict())
    a = inputs(cfg, 8, 8)
    out = model(**a)
    assert out.shape == (2, cfg.out_channels, 8, 8)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = preset("tiny").unet
    a = inputs(cfg, 8, 8)
    grads = []
    for use_checkpointing in (False, True):
        model = random_unet(cfg).train()
        model.gradient_checkpointing = use_checkpointing
        model(**a).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_forward_inputs():
    cfg = preset("tiny").unet
    model = random_unet(cfg)
    a = inputs(cfg, 8, 8)
    with torch.no_grad():
        both = model(a["x"], torch.tensor([250, 250]), a["context"])
        torch.testing.assert_close(model(a["x"], 250, a["context"]), both)  # a scalar timestep broadcasts
        torch.testing.assert_close(model(a["x"], 250.0, a["context"]), both)
        half = model.to(torch.bfloat16)(a["x"], 250, a["context"])  # inputs follow the parameters' dtype
        assert half.dtype == torch.bfloat16 and (half.float() - both).abs().max() < 0.1 * both.abs().max()
    model.float()
    with pytest.raises(ValueError, match="context"):
        model(a["x"], 250)
    with pytest.raises(ValueError, match="num_classes"):
        model(a["x"], 250, a["context"], y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        model(a["x"], torch.tensor([1, 2, 3]), a["context"])


# --- key mapping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd15", "sd21", "sd15-inpaint"])
def test_keys_are_stable_diffusion_keys(name):
    """diffusers' SD single-file converter, fed our keys as an SD checkpoint, agrees with our mapping."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = preset(name).unet
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    expected = unet_state_dict_to_diffusers(sd, cfg)
    as_sd_file = {SD_PREFIX + k: v for k, v in sd.items()}
    converted = convert_ldm_unet_checkpoint(as_sd_file, unet_config_to_diffusers(cfg, 64))
    assert {k: id(v) for k, v in converted.items()} == {k: id(v) for k, v in expected.items()}
    if name == "sd15":
        assert len(sd) == 686 and sum(v.numel() for v in sd.values()) == 859_520_964  # SD 1.5's U-Net


def test_class_embedding_key_is_label_emb():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = small_configs()["class_conditional"]
    sd = random_unet(cfg).state_dict()
    assert "label_emb.weight" in sd  # CompVis `nn.Embedding(num_classes, time_embed_dim)`
    converted = convert_ldm_unet_checkpoint({SD_PREFIX + k: v for k, v in sd.items()}, unet_config_to_diffusers(cfg, 8))
    assert converted.keys() == unet_state_dict_to_diffusers(sd, cfg).keys()


@pytest.mark.parametrize("name", ["tiny", "odd_layout", "class_conditional", "self_attention"])
def test_state_dict_round_trip_is_lossless(name):
    cfg = self_attention_config() if name == "self_attention" else small_configs()[name]
    sd = random_unet(cfg).state_dict()
    there = unet_state_dict_to_diffusers(sd, cfg)
    back = unet_state_dict_from_diffusers({k: v.clone() for k, v in there.items()}, cfg)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_linear_projection_accepts_conv_shaped_weights():
    cfg = dataclasses.replace(preset("tiny").unet, use_linear_proj=True)
    sd = random_unet(cfg).state_dict()
    there = unet_state_dict_to_diffusers(sd, cfg)
    key = next(k for k in there if k.endswith("proj_in.weight"))
    there[key] = there[key][:, :, None, None]  # (out, in, 1, 1), as some SD 2 conversions store it
    back = unet_state_dict_from_diffusers(there, cfg)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21", "sd21-base", "tiny"])
def test_config_round_trip(name):
    cfg = preset(name).unet
    config = unet_config_to_diffusers(cfg, 64)
    assert unet_config_from_diffusers(config) == cfg
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(config)  # loads in diffusers
    assert ref.config.attention_head_dim == config["attention_head_dim"]


@pytest.mark.parametrize(("hub", "name"), [(HUB_SD15, "sd15"), (HUB_SD21, "sd21")])
def test_config_from_real_hub_configs(hub, name):
    assert unet_config_from_diffusers(hub) == preset(name).unet


def test_mapping_errors():
    cfg = preset("tiny").unet
    sd = random_unet(cfg).state_dict()
    there = unet_state_dict_to_diffusers(sd, cfg)
    with pytest.raises(ValueError, match="unexpected keys: foo.bar"):
        unet_state_dict_from_diffusers({**there, "foo.bar": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="missing keys: conv_in.weight"):
        unet_state_dict_from_diffusers({k: v for k, v in there.items() if k != "conv_in.weight"}, cfg)
    with pytest.raises(ValueError, match="unexpected keys: model.diffusion_model"):
        unet_state_dict_to_diffusers({SD_PREFIX + k: v for k, v in sd.items()}, cfg)
    with pytest.raises(ValueError, match="wrong shape.*conv_in"):
        unet_state_dict_from_diffusers({**there, "conv_in.weight": torch.zeros(3, 3)}, cfg)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),  # SDXL
        ({"transformer_layers_per_block": [1, 2, 10, 10]}, "transformer_layers_per_block"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"up_block_types": DOWN}, "up_block_types"),
        ({"attention_head_dim": [5, 8, 20, 20]}, "attention_head_dim"),
        ({"some_future_feature": 1}, "some_future_feature"),
    ],
)
def test_unsupported_diffusers_configs(change, field):
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**HUB_SD15, **change})
    assert unet_config_from_diffusers({**HUB_SD15, "only_cross_attention": [False] * 4}) == preset("sd15").unet


def test_context_free_config_has_no_diffusers_form():
    with pytest.raises(ValueError, match="context_dim"):
        unet_config_to_diffusers(self_attention_config(), 8)
