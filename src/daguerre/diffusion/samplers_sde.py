"""Stochastic samplers in sigma space (x = x0 + sigma * eps); the registry is `sampler_names.SAMPLERS`.

Every sampler follows the contract of shared/STYLE.md: `sample_<name>(denoiser, x, sigmas, *,
extra_args=None, callback=None, generator=None) -> x`, with `x` already multiplied by sigmas[0],
`sigmas` ending in 0, and every random draw taken from `generator` through
`daguerre.diffusion.noise.randn_like` (one CPU generator per image reproduces an image alone or in
a batch). The ancestral samplers split each step sigma -> sigma_next into a deterministic move down
to sigma_down and fresh noise of size sigma_up (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", reverse-diffusion predictor; k-diffusion's `get_ancestral_step`). DPM-Solver++ SDE
(Lu et al. 2022, arXiv:2211.01095) draws the noise of its two sub-steps as increments of one
Brownian path (`brownian_increments`), as k-diffusion does with a Brownian tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .noise import Generators, randn_like
from .samplers import _report, ancestral_step

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None] | None

MIDPOINT = 0.5  # r of the DPM-Solver++ second-order midpoint step (Lu et al. 2022, Algorithm 1 with r1 = 1/2)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_to^2 for an ancestral step
    (k-diffusion's name for `samplers.ancestral_step`, shared with DDIM's eta).

    eta = 1 gives the DDPM posterior variance: sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) /
    sigma_from^2 (Ho et al. 2020 beta_tilde, in sigma space); eta = 0 gives a deterministic step.
    """
    return ancestral_step(float(sigma_from), float(sigma_to), eta)


def brownian_increments(
    x: torch.Tensor, sigma: float, sigma_mid: float, sigma_next: float, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Increments (W(sigma_mid) - W(sigma), W(sigma_next) - W(sigma_mid)) of one Brownian path W.

    Time is sigma itself (k-diffusion's `BrownianTreeNoiseSampler` with the identity transform). The
    increment over the whole step is drawn first, then the midpoint from the Brownian bridge given
    it: with d1 = |sigma - sigma_mid|, d2 = |sigma_mid - sigma_next|, W(mid) - W(sigma) | total ~
    N(d1 / (d1 + d2) * total, d1 * d2 / (d1 + d2)). The two increments are independent with
    variances d1 and d2, and their sum is the whole-step increment: the noise of both sub-steps
    comes from one path.
    """
    d1, d2 = abs(float(sigma) - float(sigma_mid)), abs(float(sigma_mid) - float(sigma_next))
    total = randn_like(x, generator) * math.sqrt(d1 + d2)
    w1 = total * (d1 / (d1 + d2)) + randn_like(x, generator) * math.sqrt(d1 * d2 / (d1 + d2))
    return w1, total - w1


def _at(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The per-image sigma tensor (B,) the denoiser takes."""
    return x.new_full((x.shape[0],), float(sigma))


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral ("Euler a"): an Euler step (Karras et al. 2022, Alg. 1) to sigma_down, then noise sigma_up."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)  # Euler: x + (x - D) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def sample_dpm2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM2 ancestral: a DPM-Solver-2 step (Lu et al. 2022, arXiv:2206.00927, Alg. 1) to sigma_down, then noise."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)  # last step: plain Euler to sigma = 0
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)  # midpoint in log sigma
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = (x_mid - denoiser(x_mid, _at(x, sigma_mid), **extra_args)) / sigma_mid
            x = x + d_mid * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ 2S ancestral: a DPM-Solver++(2S) step (Lu et al. 2022, arXiv:2211.01095, Alg. 1) to sigma_down + noise."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised  # Euler to sigma = 0
        else:
            h = math.log(sigma / sigma_down)  # step in lambda = -log sigma
            sigma_mid = sigma * math.exp(-MIDPOINT * h)
            x_mid = x * (sigma_mid / sigma) - denoised * math.expm1(-MIDPOINT * h)
            denoised_mid = denoiser(x_mid, _at(x, sigma_mid), **extra_args)
            x = x * (sigma_down / sigma) - denoised_mid * math.expm1(-h)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ SDE: SDE-DPM-Solver++(2S), midpoint r = 1/2 (Lu et al. 2022, arXiv:2211.01095, Sec. 4), Brownian noise."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        if sigma_next == 0:
            x = denoised  # Euler to sigma = 0
            continue
        sigma_mid = sigma * (sigma_next / sigma) ** MIDPOINT  # midpoint in lambda = -log sigma
        w1, w2 = brownian_increments(x, sigma, sigma_mid, sigma_next, generator)
        # sub-step 1: ancestral DPM-Solver++(1) to sigma_mid, noise = the path's increment over [sigma, sigma_mid]
        down, up = get_ancestral_step(sigma, sigma_mid, eta)
        x_mid = x * (down / sigma) - denoised * math.expm1(math.log(down / sigma))
        x_mid = x_mid + w1 / math.sqrt(sigma - sigma_mid) * (s_noise * up)
        denoised_mid = denoiser(x_mid, _at(x, sigma_mid), **extra_args)
        # sub-step 2: from sigma with the midpoint-corrected denoised, noise = increment over [sigma, sigma_next]
        down, up = get_ancestral_step(sigma, sigma_next, eta)
        fac = 1 / (2 * MIDPOINT)
        denoised_d = (1 - fac) * denoised + fac * denoised_mid
        x = x * (down / sigma) - denoised_d * math.expm1(math.log(down / sigma))
        x = x + (w1 + w2) / math.sqrt(sigma - sigma_next) * (s_noise * up)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM++ 2M SDE: SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2 with noise; midpoint variant)."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)  # step in lambda = -log sigma
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x = x * (sigma_next / sigma * math.exp(-eta_h)) + denoised * phi
        if old_denoised is not None:  # second order: the midpoint correction from the previous denoised
            x = x + (denoised - old_denoised) * (0.5 * phi * h / h_last)
        if eta:
            x = x + randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior q(x_s | x_t, x0) (eqs. 6-7), sigma space."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        # With x = z / sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar, the VP posterior of eqs. 6-7
        # between any two levels t > s becomes: mean = x0 + (sigma_s^2 / sigma_t^2)(x_t - x0), variance =
        # beta_tilde / alpha_bar_s = sigma_s^2 (1 - sigma_s^2 / sigma_t^2).
        ratio = (sigma_next / sigma) ** 2
        x = denoised + (x - denoised) * ratio
        if sigma_next > 0:
            x = x + randn_like(x, generator) * (sigma_next * math.sqrt(1 - ratio))
    return x


def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback = None,
    generator: Generators = None,
) -> torch.Tensor:
    """LCM multistep sampling (Luo et al. 2023, arXiv:2310.04378, Alg. 1): x0 estimate re-noised to the next sigma."""
    extra_args, sig = extra_args or {}, sigmas.detach().cpu()
    for i in range(len(sig) - 1):
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = denoiser(x, _at(x, sigma), **extra_args)
        _report(callback, x, i, sig, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_next
    return x
