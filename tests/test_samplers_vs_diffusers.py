"""The deterministic samplers against diffusers' schedulers: same network, same noise, same sigmas.

diffusers' DDIM, PNDM, DPM-Solver and UniPC schedulers work on the DDPM latent x_t = x / sqrt(sigma^2 + 1);
its Euler-family schedulers on x itself, scaling the network input with `scale_model_input`. Both are
started from our initial latent (noise * sigmas[0], converted to their form) and end at sigma = 0 where
the two forms coincide. The network is a small random conv net, a fixed nonlinear function of (x_t, t).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

from daguerre.config import ScheduleConfig
from daguerre.diffusion import samplers as K
from daguerre.diffusion.denoisers import Denoiser
from daguerre.diffusion.noise import generators_for, randn
from daguerre.diffusion.sampler_names import SAMPLERS
from daguerre.diffusion.schedules import get_sigmas, model_sigmas

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 8, 8)
TOL = 1e-4
PREDICTIONS = ["epsilon", "v_prediction"]


class TinyNet(nn.Module):
    """A fixed nonlinear function of (x_t, t): conv -> + time features -> SiLU -> conv, plus a t-scaled skip."""

    def __init__(self, channels: int = 4, hidden: int = 16, n_freqs: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.time = nn.Linear(2 * n_freqs, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.register_buffer("freqs", torch.arange(1, n_freqs + 1, dtype=torch.float32) * 3.0)

    def forward(self, x, t, context=None, y=None):
        s = t.float()[:, None] / 1000 * self.freqs  # (B, n_freqs)
        temb = self.time(torch.cat([s.sin(), s.cos()], dim=1))[:, :, None, None]  # (B, hidden, 1, 1)
        h = torch.nn.functional.silu(self.conv1(x) + temb)
        gate = (t.float() / 1000)[:, None, None, None]
        return gate * x + 0.5 * torch.tanh(self.conv2(h))



@pytest.fixture(scope="module")
def net():
    return TinyNet().eval()


def initial_noise():
    return randn(SHAPE, generators_for(7, SHAPE[0]))


def ours(sampler, net, prediction, sigmas, schedule=None, **kw):
    den = Denoiser(net, schedule or ScheduleConfig(prediction_type=prediction))
    with torch.no_grad():
        return sampler(den, initial_noise() * sigmas[0].float(), sigmas, **kw)


def theirs(scheduler, net, n, ddpm_form, t_of_call=None, step_kwargs=None):
    """Run a diffusers scheduler from our initial latent; t_of_call(k) overrides the k-th network timestep."""
    scheduler.set_timesteps(n)
    if hasattr(scheduler, "set_begin_index"):  # else a repeated first timestep (999, 999, ...) starts at step 1
        scheduler.set_begin_index(0)
    sigma0 = float(scheduler.sigmas[0]) if hasattr(scheduler, "sigmas") else None
    if ddpm_form:
        abar0 = scheduler.alphas_cumprod[scheduler.timesteps[0]].double()
        sigma0 = float(((1 - abar0) / abar0).sqrt())
        sample = initial_noise() * sigma0 / (sigma0**2 + 1) ** 0.5
    else:
        sample = initial_noise() * sigma0
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            inp = scheduler.scale_model_input(sample, t)
            tt = float(t) if t_of_call is None else t_of_call(k)
            out = net(inp, torch.full((SHAPE[0],), tt))
            sample = scheduler.step(out, t, sample, **(step_kwargs or {})).prev_sample
    return sample


def sd_sigmas(kind, n, spacing):
    return get_sigmas(kind, n, model_sigmas(ScheduleConfig()), spacing=spacing)


def assert_close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs difference {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
def test_ddim(net, prediction, n):
    sched = DDIMScheduler(**SD, prediction_type=prediction, clip_sample=False, set_alpha_to_one=True,
                          steps_offset=1, timestep_spacing="leading")
    assert_close(ours(K.sample_ddim, net, prediction, sd_sigmas("default", n, "leading")),
                 theirs(sched, net, n, ddpm_form=True))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_eta_matches_diffusers_with_the_same_noise(net, prediction):
    n, eta = 10, 1.0
    sigmas = sd_sigmas("default", n, "leading")
    mine = ours(K.sample_ddim, net, prediction, sigmas, eta=eta, generator=torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)  # diffusers draws the same per-step noise from a twin generator
    sched = DDIMScheduler(**SD, prediction_type=prediction, clip_sample=False, set_alpha_to_one=True,
                          steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(n)
    s0 = float(sigmas[0])
    sample = initial_noise() * s0 / (s0**2 + 1) ** 0.5
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(sample, torch.full((SHAPE[0],), float(t)))
            z = randn(SHAPE, draws)
            sample = sched.step(out, t, sample, eta=eta, variance_noise=z).prev_sample
    assert_close(mine, sample)


@pytest.mark.parametrize("n", [10, 25])
def test_ddim_eta0_is_euler_on_discrete_sigmas(net, n):
    sigmas = sd_sigmas("default", n, "leading")
    a = ours(K.sample_ddim, net, "epsilon", sigmas)
    b = ours(K.sample_euler, net, "epsilon", sigmas)
    assert_close(a, b, tol=1e-5)


EULER_CASES = [("default", "leading"), ("default", "trailing"), ("karras", "linspace")]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind,spacing", EULER_CASES)
@pytest.mark.parametrize("n", [10, 25])
def test_euler(net, prediction, kind, spacing, n):
    sched = EulerDiscreteScheduler(**SD, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
                                   use_karras_sigmas=kind == "karras")
    assert_close(ours(K.sample_euler, net, prediction, sd_sigmas(kind, n, spacing)),
                 theirs(sched, net, n, ddpm_form=False))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind,spacing", EULER_CASES)
@pytest.mark.parametrize("n", [10, 25])
def test_heun(net, prediction, kind, spacing, n):
    sched = HeunDiscreteScheduler(**SD, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
                                  use_karras_sigmas=kind == "karras")
    assert_close(ours(K.sample_heun, net, prediction, sd_sigmas(kind, n, spacing)),
                 theirs(sched, net, n, ddpm_form=False))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
def test_dpm2(net, prediction, n):
    sched = KDPM2DiscreteScheduler(**SD, prediction_type=prediction, timestep_spacing="leading", steps_offset=1)
    assert_close(ours(K.sample_dpm2, net, prediction, sd_sigmas("default", n, "leading")),
                 theirs(sched, net, n, ddpm_form=False))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
def test_lms(net, prediction, n):
    sched = LMSDiscreteScheduler(**SD, prediction_type=prediction, timestep_spacing="leading", steps_offset=1)
    assert_close(ours(K.sample_lms, net, prediction, sd_sigmas("default", n, "leading")),
                 theirs(sched, net, n, ddpm_form=False))


@pytest.mark.parametrize("n", [10, 25])
def test_plms(net, n):
    """Epsilon only: for v-prediction diffusers' PNDM runs the multistep on raw v outputs (converting
    the combination with the current step's alpha); SD's PLMS and ours combine noise estimates."""
    prediction = "epsilon"
    sched = PNDMScheduler(**SD, prediction_type=prediction, skip_prk_steps=True, set_alpha_to_one=True,
                          steps_offset=1, timestep_spacing="leading")
    assert_close(ours(K.sample_plms, net, prediction, sd_sigmas("default", n, "leading")),
                 theirs(sched, net, n, ddpm_form=True))


def _continuous_t(sched):
    """diffusers rounds the timesteps of Karras schedules in DPM-Solver/UniPC while keeping the
    unrounded sigmas; feed its network the continuous t of each sigma, as our denoiser does."""
    log_sigmas = np.log(np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5))
    return lambda k: float(sched._sigma_to_t(np.array(float(sched.sigmas[k])), log_sigmas))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", ["default", "karras"])
@pytest.mark.parametrize("n", [10, 25])
def test_dpmpp_2m(net, prediction, kind, n):
    sched = DPMSolverMultistepScheduler(**SD, prediction_type=prediction, algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="zero", lower_order_final=True,
                                        timestep_spacing="trailing", use_karras_sigmas=kind == "karras")
    t_of_call = _continuous_t(sched) if kind == "karras" else None
    assert_close(ours(K.sample_dpmpp_2m, net, prediction, sd_sigmas(kind, n, "trailing")),
                 theirs(sched, net, n, ddpm_form=True, t_of_call=t_of_call))


ZTSNR = ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True)  # the shipped shapes model's


@pytest.mark.parametrize("kind", ["default", "karras"])
@pytest.mark.parametrize("n", [10, 25])
def test_dpmpp_2m_at_zero_terminal_snr(net, kind, n):
    """A zero-terminal-SNR v-prediction schedule (sigma_max = 4096, diffusers' abar_T = 2**-24): our
    Karras sigmas are diffusers', their timesteps are diffusers' unrounded ones (log-sigma interpolation,
    here between t = 997 and 998 and above), and DPM++ 2M (final step to 0 first order) is
    DPMSolverMultistepScheduler's, including the v -> x0 conversion at sigma 4096 and 0.029."""
    sched = DPMSolverMultistepScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                        lower_order_final=True, euler_at_final=False,
                                        timestep_spacing="trailing", use_karras_sigmas=kind == "karras")
    sched.set_timesteps(n)
    sigmas = get_sigmas(kind, n, model_sigmas(ZTSNR), spacing="trailing")
    torch.testing.assert_close(sigmas, sched.sigmas.double(), rtol=5e-5, atol=0)  # theirs: float32
    assert float(sigmas[0]) == pytest.approx(4096, rel=1e-6)
    t_diffusers = _continuous_t(sched)
    t_ours = Denoiser(net, ZTSNR).sigma_to_t(sigmas[:-1])
    np.testing.assert_allclose(t_ours.numpy(), [t_diffusers(k) for k in range(n)], rtol=0, atol=5e-3)  # theirs: float32
    assert_close(ours(K.sample_dpmpp_2m, net, "v_prediction", sigmas, schedule=ZTSNR),
                 theirs(sched, net, n, ddpm_form=True, t_of_call=t_diffusers))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_on_trailing_and_karras(net, prediction, n, order):
    for kind in ("default", "karras"):
        sched = UniPCMultistepScheduler(**SD, prediction_type=prediction, solver_order=order,
                                        timestep_spacing="trailing", use_karras_sigmas=kind == "karras")
        t_of_call = _continuous_t(sched) if kind == "karras" else None
        assert_close(ours(K.sample_unipc, net, prediction, sd_sigmas(kind, n, "trailing"), order=order),
                     theirs(sched, net, n, ddpm_form=True, t_of_call=t_of_call))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n", [10, 25])
