"""Guidance: wrappers that take a denoiser and return a denoiser, so every sampler gets them for free.

- `cfg_denoiser`: classifier-free guidance (Ho & Salimans 2022), negative prompts, guidance rescale
  (Lin et al. 2024), guidance truncation below a minimum sigma (A1111's NGMS: every other call) and
  the CFG cutoff (diffusers' `SDCFGCutoffCallback`: every call below a sigma).
- `inpaint_blend_denoiser`: inpainting with a regular (non-inpainting) model by blending the known
  latents back at every step.
A denoiser is any callable `denoiser(x, sigma, cond) -> x0` (daguerre.diffusion.denoisers).
"""

from __future__ import annotations

import math

import torch

from .diffusion.denoisers import Cond, DenoiserFn, append_dims, batch_sigma

RESCALE_SPACES = ("eps", "v", "x0")
_SPACE_OF_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _merge_cond(cond: Cond, uncond: Cond, batch: int) -> Cond | None:
    """One cond dict with cond's rows first and uncond's after, or None if they cannot be batched.

    A key missing from `uncond` takes cond's value (e.g. the "concat" channels of an inpainting
    model); an uncond tensor with batch 1 is repeated to `batch` rows.
    """
    merged: Cond = {}
    for key in set(cond) | set(uncond):
        a = cond.get(key)
        b = uncond.get(key, a)
        if a is None and b is None:
            merged[key] = None
            continue
        if a is None or b is None:
            raise ValueError(f"conditioning {key!r} is None on one side of classifier-free guidance only: give both")
        if b.shape[0] == 1 and batch != 1:
            b = b.expand(batch, *b.shape[1:])
        if a.shape[1:] != b.shape[1:]:
            return None  # e.g. prompts of different token lengths: fall back to two calls
        merged[key] = torch.cat([a, b.to(a.dtype)])
    return merged


def _to_space(space: str, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The prediction `space` ("eps", "v" or "x0") equivalent to a denoised x0 at (x, sigma) (B, 1, 1, 1)."""
    if space == "eps":
        return (x - x0) / sigma
    if space == "v":  # x0 = x/(s^2+1) - s/sqrt(s^2+1) v
        return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1).sqrt() / sigma
    return x0


def _from_space(space: str, x: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    if space == "eps":
        return x - sigma * pred
    if space == "v":
        return x / (sigma**2 + 1) - sigma / (sigma**2 + 1).sqrt() * pred
    return pred


def rescale_guidance(guided: torch.Tensor, cond_pred: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, sec. 3.4, eqs. 15-16): scale the guided prediction to the
    per-sample standard deviation of the conditional one, and mix by `rescale` (diffusers' `rescale_noise_cfg`).
    A guided prediction of zero spread (a constant) is left as it is: diffusers divides by zero there
    and turns the whole image NaN."""
    dims = list(range(1, guided.ndim))
    std_cond = cond_pred.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    tiny = torch.finfo(std_guided.dtype).tiny  # a safe divisor, so no NaN reaches a gradient either
    ratio = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(tiny), torch.ones_like(std_guided))
    return rescale * guided * ratio + (1 - rescale) * guided


