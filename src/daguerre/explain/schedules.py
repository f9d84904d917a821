"""`daguerre explain schedules`: the noise schedules side by side, and the sampling sigmas at N steps.

A discrete schedule is its betas; everything else follows (schedules.py): alpha-bar abar_t = prod (1 - beta_s)
(Ho et al. 2020, eq. 4), the signal-to-noise ratio SNR_t = abar_t / (1 - abar_t) (Kingma et al. 2021) and
sigma_t = sqrt((1 - abar_t) / abar_t) = 1 / sqrt(SNR_t), the noise level of sigma space x = x0 + sigma eps
where the samplers run. The four schedules drawn: DDPM's linear betas (1e-4 to 0.02), Stable Diffusion's
scaled-linear (0.00085 to 0.012), the cosine schedule (Nichol & Dhariwal 2021) and scaled-linear rescaled to zero
terminal SNR (Lin et al. 2024), plus the model's own when `--model` is given. The second figure shows the n + 1
sigmas a sampler steps through at `--steps` N: Karras et al. 2022 (rho = 7), exponential (even in log sigma) and
uniform (timesteps evenly spaced, A1111's "Uniform"/"Normal"), for the model's sigma range.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import check_count, figure_path, model_config
from .page import Figure, new_figure, save_figure

if TYPE_CHECKING:
    import torch

    from ..config import ScheduleConfig

DDPM_LINEAR = (1e-4, 0.02)  # Ho et al. 2020: beta_1 and beta_T of the linear schedule
SD_SCALED_LINEAR = (0.00085, 0.012)  # Stable Diffusion's (CompVis linear_start, linear_end)
T_DEFAULT = 1000
MAX_TIMESTEPS = 10_000  # training timesteps of a drawn schedule, at most
MAX_SAMPLING_STEPS = 200
SIGMA_KINDS = ("karras", "exponential", "uniform")  # the sampling sigma sequences drawn


@dataclass(frozen=True)
class Curves:
    """One discrete schedule over t = 0..T-1, float64: abar_t, SNR_t = abar / (1 - abar), sigma_t."""

    label: str
    alphas_cumprod: torch.Tensor
    snr: torch.Tensor
    sigmas: torch.Tensor


def curves(label: str, betas: torch.Tensor) -> Curves:
    """The `Curves` of a schedule's betas. Where abar_t = 0 (zero terminal SNR) the SNR is 0 and sigma infinite."""
    import torch

    from ..diffusion.schedules import alphas_cumprod

    abar = alphas_cumprod(betas)
    snr = abar / (1 - abar)
    sigma = torch.where(abar > 0, ((1 - abar) / abar.clamp(min=1e-300)).sqrt(), torch.full_like(abar, math.inf))
    return Curves(label, abar, snr, sigma)


def standard_schedules(T: int = T_DEFAULT) -> list[Curves]:
    """DDPM linear, SD scaled-linear, cosine and zero-terminal-SNR scaled-linear, each over T training steps."""
    from ..diffusion.schedules import make_betas, rescale_zero_terminal_snr

    check_count(T, 2, MAX_TIMESTEPS, "training timesteps", "--timesteps")
    scaled = make_betas("scaled_linear", T, *SD_SCALED_LINEAR)
    return [
        curves(f"linear (DDPM, beta {DDPM_LINEAR[0]:g} to {DDPM_LINEAR[1]:g})", make_betas("linear", T, *DDPM_LINEAR)),
        curves(f"scaled linear (SD, {SD_SCALED_LINEAR[0]:g} to {SD_SCALED_LINEAR[1]:g})", scaled),
        curves("cosine (Nichol & Dhariwal)", make_betas("cosine", T)),
        curves("scaled linear, zero terminal SNR", rescale_zero_terminal_snr(scaled)),
    ]


def model_curves(schedule: ScheduleConfig, name: str) -> Curves:
    """The curves of the schedule a model was trained with."""
    from ..diffusion.schedules import betas_from_config

    return curves(f"{name} (this model)", betas_from_config(schedule))