def test_unipc_defaults(net, prediction, n):
    """UniPCMultistepScheduler with its default config (order 2, bh2, x0 prediction, its own
    "linspace" spacing): our sampler on the sigmas the scheduler chose."""
    sched = UniPCMultistepScheduler(**SD, prediction_type=prediction)
    sched.set_timesteps(n)
    sigmas = sched.sigmas.double()
    ts = sched.timesteps.double()
    torch.testing.assert_close(sigmas[:-1], model_sigmas(ScheduleConfig())[ts.long()], rtol=5e-5, atol=0)
    assert_close(ours(K.sample_unipc, net, prediction, sigmas), theirs(sched, net, n, ddpm_form=True))


def test_samplers_do_not_mutate_and_report_every_step(net):
    sigmas = sd_sigmas("karras", 6, "leading")
    den = Denoiser(net, ScheduleConfig())
    for name, sampler in SAMPLERS.items():
        x = initial_noise() * sigmas[0].float()
        x_copy, sig_copy = x.clone(), sigmas.clone()
        seen = []
        with torch.no_grad():
            out = sampler(den, x, sigmas, callback=lambda d, seen=seen: seen.append((d["i"], float(d["sigma_next"]))))
        assert torch.equal(x, x_copy) and torch.equal(sigmas, sig_copy), name
        assert [i for i, _ in seen] == list(range(6)) and seen[-1][1] == 0.0, name
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all(), name
