"""Deterministic samplers: pure functions integrating the probability-flow ODE in sigma space.

Contract (shared/STYLE.md): `sample_<name>(denoiser, x, sigmas, *, extra_args=None, callback=None,
generator=None) -> x`. `x` is the initial latent already multiplied by sigmas[0]; `sigmas` is a
descending 1-D tensor ending in 0 (schedules.py); the denoiser is called as
`denoiser(x, sigma, **extra_args)` with sigma a (B,) tensor; `callback` receives
dict(x, i, sigma, sigma_next, denoised) after each model evaluation of step i; every random draw goes
through `noise.randn_like(x, generator)`. The ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et
al. 2022, eq. 4 with sigma(t) = t); lambda = -log sigma is the half-log-SNR of DPM-Solver (Lu et al.).
No sampler mutates its inputs or disables autograd (apply torch.no_grad in the pipeline).
The stochastic samplers live in samplers_sde.py; the registry of both is `sampler_names.SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .denoisers import DenoiserFn
from .noise import Generators, randn_like

Callback = Callable[[dict[str, Any]], None] | None
LMS_ORDER = 4  # k-diffusion / A1111 "LMS"
UNIPC_ORDER = 2  # diffusers' UniPCMultistepScheduler default solver_order


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - denoised) / sigma (Karras et al. 2022, Alg. 1 line 4)."""
    return (x - denoised) / sigma


def _setup(x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None):
    """(extra_args dict, (B,) ones to broadcast a scalar sigma, sigmas on the CPU)."""
    return extra_args or {}, x.new_ones([x.shape[0]]), sigmas.detach().cpu()


def _report(callback: Callback, x, i, sigmas, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step sigma_from -> sigma_to into a deterministic step to
    sigma_down plus fresh noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2; with `eta`
    this is DDIM's sigma_t(eta) (Song et al. 2021, eq. 16) written in sigma space."""
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def sample_euler(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        x = x + _to_d(x, sig[i], denoised) * (sig[i + 1] - sig[i])
    return x


def sample_heun(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2 without churn; Euler on the step to 0)."""
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        d = _to_d(x, sig[i], denoised)
        dt = sig[i + 1] - sig[i]
        x_next = x + d * dt
        if sig[i + 1] > 0:
            d_next = _to_d(x_next, sig[i + 1], denoiser(x_next, sig[i + 1] * s_in, **extra_args))
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
    return x


def sample_dpm2(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2) in k-diffusion's sigma form."""
    # midpoint at the geometric mean of sigma and sigma_next; Euler on the step to 0
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        d = _to_d(x, sig[i], denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sig[i])
            continue
        sigma_mid = (sig[i].log() + sig[i + 1].log()).div(2).exp()
        x_mid = x + d * (sigma_mid - sig[i])
        d_mid = _to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid * s_in, **extra_args))
        x = x + d_mid * (sig[i + 1] - sig[i])
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Weight of the derivative at sigmas[i - j] in a linear multistep step sigmas[i] -> sigmas[i + 1]:
    the Lagrange basis polynomial over nodes sigmas[i], ..., sigmas[i - order + 1], integrated exactly."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial([1.0])
    for o in others:
        basis = basis * np.polynomial.Polynomial([-o, 1.0]) / (sigmas[i - j] - o)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
    order: int = LMS_ORDER,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on non-uniform sigmas, k-diffusion's `sample_lms`), order 4."""
    # coefficients: Lagrange basis polynomials integrated exactly (numpy.polynomial, no scipy)
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    sig_np = sig.double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        ds = [*ds[-(order - 1):], _to_d(x, sig[i], denoised)] if order > 1 else [_to_d(x, sig[i], denoised)]
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(sig_np, i, j, cur) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2); first order on the first and last step."""
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    old_denoised = None
    h_last = None
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = sig[i].log() - sig[i + 1].log()  # lambda_next - lambda
        if old_denoised is None:
            denoised_d = denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sig[i + 1] / sig[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


def sample_ddim(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eqs. 12 and 16) in sigma space."""
    # x_next = x0 + sigma_down eps + sigma_up z with (sigma_down, sigma_up) from eta: eta = 0 is Euler,
    # eta = 1 DDPM-like ancestral sampling. The chain ends at sigma = 0 (diffusers' set_alpha_to_one=True),
    # not at sigma(t=0) as CompVis' DDIM does.
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        sigma_down, sigma_up = ancestral_step(float(sig[i]), float(sig[i + 1]), eta)
        x = denoised + _to_d(x, sig[i], denoised) * sigma_down
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


