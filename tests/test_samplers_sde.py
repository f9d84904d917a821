"""Stochastic samplers on Gaussian data: the right output distribution, reproducible noise, DDPM's
posterior, and the Brownian increments of DPM++ SDE (oracles in daguerre/diffusion/gaussian.py).

Every sampler is linear on N(mu, s^2) data, so its output is Gaussian with mean exactly mu; what a
sampler can get wrong is the variance. The checks standardise the N = 4096 x 16 samples and compare
the pooled mean and standard deviation with their targets. Sampling error: the standard error of
the mean of N unit-variance values is 1 / sqrt(N) = 0.0039, that of their standard deviation
1 / sqrt(2N) = 0.0028; we allow Z_TOL = 4.5 standard errors. Discretisation error: where the exact
output variance at the step count used is known (Euler a, DDPM, DDIM(eta=1), LCM: scalar recursions)
the target is that variance and no allowance is needed; for the others the target is s^2 and the
allowance is DISCRETISATION_STD, the measured |std - 1| at 50 Karras steps (0.0015 to 0.0043 with
2^21 samples: `python bench/sampler_convergence.py --steps 25 50 --samples 131072`) rounded up to 0.006.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from daguerre.config import ScheduleConfig
from daguerre.diffusion import samplers_sde
from daguerre.diffusion.gaussian import GaussianData, karras_sigmas
from daguerre.diffusion.noise import generators_for
from daguerre.diffusion.sampler_names import SAMPLERS
from daguerre.diffusion.samplers_sde import (
    brownian_increments,
    get_ancestral_step,
    sample_ddpm,
    sample_dpmpp_sde,
    sample_euler_ancestral,
    sample_lcm,
)
from daguerre.diffusion.schedules import alphas_cumprod, get_sigmas, make_betas, model_sigmas

DIM, BATCH = 16, 4096
N = DIM * BATCH
Z_TOL = 4.5  # standard errors allowed for sampling noise
MEAN_TOL = Z_TOL / math.sqrt(N)
STD_TOL = Z_TOL / math.sqrt(2 * N)
DISCRETISATION_STD = 0.006  # |std - 1| bound at DIST_STEPS steps for samplers without an exact variance
DIST_STEPS = 50
ZERO = torch.zeros(1, dtype=torch.float64)

# the registry's stochastic samplers (those of samplers_sde.py), plus DDIM with eta = 1 (its stochastic mode)
STOCHASTIC_SAMPLERS = {k: f for k, f in SAMPLERS.items() if f.__module__ == samplers_sde.__name__}
STOCHASTIC = {**STOCHASTIC_SAMPLERS, "ddim_eta1": functools.partial(SAMPLERS["ddim"], eta=1.0)}



@pytest.fixture(scope="module")
def data():
    return GaussianData(DIM, seed=0)


def schedule(n: int) -> torch.Tensor:
    """n Karras steps over SD's sigma range, ending in 0."""
    return torch.cat([karras_sigmas(n), ZERO])


def run(sampler, denoiser, data, sigmas, seed=0, batch=BATCH, **kw):
    """Samples from x_T = mu + sigma_0 z, with one generator for the start and the sampler's noise."""
    g = torch.Generator().manual_seed(seed)
    x = (data.mu + sigmas[0] * torch.randn(batch, DIM, generator=g, dtype=torch.float64)).float()
    return sampler(denoiser, x, sigmas, generator=g, **kw).double()


def check_standard_normal(z: torch.Tensor, std_allowance: float = 0.0) -> None:
    assert abs(float(z.mean())) < MEAN_TOL, f"mean {float(z.mean()):.4f}"
    assert abs(float(z.std()) - 1) < STD_TOL + std_allowance, f"std {float(z.std()):.4f}"


# --- distributions -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, kw, eta",
    [("euler_ancestral", {}, 1.0), ("euler_ancestral", {"eta": 0.5}, 0.5), ("ddpm", {}, 1.0), ("ddim_eta1", {}, 1.0)],
)
def test_ancestral_output_variance_is_exact(name, kw, eta, data):
    """At 10 steps the variance is far from s^2 (about 0.55 s^2 for eta = 1) and must equal the recursion."""
    sigmas = schedule(10)
    out = run(STOCHASTIC[name], data.denoiser, data, sigmas, **kw)
    variance = data.ancestral_variance(sigmas.tolist(), eta)
    assert float((variance / data.s**2).mean()) < 0.9  # the check is not about convergence
    check_standard_normal((out - data.mu) / variance.sqrt())


