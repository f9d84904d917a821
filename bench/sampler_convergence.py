"""Convergence of every sampler on Gaussian data, where the exact answer is known (daguerre/diffusion/gaussian.py).

Deterministic samplers: relative max error of the end point against the exact probability-flow ODE
solution, integrating from sigma_max = 14.6 to sigma_min = 0.029 (SD's range) over n Karras steps
(the trailing step to sigma = 0, a plain denoising step for most samplers, is left out so that the
error measures the integration alone). Stochastic samplers: the relative error of the standard
deviation of many samples, |std((x - mu) / s) - 1| (their mean is exactly mu by symmetry), over the
real schedule ending in 0; it has a sampling floor of about 1 / sqrt(2 N). The order is the
least-squares slope of -log(error) against log(steps) over the points from 10 steps up that lie
above three times the floor.

    python bench/sampler_convergence.py                       # print the tables
    python bench/sampler_convergence.py --out /tmp/table.md   # ... and write them as markdown
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from daguerre.diffusion import samplers_sde
from daguerre.diffusion.gaussian import SIGMA_MAX, SIGMA_MIN, GaussianData, karras_sigmas
from daguerre.diffusion.sampler_names import SAMPLERS

DEFAULT_STEPS = (5, 10, 20, 40, 80)
DIM = 16  # data dimensions, each with its own mean and scale
ODE_BATCH = 8  # starting points for the deterministic samplers
FLOOR_FACTOR = 3.0  # fit the order only where the error is this many times above the sampling floor
MIN_FIT_STEPS = 10  # ... and from this many steps up (5 steps are far from the asymptotic regime)
CALLS_AT = 20  # steps at which the model calls are counted


class CountingDenoiser:
    """The ideal denoiser, counting its calls."""

    def __init__(self, data: GaussianData):
        self.data, self.calls = data, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: object) -> torch.Tensor:
        self.calls += 1
        return self.data.denoiser(x, sigma, **kw)


def fitted_order(steps: list[int], errors: list[float], floor: float = 0.0) -> float | None:
    """Least-squares slope of -log(error) against log(steps), over n >= MIN_FIT_STEPS and errors above the floor."""
    pts = [
        (math.log(n), math.log(e))
        for n, e in zip(steps, errors, strict=True)
        if n >= MIN_FIT_STEPS and e > FLOOR_FACTOR * floor
    ]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return -slope


def ode_errors(name: str, data: GaussianData, steps: list[int], seed: int) -> tuple[list[float], int]:
    """(relative end-point errors per step count, model calls at CALLS_AT steps) of a deterministic sampler."""
    g = torch.Generator().manual_seed(seed)
    x_start = data.mu + SIGMA_MAX * torch.randn(ODE_BATCH, DIM, generator=g, dtype=torch.float64)
    exact = data.ode_solution(x_start, SIGMA_MAX, SIGMA_MIN)
    scale = (exact - data.mu).abs().max()
    errors = []
    for n in steps:
        out = SAMPLERS[name](data.denoiser, x_start.float(), karras_sigmas(n + 1)).double()
        errors.append(float((out - exact).abs().max() / scale))
    return errors, _calls(name, data)


def sde_errors(name: str, data: GaussianData, steps: list[int], samples: int, seed: int) -> tuple[list[float], int]:
    """(|std of the standardised samples - 1| per step count, model calls at CALLS_AT steps) of a stochastic sampler."""
    errors = []
    for n in steps:
        sigmas = torch.cat([karras_sigmas(n), torch.zeros(1, dtype=torch.float64)])
        g = torch.Generator().manual_seed(seed)
        x = (data.mu + sigmas[0] * torch.randn(samples, DIM, generator=g, dtype=torch.float64)).float()
        out = SAMPLERS[name](data.denoiser, x, sigmas, generator=g).double()
        z = (out - data.mu) / data.s
        errors.append(abs(float(z.std()) - 1))
    return errors, _calls(name, data)


def _calls(name: str, data: GaussianData) -> int:
    counter = CountingDenoiser(data)
    sigmas = torch.cat([karras_sigmas(CALLS_AT), torch.zeros(1, dtype=torch.float64)])
    SAMPLERS[name](counter, torch.zeros(1, DIM), sigmas, generator=torch.Generator().manual_seed(0))
    return counter.calls


def markdown_table(title: str, rows: list[tuple[str, list[float], float | None, int]], steps: list[int]) -> str:
    head = f"| {title} | " + " | ".join(f"{n} steps" for n in steps) + f" | order | calls at {CALLS_AT} steps |"
    rule = "|" + "---|" * (len(steps) + 3)
    lines = [head, rule]
    for name, errors, order, calls in rows:
        cells = " | ".join(f"{e:.2e}" for e in errors)
        lines.append(f"| {name} | {cells} | {'-' if order is None else f'{order:.2f}'} | {calls} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    parser.add_argument("--samples", type=int, default=2**16, help="samples per dimension for stochastic samplers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the tables as markdown to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    data = GaussianData(DIM, seed=args.seed)
    t0 = time.time()
    ode_rows, sde_rows = [], []
    floor = 1 / math.sqrt(2 * args.samples * DIM)
    for name in SAMPLERS:
        try:
            if SAMPLERS[name].__module__ == samplers_sde.__name__:  # a stochastic sampler
                errors, calls = sde_errors(name, data, args.steps, args.samples, args.seed)
                order = None if name == "lcm" else fitted_order(args.steps, errors, floor)  # LCM does not converge
                sde_rows.append((name, errors, order, calls))
            else:
                errors, calls = ode_errors(name, data, args.steps, args.seed)
                ode_rows.append((name, errors, fitted_order(args.steps, errors), calls))
        except Exception as e:  # report a broken sampler and go on with the others
            print(f"{name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
    text = "\n\n".join([
        f"Deterministic: relative end-point error vs the exact ODE solution ({ODE_BATCH} x {DIM} values, "
        f"sigma {SIGMA_MAX} -> {SIGMA_MIN}, Karras rho 7)",
        markdown_table("sampler", ode_rows, args.steps),
        f"Stochastic: |std((x - mu) / s) - 1| over {args.samples} x {DIM} samples, Karras schedule ending in 0 "
        f"(sampling floor ~ {floor:.1e})",
        markdown_table("sampler", sde_rows, args.steps),
    ])
    print(text)
    print(f"\n({time.time() - t0:.0f} s)")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