def cfg_denoiser(
    denoiser: DenoiserFn,
    uncond: Cond,
    scale: float,
    rescale: float = 0.0,
    rescale_space: str | None = None,
    min_sigma: float = 0.0,
    cutoff_sigma: float = 0.0,
) -> DenoiserFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser:
    x0 = x0_uncond + scale (x0_cond - x0_uncond), the same in eps space since eps is affine in x0.

    `uncond` is the conditioning of the unconditional branch: the empty prompt's context, or a
    negative prompt's context (negative prompts are nothing more). Both branches run as ONE network
    call on a doubled batch (every tensor of the two cond dicts concatenated along the batch; if their
    shapes differ, e.g. prompts of different token lengths, two calls are made). scale == 1 skips the
    unconditional call entirely. `rescale` > 0 applies guidance rescale in `rescale_space`: "eps", "v"
    or "x0"; None uses the space the wrapped network predicts in (its `prediction_type`, as diffusers
    rescales the raw model output), or "eps" for a plain function.

    `min_sigma` > 0 truncates guidance as AUTOMATIC1111's "negative guidance minimum sigma" (`s_min_uncond`,
    PNG key NGMS) does, so its images replay: counting the calls of this denoiser from 0, every odd call
    whose sigmas all lie below it runs the conditional half alone (half the network batch) and returns its
    prediction, as scale 1 would. 0 (the default) never skips: plain CFG.

    `cutoff_sigma` > 0 is the CFG cutoff of diffusers (`SDCFGCutoffCallback`, guidance off for the last part
    of the steps): EVERY call whose sigmas all lie below it runs the conditional half alone, at half the
    network batch. 0 (the default) never cuts off.
    """
    space = rescale_space or _SPACE_OF_PREDICTION.get(getattr(denoiser, "prediction_type", "epsilon"), "eps")
    if space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale_space {rescale_space!r}; choose one of {', '.join(RESCALE_SPACES)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale}: an infinite scale makes NaN images")
    if not (math.isfinite(min_sigma) and min_sigma >= 0):
        raise ValueError(f"guidance minimum sigma must be a finite number >= 0 (0 = never skip), got {min_sigma}")
    if not (math.isfinite(cutoff_sigma) and cutoff_sigma >= 0):
        raise ValueError(f"CFG cutoff sigma must be a finite number >= 0 (0 = never cut off), got {cutoff_sigma}")

    calls = [0]  # the calls made so far (A1111 counts every network evaluation, Heun's second one too)

    def guided(x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        cond = cond or {}
        if scale == 1.0:
            return denoiser(x, sigma, cond)
        b = x.shape[0]
        sig = batch_sigma(sigma, x)  # (B,)
        call, calls[0] = calls[0], calls[0] + 1
        if cutoff_sigma > 0 and bool((sig < cutoff_sigma).all()):  # cut off: conditional half alone
            return denoiser(x, sigma, cond)
        if min_sigma > 0 and call % 2 == 1 and bool((sig < min_sigma).all()):  # truncated: conditional half alone
            return denoiser(x, sigma, cond)
        merged = _merge_cond(cond, uncond, b)
        if merged is not None:
            x0_cond, x0_uncond = denoiser(torch.cat([x, x]), torch.cat([sig, sig]), merged).chunk(2)
        else:
            x0_cond = denoiser(x, sig, cond)
            x0_uncond = denoiser(x, sig, {**cond, **uncond})
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)
        if rescale == 0.0:
            return x0
        s = append_dims(sig, x.ndim)  # (B, 1, 1, 1)
        pred = rescale_guidance(_to_space(space, x, s, x0), _to_space(space, x, s, x0_cond), rescale)
        return _from_space(space, x, s, pred)

    return guided


def inpaint_blend_denoiser(denoiser: DenoiserFn, x0_known: torch.Tensor, mask: torch.Tensor) -> DenoiserFn:
    """Inpainting with a regular model by blending the denoised estimate with the known latents:
    x0 = mask * D(x, sigma) + (1 - mask) * x0_known (mask 1 = repaint, soft masks allowed; the idea of
    RePaint / "blended latent diffusion", Avrahami et al. 2023, applied to x0 rather than to x_t).

    Why blend x0 and not the noised known latent after each step (A1111/diffusers' legacy inpaint):
    every sampler sees the model only through this function, so no sampler needs a hook; and since
    the known region's x0 is then constant, the sampling ODE there, dx/dsigma = (x - x0_known)/sigma, is
    solved exactly by every first- and multi-step solver (Euler, Heun, DPM-Solver++, LMS, UniPC,
    DDIM): x stays x0_known + sigma eps_start, a consistently noised copy of the known image, and
    reaches x0_known exactly at sigma = 0; ancestral/SDE samplers keep it on x0_known + sigma * noise too.
    The history of multistep solvers is never contradicted by an outside overwrite. Start from
    x = x0_known + sigma_0 noise (img2img-style) or pure noise; both converge to x0_known outside the mask.
    `x0_known` (B, C, h, w) and `mask` (B or 1, 1 or C, h, w) are in latent resolution.
    """
    known = x0_known.float()
    m = mask.float()

    def blended(x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        x0 = denoiser(x, sigma, cond)
        return m * x0 + (1 - m) * known

    return blended