def test_lcm_with_a_consistency_function_is_exact_at_any_step_count(data):
    for n in (1, 4):
        out = run(sample_lcm, data.consistency_function, data, schedule(n), seed=n)
        check_standard_normal((out - data.mu) / data.s)


def test_lcm_with_a_posterior_mean_loses_the_predicted_variance(data):
    sigmas = schedule(8)
    out = run(sample_lcm, data.denoiser, data, sigmas)
    check_standard_normal((out - data.mu) / data.lcm_variance(sigmas.tolist()).sqrt())


@pytest.mark.parametrize("name", ["dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"])
def test_output_distribution_is_the_data_distribution(name, data):
    out = run(STOCHASTIC[name], data.denoiser, data, schedule(DIST_STEPS))
    check_standard_normal((out - data.mu) / data.s, DISCRETISATION_STD)


def test_every_stochastic_sampler_is_checked():
    exact = {"euler_ancestral", "ddpm", "lcm"}
    statistical = {"dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"}
    assert set(STOCHASTIC_SAMPLERS) == exact | statistical


def test_ddpm_is_euler_ancestral_and_ddim_eta1(data):
    """Three implementations of the same update (DDPM posterior = ancestral step with eta = 1) agree draw for draw."""
    sigmas = schedule(12)
    names = ("ddpm", "euler_ancestral", "ddim_eta1")
    outs = [run(STOCHASTIC[name], data.denoiser, data, sigmas, batch=8) for name in names]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-5)


def test_eta_zero_is_deterministic_euler(data):
    sigmas = schedule(12)
    out = run(sample_euler_ancestral, data.denoiser, data, sigmas, batch=8, eta=0.0)
    euler = run(SAMPLERS["euler"], data.denoiser, data, sigmas, batch=8)
    torch.testing.assert_close(out, euler, rtol=0, atol=1e-5)


# --- reproducibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_same_seed_same_samples(name, data):
    sigmas = schedule(6)
    a = run(STOCHASTIC[name], data.denoiser, data, sigmas, seed=3, batch=4)
    b = run(STOCHASTIC[name], data.denoiser, data, sigmas, seed=3, batch=4)
    c = run(STOCHASTIC[name], data.denoiser, data, sigmas, seed=4, batch=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_image_is_the_same_alone_or_in_a_batch(name):
    """With one generator per image (seed + i), image i does not depend on the batch it is made in."""
    data = GaussianData(8, seed=1)  # broadcasts over the last axis of a (B, 4, 8, 8) latent
    sigmas = schedule(6)
    seed, n = 11, 3
    x = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators_for(seed, n)]) * sigmas[0]
    batch = STOCHASTIC[name](data.denoiser, x, sigmas, generator=generators_for(seed, n))
    for i in range(n):
        alone = STOCHASTIC[name](data.denoiser, x[i : i + 1], sigmas, generator=generators_for(seed + i, 1))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_callback_and_no_mutation(name, data):
    sigmas = schedule(5)
    x = torch.randn(2, DIM) * sigmas[0]
    x_copy, sigmas_copy, calls = x.clone(), sigmas.clone(), []
    g = torch.Generator().manual_seed(0)
    STOCHASTIC_SAMPLERS[name](data.denoiser, x, sigmas, callback=calls.append, generator=g)
    assert [c["i"] for c in calls] == list(range(5))
    assert all(set(c) == {"x", "i", "sigma", "sigma_next", "denoised"} for c in calls)
    assert [float(c["sigma_next"]) for c in calls] == sigmas[1:].tolist()
    assert torch.equal(x, x_copy) and torch.equal(sigmas, sigmas_copy)


# --- the Brownian increments of DPM++ SDE --------------------------------------------------------