def sampling_sigmas(steps: int, model_sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    """kind -> the steps + 1 sigmas (ending in 0) of Karras, exponential and uniform over the model's sigma range."""
    from ..diffusion.schedules import get_sigmas, sigmas_default

    check_count(steps, 1, MAX_SAMPLING_STEPS, "sampling steps", "--steps")
    return {
        "karras": get_sigmas("karras", steps, model_sigmas),
        "exponential": get_sigmas("exponential", steps, model_sigmas),
        "uniform": sigmas_default(steps, model_sigmas, "linspace"),
    }


def draw_schedules(schedules: list[Curves], path, replace: bool = False):
    """Three panels over t: alpha-bar (linear axis), SNR and sigma (log axes)."""
    fig = new_figure(12, 3.6)
    axes = fig.subplots(1, 3)
    for c in schedules:
        t = range(len(c.alphas_cumprod))
        style = {"linestyle": "--", "color": "black", "linewidth": 1.2} if "this model" in c.label else {}
        axes[0].plot(t, c.alphas_cumprod.numpy(), label=c.label, **style)
        axes[1].plot(t, c.snr.numpy(), **style)
        axes[2].plot(t, c.sigmas.numpy(), **style)
    axes[0].set_title("alpha-bar: share of the signal's variance left")
    axes[1].set_title("SNR = abar / (1 - abar)")
    axes[2].set_title("sigma = sqrt((1 - abar) / abar)")
    for ax in axes[1:]:
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training timestep t")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    return save_figure(fig, path, replace=replace)


def draw_sigmas(sequences: dict[str, torch.Tensor], model_name: str, path, replace: bool = False):
    """The sigma a sampler reaches after each step, per schedule, on a log axis (the final 0 left off)."""
    fig = new_figure(7, 3.6)
    ax = fig.subplots()
    for kind, sigmas in sequences.items():
        ax.plot(range(len(sigmas) - 1), sigmas[:-1].numpy(), marker="o", markersize=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step i (then a last step to sigma = 0)")
    ax.set_ylabel("sigma_i")
    from matplotlib.ticker import MaxNLocator

    first = next(iter(sequences.values()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{len(first) - 1} steps from sigma {float(first[0]):.4g} to {float(first[-2]):.3g} "
                 f"(the range of {model_name})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, replace=replace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20,
                   help=f"sampling steps of the sigma sequences (default 20, at most {MAX_SAMPLING_STEPS})")
    p.add_argument("--timesteps", type=int, default=T_DEFAULT,
                   help=f"training timesteps T of the standard schedules (default {T_DEFAULT})")


def run(args: argparse.Namespace) -> list[Figure]:
    from ..diffusion.schedules import model_sigmas

    check_count(args.steps, 1, MAX_SAMPLING_STEPS, "sampling steps", "--steps")
    schedules = standard_schedules(args.timesteps)
    cfg = model_config(args.model)
    schedules.append(model_curves(cfg.schedule, cfg.name))
    a = draw_schedules(schedules, figure_path(args, "schedules.png"), args.overwrite)
    sequences = sampling_sigmas(args.steps, model_sigmas(cfg.schedule))
    b = draw_sigmas(sequences, cfg.name, figure_path(args, "sigmas.png"), args.overwrite)
    s = cfg.schedule
    own = f"{s.beta_schedule}{', zero terminal SNR' if s.zero_terminal_snr else ''}, {s.prediction_type}"
    return [
        Figure(a, "How much of the image survives at each training timestep: alpha-bar falls from 1 towards 0, "
                  "the SNR and sigma span many orders of magnitude; zero terminal SNR ends in pure noise "
                  f"(SNR 0), the others leave a trace of the image at t = T; the dashed line is {cfg.name}'s "
                  f"schedule ({own}).", title="Noise schedules"),
        Figure(b, f"The noise levels a sampler steps through in {args.steps} steps, on a log axis: exponential is "
                  "a straight line (the same ratio at every step), Karras (rho = 7) stays longer at large sigma "
                  "and takes its biggest ratios at the end, uniform (evenly spaced training timesteps) leaves the "
                  "largest sigma at once and spends its steps in the middle of the range.",
               title="Sampling sigmas"),
    ]
