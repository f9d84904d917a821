"""Every deterministic sampler converges to the exact probability-flow ODE solution on Gaussian data,
at its expected order (daguerre/diffusion/gaussian.py has the closed forms).

Protocol: x_T = mu + sigma_max z for 8 x 16 values (16 dimensions, each with its own mean and scale),
n Karras steps (rho = 7) from SD's sigma_max = 14.6 to sigma_min = 0.029. The error is the max abs
error of the end point against the exact solution at sigma_min, relative to max |x(sigma_min) - mu|.
The trailing step to sigma = 0 is left out of the order fit: for most samplers it is a plain
denoising step x -> D(x, sigma_min), whose error against x(0) (about sigma_min^2 / (2 s), 1e-4 here)
does not shrink with n and would flatten the fit; it is checked separately.

Order: the least-squares slope of -log(error) against log(n) over n = 10, 20, 40, 80. Tolerance
+-0.2: pre-asymptotic terms of relative size O(1/n) bias the slope; on this problem they move it by
< 0.1 for n >= 10, while a method of the wrong order is off by >= 0.8. The errors stay above 4e-5,
far from float32 round-off (~1e-6 after 80 steps).
"""

from __future__ import annotations

import math

import pytest
import torch

from daguerre.diffusion import samplers, samplers_sde
from daguerre.diffusion.gaussian import SIGMA_MAX, SIGMA_MIN, GaussianData, karras_sigmas
from daguerre.diffusion.sampler_names import SAMPLERS

STEPS = (10, 20, 40, 80)
ORDER_TOLERANCE = 0.2
# Expected empirical order (low, high) of each deterministic sampler, and why:
EXPECTED_ORDER = {
    "euler": (1 - ORDER_TOLERANCE, 1 + ORDER_TOLERANCE),  # Euler: first order
    "ddim": (1 - ORDER_TOLERANCE, 1 + ORDER_TOLERANCE),  # DDIM(eta=0) is Euler in sigma space
    "heun": (2 - ORDER_TOLERANCE, 2 + ORDER_TOLERANCE),  # Heun / trapezoidal: second order
    "dpm2": (2 - ORDER_TOLERANCE, 2 + ORDER_TOLERANCE),  # DPM-Solver-2 (midpoint): second order
    "dpmpp_2m": (2 - ORDER_TOLERANCE, 2 + ORDER_TOLERANCE),  # two-step multistep: second order
    # Adams-Bashforth with the fixed weights of equal steps: on a smoothly varying grid the weight
    # mismatch leaves an O(h^2 (h_n/h_{n-1} - 1)) = O(h^3) local error, so second order.
    "plms": (2 - ORDER_TOLERANCE, 2 + ORDER_TOLERANCE),
    "unipc": (3 - ORDER_TOLERANCE, 3 + ORDER_TOLERANCE),  # UniP-2 + UniC: order p + 1 = 3 (Zhao et al., Thm 3.3)
    # variable-step order-4 Adams-Bashforth; its warm-up steps (orders 1-3) hold the observed rate
    # near 3.3 at these step counts, so only a lower bound:
    "lms": (3 - ORDER_TOLERANCE, math.inf),
}
DIM, BATCH = 16, 8
ODE_SAMPLERS = {k: f for k, f in SAMPLERS.items() if f.__module__ == samplers.__name__}  # those of samplers.py
STOCHASTIC_SAMPLERS = {k: f for k, f in SAMPLERS.items() if f.__module__ == samplers_sde.__name__}



@pytest.fixture(scope="module")
def problem():
    data = GaussianData(DIM, seed=0)
    g = torch.Generator().manual_seed(1)
    x_start = data.mu + SIGMA_MAX * torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    return data, x_start


def fitted_order(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    xs, ys = [math.log(n) for n in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def test_registry_has_the_known_samplers():
    assert set(EXPECTED_ORDER) <= set(ODE_SAMPLERS), f"missing: {set(EXPECTED_ORDER) - set(ODE_SAMPLERS)}"
    unclassified = set(SAMPLERS) - set(EXPECTED_ORDER) - set(STOCHASTIC_SAMPLERS)
    assert not unclassified, f"add {unclassified} to the Gaussian-oracle tests"


@pytest.mark.parametrize("name", sorted(ODE_SAMPLERS))
def test_converges_to_exact_ode_solution_at_expected_order(name, problem):
    data, x_start = problem
    exact = data.ode_solution(x_start, SIGMA_MAX, SIGMA_MIN)
    scale = (exact - data.mu).abs().max()
    errors = []
    for n in STEPS:
        out = ODE_SAMPLERS[name](data.denoiser, x_start.float(), karras_sigmas(n + 1))  # n steps, no trailing 0
        assert out.dtype == torch.float32 and out.shape == x_start.shape
        errors.append(float((out.double() - exact).abs().max() / scale))
    assert all(b < a for a, b in zip(errors[:-1], errors[1:], strict=True)), f"{name}: errors not decreasing: {errors}"
    low, high = EXPECTED_ORDER.get(name, (1 - ORDER_TOLERANCE, math.inf))  # a new sampler: at least first order
    order = fitted_order(STEPS, errors)
    assert low <= order <= high, f"{name}: fitted order {order:.2f} not in [{low}, {high}]; errors {errors}"


@pytest.mark.parametrize("name", sorted(ODE_SAMPLERS))
def test_full_schedule_ends_at_the_exact_sample(name, problem):
    """With the trailing 0, the end point is x(0) up to the last step's denoising error plus the
    integration error to sigma_min (both measured here, the first from the exact solution)."""
    data, x_start = problem
    n = 40
    sigmas = torch.cat([karras_sigmas(n), torch.zeros(1, dtype=torch.float64)])
    out = ODE_SAMPLERS[name](data.denoiser, x_start.float(), sigmas).double()
    at_min = data.ode_solution(x_start, SIGMA_MAX, SIGMA_MIN)
    exact_end = data.ode_solution(x_start, SIGMA_MAX, 0.0)
    last_step_error = (data.denoiser(at_min, torch.full((BATCH,), SIGMA_MIN)).double() - exact_end).abs().max()
    integration_error = (ODE_SAMPLERS[name](data.denoiser, x_start.float(), karras_sigmas(n)).double() - at_min)
    bound = last_step_error + 2 * integration_error.abs().max() + 1e-5  # + float32 round-off
    assert (out - exact_end).abs().max() <= bound