def test_brownian_increments_are_one_path():
    """Increments over [sigma, mid] and [mid, next]: independent, variances d1 and d2; their sum is the
    whole-step increment, so the two sub-step noises of DPM++ SDE have correlation sqrt(d1 / (d1 + d2))."""
    n = 2**17
    sigma, mid, nxt = 2.0, 1.2, 0.5
    d1, d2 = sigma - mid, mid - nxt
    w1, w2 = brownian_increments(torch.zeros(n), sigma, mid, nxt, torch.Generator().manual_seed(0))
    w1, w2 = w1.double(), w2.double()
    for w, d in ((w1, d1), (w2, d2), (w1 + w2, d1 + d2)):
        assert abs(float(w.mean())) < Z_TOL * math.sqrt(d / n)
        assert abs(float(w.var()) / d - 1) < Z_TOL * math.sqrt(2 / n)
    assert abs(float((w1 * w2).mean())) < Z_TOL * math.sqrt(d1 * d2 / n)  # independent increments
    n1, n2 = w1 / math.sqrt(d1), (w1 + w2) / math.sqrt(d1 + d2)  # the sub-step noises, each N(0, 1)
    corr = float((n1 * n2).mean())
    assert abs(corr - math.sqrt(d1 / (d1 + d2))) < Z_TOL / math.sqrt(n)


def test_brownian_increments_per_image_generators():
    x = torch.zeros(3, 5)
    w1, w2 = brownian_increments(x, 3.0, 1.0, 0.2, generators_for(7, 3))
    for i in range(3):
        a1, a2 = brownian_increments(x[i : i + 1], 3.0, 1.0, 0.2, generators_for(7 + i, 1))
        assert torch.equal(w1[i : i + 1], a1) and torch.equal(w2[i : i + 1], a2)


def test_dpmpp_sde_needs_correlated_sub_step_noise(data, monkeypatch):
    """The distribution test can tell: with independent sub-step noises the std is 5% off at 50 steps."""
    import daguerre.diffusion.samplers_sde as sde

    def independent(x, sigma, mid, nxt, generator=None):
        d1 = abs(sigma - mid)
        w1 = sde.randn_like(x, generator) * math.sqrt(d1)
        return w1, sde.randn_like(x, generator) * math.sqrt(abs(sigma - nxt)) - w1

    monkeypatch.setattr(sde, "brownian_increments", independent)
    out = run(sample_dpmpp_sde, data.denoiser, data, schedule(DIST_STEPS))
    assert abs(float(((out - data.mu) / data.s).std()) - 1) > 2 * (STD_TOL + DISCRETISATION_STD)


# --- DDPM ------------------------------------------------------------------------------------------

def eps_model(data: GaussianData, x_t: torch.Tensor, abar: float) -> torch.Tensor:
    """The noise prediction of the ideal denoiser in DDPM form: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    sigma = math.sqrt((1 - abar) / abar)
    x = x_t.double() / math.sqrt(abar)
    return (x - data.denoiser(x, torch.full((x.shape[0],), sigma)).double()) / sigma


def test_ddpm_on_all_discrete_sigmas_is_ho_algorithm_2(data):
    """1000 steps in sigma space == Ho et al. 2020, Algorithm 2 with sigma_t^2 = beta_tilde_t (eq. 7), same draws."""
    cfg = ScheduleConfig()
    betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    abar = alphas_cumprod(betas)
    z = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5))
    g_ref = torch.Generator().manual_seed(6)
    x_t = z.double()  # x_T ~ N(0, I)
    for t in range(len(betas) - 1, -1, -1):
        eps = eps_model(data, x_t, float(abar[t]))
        x_t = (x_t - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t > 0:
            beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
            x_t = x_t + beta_tilde.sqrt() * torch.randn(4, DIM, generator=g_ref).double()
    sigmas = torch.cat([model_sigmas(cfg).flip(0), ZERO])
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)  # the same x_T in sigma space: x_T / sqrt(abar_T)
    out = sample_ddpm(data.denoiser, x, sigmas, generator=torch.Generator().manual_seed(6)).double()
    torch.testing.assert_close(out, x_t, rtol=0, atol=2e-4 * float(x_t.abs().max()))


def test_ddpm_matches_diffusers_ddpm_scheduler(data):
    """50 leading-spaced steps == diffusers' DDPMScheduler (fixed_small = beta_tilde, no clipping), same noise."""
    from diffusers import DDPMScheduler

    cfg = ScheduleConfig()
    steps, batch = 50, 2
    sched = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, clip_sample=False, variance_type="fixed_small",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    sched.set_timesteps(steps)
    abar = alphas_cumprod(make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end))
    sigmas = get_sigmas("default", steps, model_sigmas(cfg))  # leading, steps_offset 1
    torch.testing.assert_close(sigmas[:-1], ((1 - abar) / abar).sqrt()[sched.timesteps.long()])
    z = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(8))
    x_t = z.clone()
    gens = generators_for(9, batch)
    for t in sched.timesteps:
        eps = eps_model(data, x_t, float(abar[t])).float()
        x_t = sched.step(eps, t, x_t, generator=gens).prev_sample
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = sample_ddpm(data.denoiser, x, sigmas, generator=generators_for(9, batch))
    torch.testing.assert_close(out, x_t, rtol=0, atol=1e-4 * float(x_t.abs().max()))


def test_dpmpp_2m_sde_matches_diffusers(data):
    """DPM++ 2M SDE == diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", midpoint,
    order 2, Karras sigmas) with the same noise draws; 20 steps, so only the last step is first order."""
    from diffusers import DPMSolverMultistepScheduler

    cfg = ScheduleConfig()
    steps, batch = 20, 2
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, algorithm_type="sde-dpmsolver++", solver_order=2,
        solver_type="midpoint", use_karras_sigmas=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()  # (steps + 1,) sigma-space values ending in 0
    z = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(12))
    x_t = z.clone()
    gens = generators_for(13, batch)
    for i, t in enumerate(sched.timesteps):
        abar = 1 / (1 + float(sigmas[i]) ** 2)  # the scheduler's own sigma at step i (t is rounded)
        x_t = sched.step(eps_model(data, x_t, abar).float(), t, x_t, generator=gens).prev_sample
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = SAMPLERS["dpmpp_2m_sde"](data.denoiser, x, sigmas, generator=generators_for(13, batch))
    torch.testing.assert_close(out, x_t, rtol=0, atol=1e-4 * float(x_t.abs().max()))


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_dpmpp_2m_sde_matches_diffusers_at_zero_terminal_snr(data, kind):
    """The same on a zero-terminal-SNR v-prediction schedule (sigma_max = 4096, the shipped shapes model's),
    10 steps of DPM++ 2M SDE's Automatic Exponential schedule or Karras: same draws, same end point."""
    from diffusers import DPMSolverMultistepScheduler

    cfg, steps, batch = ScheduleConfig(), 10, 2
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        use_karras_sigmas=kind == "karras", use_exponential_sigmas=kind == "exponential",
    )
    sched.set_timesteps(steps)
    sched.set_begin_index(0)  # Karras rounds its first two sigmas both to t = 999
    sigmas = sched.sigmas.double()
    assert float(sigmas[0]) == pytest.approx(4096, rel=1e-6)
    z = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(12))
    x_t = z.clone()
    gens = generators_for(13, batch)
    for i, t in enumerate(sched.timesteps):
        sigma = float(sigmas[i])
        abar = 1 / (1 + sigma**2)
        eps = eps_model(data, x_t, abar)
        x0 = x_t.double() / math.sqrt(abar) - sigma * eps
        v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0  # Salimans & Ho 2022
        x_t = sched.step(v.float(), t, x_t, generator=gens).prev_sample
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = SAMPLERS["dpmpp_2m_sde"](data.denoiser, x, sigmas, generator=generators_for(13, batch))
    torch.testing.assert_close(out, x_t, rtol=0, atol=1e-4 * float(x_t.abs().max()))


def test_ancestral_step_splits_the_variance():
    for eta in (0.0, 0.5, 1.0):
        down, up = get_ancestral_step(3.0, 1.0, eta)
        assert math.isclose(down**2 + up**2, 1.0)
    down, up = get_ancestral_step(3.0, 1.0, 1.0)
    assert math.isclose(up**2, 1.0 * (9.0 - 1.0) / 9.0)  # DDPM's beta_tilde in sigma space
    assert get_ancestral_step(3.0, 0.0) == (0.0, 0.0)