def sample_plms(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, eqs. 11-12), as SD's PLMS sampler."""
    # Adams-Bashforth on eps (orders 1-4) with DDIM transfer steps, which in sigma space are
    # x_next = x + (sigma_next - sigma) eps'; a pseudo improved Euler first step (n + 1 calls for n steps).
    # Always on eps, also for v models (SD's sampler); diffusers' PNDM combines raw v outputs instead.
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    old_eps: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        _report(callback, x, i, sig, denoised)
        eps = _to_d(x, sig[i], denoised)
        dt = sig[i + 1] - sig[i]
        if not old_eps:
            eps_prime = eps
            if sig[i + 1] > 0:  # pseudo improved Euler: average with the noise estimate at the Euler point
                x_euler = x + eps * dt
                eps_next = _to_d(x_euler, sig[i + 1], denoiser(x_euler, sig[i + 1] * s_in, **extra_args))
                eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * dt
        old_eps = [*old_eps[-2:], eps]
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(R, b, B_h) of UniPC-bh2 with x0 prediction (Zhao et al. 2023, Algorithm 2/3, B(h) = e^h - 1 in
    -h): R[k, m] = rks[m]^k and b[k] = phi_{k+1}(-h) k! / B(h), so the solvers' weights are R^-1 b."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.stack([np.power(np.array(rks), k) for k in range(order)])
    return R, np.array(b), b_h


def sample_unipc(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
    extra_args: dict | None = None, callback: Callback = None, generator: Generators = None,
    order: int = UNIPC_ORDER, lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC-bh2 with data prediction (Zhao et al. 2023, Algorithms 2-3), as diffusers' UniPCMultistepScheduler."""
    # a UniP predictor of `order` (1-3) and a UniC corrector reusing the model call at the new point;
    # warm-up with lower orders, lower orders on the last steps; the step to sigma 0 is always first
    # order (lambda is infinite there; diffusers would produce NaN with lower_order_final=False).
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    extra_args, s_in, sig = _setup(x, sigmas, extra_args)
    lam = -sig.double().log().numpy()  # lambda = log(alpha/sigma_ddpm) = -log sigma
    n = len(sig) - 1
    history: list[torch.Tensor] = []  # denoised at the latest points, newest last
    x_prev: torch.Tensor | None = None  # the point the last predictor started from
    prev_order = 1
    for i in range(n):
        denoised = denoiser(x, sig[i] * s_in, **extra_args)
        if x_prev is not None:  # UniC: correct x with the model output at x itself
            x = _unipc_update(x_prev, history, lam, i - 1, prev_order, denoised)
        history = [*history[-(order - 1):], denoised] if order > 1 else [denoised]
        _report(callback, x, i, sig, denoised)
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(history))
        if sig[i + 1] == 0:
            this_order = 1
        x_prev, prev_order = x, this_order
        x = _unipc_update(x, history, lam, i, this_order, None)
    return x


def _unipc_update(
    x: torch.Tensor, history: list[torch.Tensor], lam: np.ndarray, i: int, order: int,
    denoised_next: torch.Tensor | None,
) -> torch.Tensor:
    """One UniP step (denoised_next None) or UniC step from point i to point i + 1 in sigma space:
    x_next = (sigma_next/sigma) x - (e^-h - 1) m0 - B(h) sum_k rho_k D1_k, with D1_k = (m_k - m0)/r_k."""
    m0 = history[-1]
    if not np.isfinite(lam[i + 1]):  # the step to sigma 0: x0 itself
        return m0 if denoised_next is None else denoised_next
    h = float(lam[i + 1] - lam[i])
    x_base = float(np.exp(-h)) * x - float(np.expm1(-h)) * m0
    n_old = order - 1  # earlier points used, each a difference D1
    rks = [float((lam[i - k] - lam[i]) / h) for k in range(1, n_old + 1)]
    d1s = [(history[-(k + 1)] - m0) / rks[k - 1] for k in range(1, n_old + 1)]
    R, b, b_h = _unipc_coefficients([*rks, 1.0], h, order)
    if denoised_next is None:  # predictor
        if n_old == 0:
            return x_base
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        return x_base - b_h * sum(float(r) * d for r, d in zip(rhos, d1s, strict=True))
    rhos_c = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    corr = sum((float(r) * d for r, d in zip(rhos_c[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_base - b_h * (corr + float(rhos_c[-1]) * (denoised_next - m0))
