"""Noise schedules against closed forms and diffusers' schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from daguerre.config import ScheduleConfig
from daguerre.diffusion import schedules as S

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012)
# diffusers computes sigmas in float32: 1 - abar cancels at small t (relative error ~1e-5 at t = 0)
F32_RTOL = 5e-5
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("t", [0, 1, 10, 250, 500, 999])
def test_linear_alpha_bar_closed_form(t):
    beta = [1e-4 + (0.02 - 1e-4) * s / (T - 1) for s in range(T)]
    expected = math.prod(1 - b for b in beta[: t + 1])
    abar = S.alphas_cumprod(S.make_betas("linear", T, 1e-4, 0.02))
    assert abar[t].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", [0, 1, 10, 250, 500, 900, 990])
def test_cosine_alpha_bar_closed_form(t):
    s = 0.008

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    abar = S.alphas_cumprod(S.make_betas("cosine", T))
    # abar_t of the discrete chain is the product up to t inclusive, i.e. f(t + 1) / f(0) before clipping
    assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_cosine_betas_clipped():
    betas = S.make_betas("cosine", T)
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[-1].item() == pytest.approx(0.999)


def test_scaled_linear_is_squared_sqrt_linspace():
    betas = S.make_betas("scaled_linear", T, **SD)
    roots = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T)
    np.testing.assert_allclose(betas.numpy(), roots**2, rtol=1e-12)
    assert betas.dtype == torch.float64


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(kind):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[kind], **SD)
    np.testing.assert_allclose(S.make_betas(kind, T, **SD).numpy(), ref.betas.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind):
    betas = S.make_betas(kind, T, **SD)
    rescaled = S.rescale_zero_terminal_snr(betas)
    abar = S.alphas_cumprod(rescaled)
    assert abar[-1].item() == 0.0
    assert abar[0].item() == pytest.approx(S.alphas_cumprod(betas)[0].item(), rel=1e-12)
    ref = diffusers_rescale(betas.clone())  # diffusers' function on the same float64 betas
    np.testing.assert_allclose(rescaled.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
    ref32 = DDPMScheduler(beta_schedule=DIFFUSERS_NAME[kind], rescale_betas_zero_snr=True, **SD).betas
    np.testing.assert_allclose(rescaled.numpy(), ref32.numpy(), atol=1e-5)


def test_model_sigmas_zero_snr_is_finite_like_diffusers():
    cfg = ScheduleConfig(zero_terminal_snr=True, prediction_type="v_prediction")
    sig = S.model_sigmas(cfg)
    assert torch.isfinite(sig).all() and torch.all(sig[1:] > sig[:-1])
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, **SD)
    assert sig[-1].item() == pytest.approx(ref.sigmas[0].item(), rel=1e-4)  # diffusers' sigmas descend
    assert sig[-1].item() == pytest.approx(math.sqrt((1 - 2**-24) / 2**-24))


def test_model_sigmas_are_vp_to_ve():
    cfg = ScheduleConfig()
    abar = S.alphas_cumprod(S.betas_from_config(cfg))
    sig = S.model_sigmas(cfg)
    np.testing.assert_allclose(sig.numpy(), np.sqrt((1 - abar.numpy()) / abar.numpy()), rtol=1e-12)
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", **SD).sigmas[:-1].flip(0)
    np.testing.assert_allclose(sig.numpy(), ref.numpy(), rtol=F32_RTOL)


def test_sigma_t_round_trip():
    log_sigmas = S.model_sigmas(ScheduleConfig()).log()
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    np.testing.assert_allclose(S.sigma_to_t(S.t_to_sigma(t, log_sigmas), log_sigmas).numpy(), t.numpy(), atol=1e-9)
    sig = torch.tensor([0.03, 0.1, 1.0, 5.0, 14.0], dtype=torch.float64)
    np.testing.assert_allclose(S.t_to_sigma(S.sigma_to_t(sig, log_sigmas), log_sigmas).numpy(), sig.numpy(), rtol=1e-9)
    # discrete sigmas give integer timesteps exactly; out-of-range sigmas clamp to [0, T-1]
    ints = torch.arange(0, T, 37)
    assert torch.equal(S.sigma_to_t(log_sigmas.exp()[ints], log_sigmas), ints.double())
    out = S.sigma_to_t(torch.tensor([1e-4, 1e3], dtype=torch.float64), log_sigmas)
    assert out.tolist() == [0.0, T - 1.0]


def test_sigma_to_t_matches_diffusers():
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", **SD)
    log_sigmas = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    sig = np.array([0.05, 0.3, 2.0, 9.9])
    mine = S.sigma_to_t(torch.from_numpy(sig), torch.from_numpy(log_sigmas)).numpy()
    np.testing.assert_allclose(mine, ref._sigma_to_t(sig, log_sigmas), atol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 25, 50, 999])
def test_timesteps_match_diffusers(spacing, n):
    mine = S.timesteps(n, T, spacing, steps_offset=1)
    euler = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    euler.set_timesteps(n)
    np.testing.assert_allclose(mine.numpy(), euler.timesteps.numpy(), atol=1e-3)
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ddim.set_timesteps(n)
    expected = ddim.timesteps.numpy()
    np.testing.assert_array_equal(mine.round().numpy() if spacing == "linspace" else mine.numpy(), expected)


def test_timesteps_errors():
    with pytest.raises(ValueError, match="spacing"):
        S.timesteps(10, T, "middle")
    with pytest.raises(ValueError, match="steps"):
        S.timesteps(0, T, "leading")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sigmas_default_match_diffusers(spacing):
    sig = S.model_sigmas(ScheduleConfig())
    for n in (10, 25):
        ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=1, **SD)
        ref.set_timesteps(n)
        mine = S.sigmas_default(n, sig, spacing)
        assert mine.shape == (n + 1,) and mine[-1] == 0 and mine.dtype == torch.float64
        np.testing.assert_allclose(mine.numpy(), ref.sigmas.numpy(), rtol=F32_RTOL)


def test_sigmas_default_linspace_is_log_interpolated():
    sig = S.model_sigmas(ScheduleConfig())
    n = 10
    ts = np.linspace(T - 1, 0, n)
    expected = np.exp(np.interp(ts, np.arange(T), np.log(sig.numpy())))
    np.testing.assert_allclose(S.sigmas_default(n, sig, "linspace")[:-1].numpy(), expected, rtol=1e-12)


def test_karras_and_exponential_formulas():
    n, lo, hi, rho = 12, 0.0292, 14.6146, 7.0
    k = S.sigmas_karras(n, lo, hi, rho)
    expected = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    np.testing.assert_allclose(k[:-1].numpy(), expected, rtol=1e-12)
    assert k[-1] == 0 and k[0].item() == pytest.approx(hi) and k[-2].item() == pytest.approx(lo)
    e = S.sigmas_exponential(n, lo, hi)
    expected = [math.exp(math.log(hi) + i / (n - 1) * math.log(lo / hi)) for i in range(n)]
    np.testing.assert_allclose(e[:-1].numpy(), expected, rtol=1e-12)
    # diffusers' Karras conversion over the model's full sigma range gives the same schedule
    sig = S.model_sigmas(ScheduleConfig())
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True, **SD)
    ref.set_timesteps(n)
    np.testing.assert_allclose(S.get_sigmas("karras", n, sig).numpy(), ref.sigmas.numpy(), rtol=F32_RTOL)


def test_uniform_and_simple():
    sig = S.model_sigmas(ScheduleConfig())
    n = 10
    u = S.sigmas_uniform(n, sig)
    ts = np.linspace(T - 1, 0, n + 1)[:-1]
    np.testing.assert_allclose(u[:-1].numpy(), np.exp(np.interp(ts, np.arange(T), np.log(sig.numpy()))), rtol=1e-12)
    s = S.sigmas_simple(n, sig)
    np.testing.assert_allclose(s[:-1].numpy(), sig.numpy()[[T - 1 - 100 * i for i in range(n)]])
    for kind in S.SIGMA_SCHEDULES:
        out = S.get_sigmas(kind, n, sig)
        assert out.shape == (n + 1,) and out[-1] == 0 and torch.all(out[1:] < out[:-1])
    with pytest.raises(ValueError, match="unknown sigma schedule"):
        S.get_sigmas("beta", n, sig)


def test_img2img_sigmas():
    sig = S.get_sigmas("karras", 20, S.model_sigmas(ScheduleConfig()))
    assert torch.equal(S.img2img_sigmas(sig, 1.0), sig)
    assert S.img2img_sigmas(sig, 0.0).tolist() == [0.0]
    half = S.img2img_sigmas(sig, 0.5)  # A1111: t_enc = 10 -> 11 steps from sigmas[9]
    assert torch.equal(half, sig[9:]) and len(half) - 1 == 11
    lengths = [len(S.img2img_sigmas(sig, s / 20)) for s in range(21)]
    assert lengths == sorted(lengths)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            S.img2img_sigmas(sig, bad)


def test_q_sample_is_sigma_space_scaled():
    cfg = ScheduleConfig()
    abar = S.alphas_cumprod(S.betas_from_config(cfg))
    sig = S.model_sigmas(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 400, 999])
    xt = S.q_sample(x0, abar[t], noise)
    xs = x0 + sig[t].float().view(-1, 1, 1, 1) * noise  # sigma space
    torch.testing.assert_close(xt, xs * abar[t].sqrt().float().view(-1, 1, 1, 1), atol=1e-5, rtol=1e-5)
    ref = DDPMScheduler(beta_schedule="scaled_linear", **SD).add_noise(x0, noise, t)
    torch.testing.assert_close(xt, ref, atol=1e-5, rtol=1e-5)
