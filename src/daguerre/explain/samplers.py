"""`daguerre explain samplers`: how fast each sampler approaches the exact answer as it takes more steps.

A deterministic sampler integrates the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al.
2022, eq. 4) from sigma_max down to sigma_min. For Gaussian data the ideal denoiser D and the exact solution are
known in closed form (`daguerre.diffusion.gaussian`, the oracle the sampler tests use), so the error of a sampler
is measurable: the largest error of its end point against the exact one, relative to the solution's spread,
after n Karras steps (rho = 7) over the model's sigma range. On a log-log plot a method of order p is a line of
slope -p (Euler and DDIM 1, Heun, DPM2, DPM++ 2M and PLMS 2, UniPC 3); the second panel counts denoiser calls
instead of steps, the cost that matters (Heun and DPM2 call the network twice per step). Stochastic samplers
are not drawn: their end point is random, so it has no single exact value to compare with.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import check_count, figure_path, int_list, model_config
from .page import Figure, new_figure, save_figure

if TYPE_CHECKING:
    import torch

DEFAULT_SAMPLERS = ("euler", "heun", "dpmpp_2m", "unipc")
DEFAULT_STEPS = (5, 10, 20, 40, 80)
MAX_STEPS = 1000  # steps of one run
MAX_RUNS = 12  # step counts per sampler
DIM, BATCH = 16, 8  # data dimensions (each with its own mean and scale) and starting points
ORDER_POINTS = 3  # the order is fitted over the largest step counts
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*", "<", ">")  # one per sampler, so that lines on top of each other
# (DDIM is Euler in sigma space) still show
DATA_SEED = 0  # the Gaussian data (means and scales); --seed draws the starting points


@dataclass(frozen=True)
class Convergence:
    """One sampler's errors on Gaussian data: `errors[k]` after `steps[k]` steps, which took `calls[k]`
    denoiser calls; `order` is the least-squares slope of -log(error) against log(steps) over the last
    ORDER_POINTS step counts (the asymptotic regime: few steps over a wide sigma range are far from it)."""

    sampler: str
    steps: tuple[int, ...]
    calls: tuple[int, ...]
    errors: tuple[float, ...]

    @property
    def order(self) -> float:
        xs = [math.log(n) for n in self.steps[-ORDER_POINTS:]]
        ys = [math.log(max(e, 1e-300)) for e in self.errors[-ORDER_POINTS:]]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return -sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else math.nan


def deterministic_samplers() -> list[str]:
    """The samplers whose result is a function of the starting point (those of diffusion/samplers.py)."""
    from ..diffusion import samplers
    from ..diffusion.sampler_names import SAMPLERS

    return [name for name, f in SAMPLERS.items() if f.__module__ == samplers.__name__]


def check_samplers(names: tuple[str, ...]) -> tuple[str, ...]:
    valid = deterministic_samplers()
    for name in names:
        if name not in valid:
            raise ValueError(f"--samplers: {name!r} is not a deterministic sampler (a stochastic one has no single "
                             f"exact answer to compare with); choose from {', '.join(valid)}")
    check_count(len(names), 1, len(valid), "samplers", "--samplers with")
    return tuple(names)


def check_steps(steps: tuple[int, ...]) -> tuple[int, ...]:
    check_count(len(steps), 1, MAX_RUNS, "step counts", "--steps with")
    for n in steps:
        check_count(n, 1, MAX_STEPS, "steps of a run", "--steps:")
    return tuple(sorted(set(steps)))


def convergence(sampler: str, steps: tuple[int, ...], sigma_min: float, sigma_max: float,
                seed: int = 0) -> Convergence:
    """The error of `sampler` against the exact ODE solution from sigma_max to sigma_min after each number of
    `steps` (n Karras steps: n + 1 sigmas, no final step to 0, so the error measures the integration alone)."""
    import torch

    from ..diffusion.gaussian import GaussianData, karras_sigmas
    from ..diffusion.sampler_names import SAMPLERS

    check_samplers((sampler,))
    steps = check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"the sigma range must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    data = GaussianData(DIM, seed=DATA_SEED)
    gen = torch.Generator().manual_seed(seed)
    x_start = data.mu + sigma_max * torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)  # (B, D)
    exact = data.ode_solution(x_start, sigma_max, sigma_min)
    scale = float((exact - data.mu).abs().max())
    calls: list[int] = []
    errors: list[float] = []
    for n in steps:
        count = [0]

        def denoiser(x: torch.Tensor, sigma: torch.Tensor, _count: list = count, **kw: object) -> torch.Tensor:
            _count[0] += 1
            return data.denoiser(x, sigma, **kw)

        out = SAMPLERS[sampler](denoiser, x_start.float(), karras_sigmas(n + 1, sigma_min, sigma_max))
        calls.append(count[0])
        errors.append(float((out.double() - exact).abs().max()) / scale)
    return Convergence(sampler, steps, tuple(calls), tuple(errors))


def draw(results: list[Convergence], sigma_min: float, sigma_max: float, path, replace: bool = False):
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for i, r in enumerate(results):
        style = {"marker": MARKERS[i % len(MARKERS)], "markersize": 5, "linestyle": "-" if i % 2 == 0 else "--"}
        line = axes[0].plot(r.steps, r.errors, label=f"{r.sampler} (order {r.order:.1f})", **style)
        axes[1].plot(r.calls, r.errors, color=line[0].get_color(), **style)
    for ax, what, ticks in zip(axes, ("sampling steps", "denoiser calls (the network's cost)"),
                               (results[0].steps, sorted({c for r in results for c in r.calls})), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(ticks if len(ticks) <= 8 else ticks[::2])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("relative error of the end point")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Gaussian data, exact probability-flow ODE from sigma {sigma_max:.4g} to {sigma_min:.3g} "
                 "(Karras steps)", fontsize=10)
    return save_figure(fig, path, replace=replace)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samplers", type=_names, default=DEFAULT_SAMPLERS,
                   help=f"comma-separated deterministic samplers (default {','.join(DEFAULT_SAMPLERS)})")
    p.add_argument("--steps", type=int_list("5,10,20"), default=DEFAULT_STEPS,
                   help=f"comma-separated step counts (default {','.join(map(str, DEFAULT_STEPS))}; each at most "
                        f"{MAX_STEPS}, at most {MAX_RUNS} of them)")


def run(args: argparse.Namespace) -> list[Figure]:
    from ..diffusion.schedules import model_sigmas

    names, steps = check_samplers(args.samplers), check_steps(args.steps)
    cfg = model_config(args.model)
    sigmas = model_sigmas(cfg.schedule)
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    results = [convergence(name, steps, lo, hi, args.seed) for name in names]
    path = draw(results, lo, hi, figure_path(args, "samplers.png"), args.overwrite)
    best = min(results, key=lambda r: r.errors[-1])
    return [Figure(path, f"Each sampler's error against the exact solution on Gaussian data over {cfg.name}'s "
                         f"noise range, as the steps grow: a line of slope -p is a method of order p (fitted over "
                         f"the last {ORDER_POINTS} step counts), so doubling the steps divides the error by 2^p; at "
                         f"{steps[-1]} steps {best.sampler} is closest ({best.errors[-1]:.2g}); the right panel "
                         "counts denoiser calls, the real cost.", title="Sampler convergence")]
