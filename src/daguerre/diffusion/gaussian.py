"""Gaussian data x0 ~ N(mu, diag(s^2)), for which the ideal denoiser and the probability-flow ODE are known in
closed form, so every sampler can be checked against an exact answer: the oracle of the sampler tests
(tests/test_samplers_gaussian.py, tests/test_samplers_sde.py), of bench/sampler_convergence.py and of
`daguerre explain samplers`. It is written out from the formulas below, independently of samplers.py.

Ideal denoiser. With x = x0 + sigma * eps, x0 and x are jointly Gaussian per dimension, so the
posterior mean is linear: D(x, sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu).

Exact ODE solution. The probability-flow ODE (Karras et al. 2022, eq. 4, sigma(t) = t) is
dx/dsigma = (x - D(x, sigma)) / sigma = sigma / (s^2 + sigma^2) (x - mu). Put y = x - mu:
dy / y = sigma dsigma / (s^2 + sigma^2) = d[log sqrt(s^2 + sigma^2)], so y(sigma) = C sqrt(s^2 + sigma^2)
and x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2) (x(sigma_0) - mu).
Check: d/dsigma of the right side is sigma / (s^2 + sigma^2) * y(sigma), as required. At sigma = 0
it is mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu); since x_T ~ N(mu, s^2 + sigma_max^2), x(0) ~
N(mu, s^2): the ODE transports the noise distribution exactly onto the data distribution.

Moments under ancestral steps. Every sampler is linear on this data, so its output is Gaussian with
mean exactly mu (by symmetry), and for the simplest ones the output variance follows a scalar
recursion (`ancestral_variance`, `lcm_variance`): an exact oracle for their distribution at any
step count.
"""

from __future__ import annotations

import math

import torch

# Stable Diffusion's discrete sigma range (scaled_linear betas 0.00085 -> 0.012, 1000 steps):
SIGMA_MAX = 14.6146  # sigma at t = 999
SIGMA_MIN = 0.0292  # sigma at t = 0
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


class GaussianData:
    """N(mu, diag(s^2)) data in `dim` dimensions, with a spread of means and scales."""

    def __init__(self, dim: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(dim, generator=g, dtype=torch.float64)  # (D,)
        self.s = 0.5 + 1.5 * torch.rand(dim, generator=g, dtype=torch.float64)  # (D,) scales in [0.5, 2]

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        """The ideal (MMSE) denoiser E[x0 | x], float32 out, computed in float64."""
        var = self.s**2  # (D,)
        sig2 = sigma.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1))) ** 2  # (B, 1, ...)
        out = self.mu + var / (var + sig2) * (x.to(torch.float64) - self.mu)
        return out.to(torch.float32)

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        """The exact probability-flow ODE solution from sigma_start to sigma_end (see the module docstring), float64."""
        var = self.s**2
        gain = torch.sqrt(var + sigma_end**2) / torch.sqrt(var + sigma_start**2)
        return self.mu + gain * (x_start.to(torch.float64) - self.mu)

    def consistency_function(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        """The ideal consistency model (Song et al. 2023): the ODE end point x(0) from (x, sigma), float32 out.

        Unlike the posterior mean D, it maps N(mu, s^2 + sigma^2) onto N(mu, s^2) exactly.
        """
        var = self.s**2
        sig2 = sigma.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1))) ** 2  # (B, 1, ...)
        out = self.mu + torch.sqrt(var / (var + sig2)) * (x.to(torch.float64) - self.mu)
        return out.to(torch.float32)

    def ancestral_variance(self, sigmas: list[float], eta: float = 1.0) -> torch.Tensor:
        """Exact per-dimension output variance of Euler a (= DDPM for eta = 1) from x_T ~ N(mu, s^2 + sigma_0^2).

        One step maps y = x - mu to a y + sigma_up z with a = 1 - (1 - sigma_down / sigma)(1 - g),
        g = s^2 / (s^2 + sigma^2); so v <- a^2 v + sigma_up^2.
        """
        var = self.s**2
        v = var + sigmas[0] ** 2
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            down, up = _ancestral(sigma, sigma_next, eta)
            a = 1 - (1 - down / sigma) * (1 - var / (var + sigma**2))
            v = a**2 * v + up**2
        return v

    def lcm_variance(self, sigmas: list[float]) -> torch.Tensor:
        """Exact output variance of LCM multistep with the ideal denoiser: v <- g^2 v + sigma_next^2.

        LCM returns posterior means, so it loses variance: at the end v = g^2 v < s^2.
        """
        var = self.s**2
        v = var + sigmas[0] ** 2
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            g = var / (var + sigma**2)
            v = g**2 * v + sigma_next**2
        return v


def _ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, written out independently of the library."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = KARRAS_RHO):
    """n Karras et al. (2022, eq. 5) noise levels from sigma_max down to sigma_min, float64, no trailing zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho

