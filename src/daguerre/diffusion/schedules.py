"""Noise schedules: betas, alpha-bars, sigmas, timestep spacings and sampling sigma schedules.

Everything here is float64 and stateless. The discrete forward process of DDPM (Ho et al. 2020) is
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; dividing by sqrt(abar_t) gives the variance-exploding
"sigma space" of k-diffusion / EDM (Karras et al. 2022), x = x_0 + sigma eps with
sigma_t = sqrt((1 - abar_t) / abar_t), in which every sampler of daguerre works. A sampling schedule
is a descending 1-D tensor of n + 1 sigmas ending in an appended 0.
"""

from __future__ import annotations

import math

import torch

from ..config import ScheduleConfig

DTYPE = torch.float64
COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: small offset so beta_0 is not vanishingly small
COSINE_MAX_BETA = 0.999  # ... and betas clipped below 1 to avoid a singularity at t = T
ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' stand-in for abar_T = 0, so sigma_T ~ 4096 stays finite
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: the paper's value
A1111_MAX_STRENGTH = 0.999  # img2img: A1111 caps strength below 1 so int(strength * n) is at most n - 1
DEFAULT_STEPS_OFFSET = 1  # `steps_offset` of Stable Diffusion's scheduler_config.json (leading spacing)

SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SCHEDULES = ("default", "normal", "karras", "exponential", "sgm_uniform", "simple")


# --- betas and alpha-bars --------------------------------------------------------------------------

def make_betas(kind: str, n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The (n,) betas of a discrete schedule: "linear" (DDPM, Ho et al. 2020: linspace of beta),
    "scaled_linear" (Stable Diffusion: linspace of sqrt(beta), squared) or "cosine" (Nichol & Dhariwal
    2021, eq. 17: abar_t = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) pi/2), betas clipped at 0.999;
    beta_start and beta_end are ignored)."""
    if n < 1:
        raise ValueError(f"number of training timesteps must be >= 1, got {n}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=DTYPE)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=DTYPE) ** 2
    if kind == "cosine":
        t = torch.arange(n + 1, dtype=DTYPE) / n
        f = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # (n+1,) unnormalised abar
        return (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"unknown beta schedule {kind!r}; choose 'linear', 'scaled_linear' or 'cosine'")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that the last timestep has zero SNR (abar_T = 0), keeping abar_0 (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Algorithm 1): sqrt(abar) is
    shifted to end at 0 and scaled back to its original start."""
    sqrt_abar = alphas_cumprod(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4), float64."""
    return torch.cumprod(1 - betas.to(DTYPE), dim=0)


def betas_from_config(cfg: ScheduleConfig) -> torch.Tensor:
    """The betas a model was trained with, zero-terminal-SNR rescaled when the config asks for it."""
    betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def model_sigmas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) ascending sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (k-diffusion's `sigmas`).

    With zero terminal SNR abar_T = 0 and sigma_T would be infinite; like diffusers we replace
    abar_T = 0 by 2**-24, so sigma_T ~ 4096: finite, and large enough that x / sqrt(sigma^2 + 1) is the
    pure noise a v-prediction model expects there.
    """
    abar = alphas_cumprod(betas_from_config(cfg))
    abar = torch.where(abar > 0, abar, torch.full_like(abar, ZERO_SNR_ALPHA_BAR))
    return ((1 - abar) / abar).sqrt()


def q_sample(x0: torch.Tensor, abar_t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """The closed-form forward process in DDPM form, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    (Ho et al. 2020, eq. 4). `abar_t`: a float, a scalar or a (B,) tensor broadcast over the batch."""
    abar = torch.as_tensor(abar_t, dtype=torch.float32, device=x0.device)
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1))) if abar.ndim else abar  # (B, 1, 1, 1)
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


# --- sigma <-> continuous timestep -----------------------------------------------------------------

