"""AutoencoderKL: parity with diffusers on identical random weights, key and config conversion, posterior maths."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch

from daguerre.checkpoints.vae_keys import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from daguerre.config import VAEConfig, preset
from daguerre.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sd_configs import SD15_VAE as SD15_DIFFUSERS_CONFIG  # stable-diffusion-v1-5 vae/config.json as published

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs difference to diffusers in float32
SD_PREFIX = "first_stage_model."
# grayscale, f = 4, attention at level 1 besides the middle block
GRAY = VAEConfig(
    in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
    attn_levels=(1,), latent_channels=3, norm_groups=4, scale_factor=0.5, shift_factor=0.1,
)


def _perturbed_diffusers_vae(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL at `cfg` with every parameter moved off its (often constant) initial value."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg, sample_size=32)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 1 else 0.5 * p.std()))
    return ref


def _assert_parity(ours: AutoencoderKL, ref, x: torch.Tensor) -> None:
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(post.mean, ref_post.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=TOL, rtol=0)
        z = post.mean + torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=TOL, rtol=0)


@pytest.mark.slow
def test_sd15_parity_with_diffusers():
    cfg = preset("sd15").vae
    ref = _perturbed_diffusers_vae(cfg)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _assert_parity(ours, ref, x)

    # our keys are the SD single-file keys: diffusers' own single-file converter reads them into its model
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = {SD_PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(sd, vae_config_to_diffusers(cfg, sample_size=32))
    ours_to_diffusers = vae_state_dict_to_diffusers(ours.state_dict(), cfg)
    assert set(converted) == set(ours_to_diffusers) == set(ref.state_dict())
    for k, v in converted.items():
        assert torch.equal(v, ours_to_diffusers[k]), k
    del ref, ours, sd, converted, ours_to_diffusers
    gc.collect()


@pytest.mark.parametrize("cfg", [preset("tiny").vae, GRAY], ids=["tiny", "gray-attn-f4"])
def test_small_configs_parity_both_directions(cfg):
    ref = _perturbed_diffusers_vae(cfg, seed=3)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True)
    x = torch.rand(2, cfg.in_channels, 16, 16) * 2 - 1
    _assert_parity(ours, ref, x)

    # the other direction: fresh daguerre weights exported into a fresh diffusers model
    torch.manual_seed(4)
    ours2 = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for p in ours2.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref2 = diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg, sample_size=32)).eval()
    ref2.load_state_dict(vae_state_dict_to_diffusers(ours2.state_dict(), cfg), strict=True)
    _assert_parity(ours2, ref2, x)


@pytest.mark.parametrize("cfg", [preset("sd15").vae, preset("tiny").vae, GRAY], ids=["sd15", "tiny", "gray"])
def test_state_dict_round_trip_is_lossless(cfg):
    torch.manual_seed(5)
    sd = AutoencoderKL(cfg).state_dict() if cfg.base_channels < 128 else _fake_state_dict(cfg)
    back = vae_state_dict_from_diffusers(vae_state_dict_to_diffusers(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]), k


def _fake_state_dict(cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The full-size key set with small random tensors of the right shapes (no 80M-parameter init needed)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}
    return {k: torch.randn(s) for k, s in shapes.items()}


def test_legacy_diffusers_attention_names_load():
    cfg = GRAY
    ref = _perturbed_diffusers_vae(cfg, seed=6)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in legacy_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    modern = vae_state_dict_from_diffusers(ref.state_dict(), cfg)
    from_legacy = vae_state_dict_from_diffusers(legacy, cfg)
    assert set(modern) == set(from_legacy)
    assert all(torch.equal(modern[k], from_legacy[k]) for k in modern)


def test_unknown_and_missing_keys_are_errors():
    cfg = preset("tiny").vae
    ours = AutoencoderKL(cfg).state_dict()
    theirs = vae_state_dict_to_diffusers(ours, cfg)
    with pytest.raises(ValueError, match="encoder.bogus.weight"):
        vae_state_dict_from_diffusers({**theirs, "encoder.bogus.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="missing"):
        vae_state_dict_from_diffusers({k: v for k, v in theirs.items() if "quant_conv" not in k}, cfg)
    with pytest.raises(ValueError, match="first_stage_model"):
        vae_state_dict_to_diffusers({SD_PREFIX + k: v for k, v in ours.items()}, cfg)


@pytest.mark.parametrize("cfg", [preset("sd15").vae, preset("tiny").vae, GRAY], ids=["sd15", "tiny", "gray"])
def test_config_round_trip_and_loads_in_diffusers(cfg):
    d = vae_config_to_diffusers(cfg, sample_size=64)
    assert vae_config_from_diffusers(d) == cfg
    ref = diffusers.AutoencoderKL(**d) if cfg.base_channels < 128 else None
    if ref is not None:  # diffusers builds the same parameter set from that config
        assert set(ref.state_dict()) == set(vae_state_dict_to_diffusers(AutoencoderKL(cfg).state_dict(), cfg))
        assert vae_config_from_diffusers(dict(ref.config)) == cfg


def test_published_sd15_config_gives_the_sd15_preset():
    assert vae_config_from_diffusers(SD15_DIFFUSERS_CONFIG) == preset("sd15").vae


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_quant_conv", False),
        ("mid_block_add_attention", False),
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["SomethingElse"]),
        ("latents_mean", [0.0] * 4),
        ("spatial_norm", True),
    ],
)
def test_unsupported_diffusers_config_values_are_errors(field, value):
    with pytest.raises(ValueError, match=field):
        vae_config_from_diffusers({**SD15_DIFFUSERS_CONFIG, field: value})


@pytest.mark.parametrize("cfg", [preset("tiny").vae, GRAY], ids=["tiny", "gray-attn-f4"])
def test_shapes_gradients_and_checkpointing(cfg):
    torch.manual_seed(7)
    vae = AutoencoderKL(cfg)
    f = cfg.downsample_factor
    x = torch.rand(2, cfg.in_channels, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(8)
    recon, post = vae(x, generator=gen)
    assert post.mean.shape == (2, cfg.latent_channels, 16 // f, 16 // f)
    assert recon.shape == x.shape
    loss = (recon - x).pow(2).mean() + 1e-3 * post.kl().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]

    vae.zero_grad()
    vae.gradient_checkpointing = True
    recon2, post2 = vae(x, generator=torch.Generator().manual_seed(8))
    ((recon2 - x).pow(2).mean() + 1e-3 * post2.kl().mean()).backward()
    torch.testing.assert_close(recon2, recon, atol=0, rtol=0)
    for n, p in vae.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_gray_config_has_level_attention_in_ldm_naming():
    keys = set(AutoencoderKL(GRAY).state_dict())
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.proj_out.weight" in keys
    assert "encoder.down.0.attn.0.q.weight" not in keys and "decoder.up.1.attn.2.q.weight" not in keys
    assert "encoder.down.2.downsample.conv.weight" not in keys and "decoder.up.0.upsample.conv.weight" not in keys


def test_decode_runs_in_parameter_dtype_and_scaling_inverts():
    cfg = GRAY
    vae = AutoencoderKL(cfg).to(torch.bfloat16)
    z = torch.randn(1, cfg.latent_channels, 4, 4)
    out = vae.decode(z)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
    torch.testing.assert_close(vae.scale_latents(z), (z - cfg.shift_factor) * cfg.scale_factor)


def test_posterior_sample_is_reproducible_with_a_cpu_generator():
    moments = torch.randn(2, 8, 3, 3)
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(9))
    b = post.sample(torch.Generator().manual_seed(9))
    c = post.sample(torch.Generator().manual_seed(10))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, post.mean + post.std * eps)
    assert torch.equal(post.mode(), moments[:, :4])


def test_kl_and_nll_match_closed_forms():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2).repeat(2, 3, 1, 1)
    logvar = torch.tensor([0.0, 1.0, -2.0, 0.3]).reshape(1, 1, 2, 2).repeat(2, 3, 1, 1)
    mean[1] *= -0.5
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)))

    other = DiagonalGaussian(torch.cat([mean.flip(-1) + 0.3, logvar.flip(-2) - 0.5], dim=1))
    r = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(q, r).sum(dim=(1, 2, 3)))

    x = torch.randn(mean.shape)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)))
    # one element by hand: KL(N(m, e^s) || N(0, 1)) = (m^2 + e^s - 1 - s) / 2
    single = DiagonalGaussian(torch.tensor([2.0, math.log(3.0)]).reshape(1, 2, 1, 1))
    torch.testing.assert_close(single.kl(), torch.tensor([(4.0 + 3.0 - 1.0 - math.log(3.0)) / 2]))


def test_logvar_is_clamped_as_in_ldm():
    post = DiagonalGaussian(torch.tensor([0.0, 0.0, 100.0, -100.0]).reshape(1, 4, 1, 1))
    assert post.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(post.var, torch.tensor([20.0, -30.0]).exp().reshape(1, 2, 1, 1))


def test_encode_does_not_modify_the_input():
    vae = AutoencoderKL(preset("tiny").vae)
    x = torch.rand(1, 3, 8, 8)
    x0 = copy.deepcopy(x)
    vae(x)
    assert torch.equal(x, x0)