def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The continuous timestep of `sigma`: linear interpolation in log sigma between the model's
    discrete log sigmas (k-diffusion's `DiscreteSchedule.sigma_to_t`), clamped to [0, T-1]. A sigma
    equal to a model sigma gives its integer t exactly. Computed in float64 on `log_sigmas`' device."""
    log_sigmas = log_sigmas.to(DTYPE)
    log_sigma = torch.as_tensor(sigma, dtype=DTYPE).to(log_sigmas.device).log()
    n = log_sigmas.shape[0]
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, n - 2)
    low = low.reshape(log_sigma.shape)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return low.to(DTYPE) + w


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The sigma of a continuous timestep: the inverse of `sigma_to_t` (k-diffusion's `t_to_sigma`),
    exp of the linear interpolation of log sigma between the two neighbouring integer timesteps."""
    log_sigmas = log_sigmas.to(DTYPE)
    t = torch.as_tensor(t, dtype=DTYPE).to(log_sigmas.device).clamp(0, log_sigmas.shape[0] - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# --- timestep spacing ------------------------------------------------------------------------------

def timesteps(n_steps: int, T: int, spacing: str = "leading", steps_offset: int = DEFAULT_STEPS_OFFSET) -> torch.Tensor:
    """The n_steps descending sampling timesteps of diffusers' three conventions (Lin et al. 2024,
    Table 2), as float64: "leading" = arange(n) * (T // n) + steps_offset (Stable Diffusion's
    scheduler, offset 1; clamped to T-1), "trailing" = round(arange(T, 0, -T/n)) - 1 (starts at T-1),
    "linspace" = linspace(0, T-1, n) unrounded (diffusers' Euler-family schedulers; DDIM rounds it)."""
    if not 1 <= n_steps <= T:
        raise ValueError(f"number of steps must be between 1 and {T} (the training timesteps), got {n_steps}")
    if spacing == "leading":
        ts = torch.arange(n_steps, dtype=DTYPE) * (T // n_steps) + steps_offset
        ts = ts.clamp(max=T - 1)
    elif spacing == "trailing":
        ts = torch.arange(T, 0, -T / n_steps, dtype=DTYPE).round() - 1
        ts = ts.flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n_steps, dtype=DTYPE)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return ts.flip(0)


# --- sampling sigma schedules (n + 1 values ending in 0) -------------------------------------------

def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(DTYPE), sigmas.new_zeros(1, dtype=DTYPE)])


def _check_steps(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {n}")


def sigmas_default(
    n: int, model_sigmas: torch.Tensor, spacing: str = "leading", steps_offset: int = DEFAULT_STEPS_OFFSET
) -> torch.Tensor:
    """The model's own sigmas at the `timesteps` of `spacing`, then 0. Integer timesteps (leading,
    trailing) give the discrete sigmas exactly (DDIM/PLMS/Euler in diffusers); the fractional timesteps
    of "linspace" are interpolated in log sigma, as k-diffusion's `get_sigmas` and A1111/ComfyUI's
    "Normal" do (diffusers' Euler interpolates sigma linearly there: a difference of < 1% in sigma)."""
    _check_steps(n)
    ts = timesteps(n, model_sigmas.shape[0], spacing, steps_offset)
    return _append_zero(t_to_sigma(ts, model_sigmas.log()))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=DTYPE)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log sigma from sigma_max to sigma_min (k-diffusion's exponential), then 0."""
    _check_steps(n)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=DTYPE).exp())


def sigmas_uniform(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """"SGM Uniform" (A1111, ComfyUI `sgm_uniform`): n + 1 continuous timesteps evenly spaced from T-1 to
    0, the last dropped, mapped to sigma by log interpolation, then 0."""
    _check_steps(n)
    T = model_sigmas.shape[0]
    ts = torch.linspace(T - 1, 0, n + 1, dtype=DTYPE)[:-1]
    return _append_zero(t_to_sigma(ts, model_sigmas.log()))


def sigmas_simple(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's "simple": every (T/n)-th discrete sigma counted down from the largest, then 0."""
    _check_steps(n)
    T = model_sigmas.shape[0]
    stride = T / n
    idx = torch.tensor([T - 1 - int(i * stride) for i in range(n)])
    return _append_zero(model_sigmas.to(DTYPE)[idx])


def get_sigmas(
    kind: str,
    n: int,
    model_sigmas: torch.Tensor,
    *,
    spacing: str = "leading",
    steps_offset: int = DEFAULT_STEPS_OFFSET,
    rho: float = KARRAS_RHO,
) -> torch.Tensor:
    """A sampling schedule by name: "default"/"normal" (the model's sigmas at `spacing`), "karras",
    "exponential" (from the model's smallest to largest sigma, k-diffusion / A1111 convention),
    "sgm_uniform" or "simple"; n + 1 float64 values ending in 0."""
    sigma_min, sigma_max = float(model_sigmas[0]), float(model_sigmas[-1])
    if kind in ("default", "normal"):
        return sigmas_default(n, model_sigmas, spacing, steps_offset)
    if kind == "karras":
        return sigmas_karras(n, sigma_min, sigma_max, rho)
    if kind == "exponential":
        return sigmas_exponential(n, sigma_min, sigma_max)
    if kind == "sgm_uniform":
        return sigmas_uniform(n, model_sigmas)
    if kind == "simple":
        return sigmas_simple(n, model_sigmas)
    raise ValueError(f"unknown sigma schedule {kind!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a schedule of n steps that img2img runs at denoising `strength` in [0, 1], by
    AUTOMATIC1111's rule: t_enc = int(min(strength, 0.999) n) and the tail is sigmas[n - t_enc - 1:]
    (t_enc + 1 steps, starting from the sigma the input image is noised to). Strength 1 gives the whole
    schedule; strength 0 (where A1111 would still run one step) gives tensor([0.]): no step at all."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return sigmas[-1:].clone()
    n = sigmas.shape[0] - 1
    t_enc = int(min(strength, A1111_MAX_STRENGTH) * n)
    return sigmas[n - t_enc - 1:].clone()

