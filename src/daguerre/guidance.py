"""Guidance: wrappers that take a denoiser and return a denoiser, so every sampler gets them for free.

- `cfg_denoiser`: classifier-free guidance (Ho & Salimans 2022), negative prompts, guidance rescale
  (Lin et al. 2024), guidance truncation below a minimum sigma (A1111's NGMS: every other call) and
  the CFG cutoff (diffusers' `SDCFGCutoffCallback`: every call below a sigma).
- `inpaint_blend_denoiser`: inpainting with a regular (non-inpainting) model by blending the known
  latents back at every step.
- `clip_guided_denoiser`: CLIP guidance (Crowson's CLIP-guided diffusion, Disco Diffusion; k-diffusion's
  `cond_fn` form): the x0 estimate nudged down the gradient of a CLIP image-text distance.
- `noisy_clip_guided_denoiser`: the same with a noise-aware CLIP (GLIDE, Nichol et al. 2022, sec. 3), which
  reads the noisy x itself: no decoder, no cutouts, no backward pass through the denoiser.
A denoiser is any callable `denoiser(x, sigma, cond) -> x0` (daguerre.diffusion.denoisers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .diffusion.denoisers import Cond, DenoiserFn, append_dims, batch_sigma

if TYPE_CHECKING:
    from .models.clip import CLIPModel
    from .models.noisy_clip import NoisyCLIPModel

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


def _uncond_only(cond: Cond, uncond: Cond, batch: int) -> Cond:
    """The unconditional branch's cond dict: `uncond`'s tensors (batch-1 ones repeated to `batch` rows), and
    cond's for the keys `uncond` lacks ("concat" channels), as `_merge_cond` pairs them."""
    merged: Cond = dict(cond)
    for key, value in uncond.items():
        merged[key] = value.expand(batch, *value.shape[1:]) if value is not None and value.shape[0] == 1 else value
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
    unconditional call entirely, and scale == 0 the conditional one: the model is then unconditional (one
    call on `uncond`, e.g. so that CLIP guidance alone steers it), whatever `min_sigma` and `cutoff_sigma`
    say. `rescale` > 0 applies guidance rescale in `rescale_space`: "eps", "v"
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
        if scale == 0.0:  # x0_uncond + 0 (x0_cond - x0_uncond): the unconditional branch alone
            return denoiser(x, sigma, _uncond_only(cond, uncond, x.shape[0]))
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


# --- CLIP guidance ------------------------------------------------------------------------------------

CUTOUT_SEED_MIX = 0x5EED_C11F  # cutout generators: seed (seed + i) ^ this, apart from the sampler's noise stream


@dataclass(frozen=True)
class ClipGuidanceOptions:
    """The less-used knobs of CLIP guidance (the defaults are what docs/clip.md measured).

    `tv_scale` and `range_scale` weigh the total-variation penalty (mean squared difference of neighbouring
    pixels: smooths) and the range penalty (mean squared excess of the pixels beyond [-1, 1]) of the decoded
    x0 estimate. `clamp` bounds the RMS, per image, of the step sigma^2 grad taken from x0 (in the units of
    x0; Disco Diffusion's `clamp_max` bounds the gradient's RMS the same way), and below sigma_data to
    `clamp` sigma / sigma_data: a late step no larger than the noise still to be removed, which the
    sampler can absorb (larger ones stay in the image as artefacts). `through_denoiser`: the
    gradient with respect to x_t flows back through the denoiser (exact, as CLIP-guided diffusion does; a
    backward pass of the U-Net per call); False treats x0 as a leaf and uses the denoiser's Jacobian for
    Gaussian data with standard deviation `sigma_data`, dx0/dx = sigma_data^2 / (sigma^2 + sigma_data^2)
    (EDM's c_skip): no backward through the U-Net. `min_cut` is the smallest cutout side as a fraction of
    the image's shorter side, `cut_noise` the largest standard deviation of the noise added to a cutout."""

    tv_scale: float = 0.0
    range_scale: float = 0.0
    clamp: float = 0.3
    through_denoiser: bool = True
    sigma_data: float = 1.0
    min_cut: float = 0.5
    cut_noise: float = 0.05


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half the squared great-circle distance between the directions of `a` and `b` (..., D), in [0, pi^2/2]:
    2 arcsin(|a^ - b^| / 2)^2 (CLIP-guided diffusion's `spherical_dist_loss`); it falls as cos(a, b) rises."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared difference of vertically and horizontally neighbouring pixels of each image."""
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).pow(2).flatten(1).mean(1)
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).pow(2).flatten(1).mean(1)
    return (dx + dy) / 2


def range_penalty(pixels: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared excess of each image's pixels beyond [-1, 1]."""
    return (pixels - pixels.clamp(-1, 1)).pow(2).flatten(1).mean(1)


def make_cutouts(clip: CLIPModel, image: torch.Tensor, count: int, generator: torch.Generator,
                 options: ClipGuidanceOptions = ClipGuidanceOptions()) -> torch.Tensor:
    """`count` CLIP inputs (count, 3, S, S) of one image (C, H, W) in [-1, 1], differentiable: the whole image
    (CLIP's centre crop) first, then random squares of side min_cut..1 times the shorter side at random places,
    each with Gaussian noise of a random standard deviation up to `cut_noise` (the light augmentation: no flips,
    which would swap "left of" and "right of"), resized and normalised by `clip.preprocess`. Every random
    number comes from `generator` (CPU), so a seed gives the same cutouts on any device."""
    channels = clip.clip_config.vision.channels
    if image.shape[0] != channels:
        image = image.expand(channels, *image.shape[1:])  # a grey image for a colour CLIP
    h, w = image.shape[-2:]
    side = min(h, w)
    crops = [clip.preprocess(image[None])]
    for _ in range(count - 1):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        size = max(1, min(side, round(side * (options.min_cut + (1 - options.min_cut) * u[0]))))
        top, left = int(u[1] * (h - size + 1)), int(u[2] * (w - size + 1))
        crop = image[None, :, top:top + size, left:left + size]
        noise = torch.randn(crop.shape, generator=generator).to(crop) * (options.cut_noise * u[3])
        crops.append(clip.preprocess(crop + noise))
    return torch.cat(crops)


def clip_loss(clip: CLIPModel, pixels: torch.Tensor, target: torch.Tensor, cutouts: int,
              generators: Sequence[torch.Generator], options: ClipGuidanceOptions = ClipGuidanceOptions()
              ) -> torch.Tensor:
    """(B,) per-image loss of decoded images (B, C, H, W): the spherical distance between CLIP's embedding of
    each cutout and the text embedding `target` (1 or B, D), averaged over the image's `cutouts`."""
    b = pixels.shape[0]
    inputs = torch.cat([make_cutouts(clip, pixels[i], cutouts, generators[i], options) for i in range(b)])
    dtype = clip.visual_projection.weight.dtype
    embeds = clip.encode_image(inputs.to(dtype)).float().view(b, cutouts, -1)  # (B, K, D)
    return spherical_distance(embeds, target.float()[:, None, :]).mean(1)


def clip_guided_denoiser(
    denoiser: DenoiserFn,
    clip: CLIPModel,
    text_embedding: torch.Tensor,
    *,
    scale: float,
    cutouts: int,
    decode: Callable[[torch.Tensor], torch.Tensor],
    generators: Sequence[torch.Generator] | None = None,
    options: ClipGuidanceOptions = ClipGuidanceOptions(),
) -> DenoiserFn:
    """CLIP guidance as a denoiser, in k-diffusion's `cond_fn` form (`make_cond_model_fn`):

        x0' = x0 - sigma^2 grad_x L(x0(x)),   L = scale * mean_k d(E_I(cut_k(decode(x0))), E_T(text))
                                                  + tv_scale * TV + range_scale * R

    with x0 = D(x, sigma) the wrapped denoiser's estimate, d the spherical distance, E_I / E_T CLIP's image /
    text embeddings (`text_embedding`, (1 or B, D)) and cut_k the random cutouts (`make_cutouts`, one
    generator per image of `generators`, default: seed 0 each). Since D(x) = x + sigma^2 grad log p(x) (Tweedie),
    the nudge is the score plus -grad L: sampling from p(x) exp(-L), whatever the sampler (every sampler sees the
    model only through this function). `decode` maps x0 to pixels in [-1, 1], differentiably (a latent model's
    VAE decoder; the identity for a pixel model). The step sigma^2 grad is clamped per image
    (`options.clamp`, RMS). `scale` 0 returns `denoiser` itself; a call at sigma 0 is not guided. Wrap a
    CFG denoiser (`cfg_denoiser`) to guide on top of classifier-free guidance.
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"CLIP guidance scale must be a finite number >= 0 (0 = off), got {scale}")
    if cutouts < 1:
        raise ValueError(f"cutouts must be a whole number >= 1, got {cutouts}")
    if scale == 0.0 and options.tv_scale == 0.0 and options.range_scale == 0.0:
        return denoiser
    target = text_embedding.detach().float()

    def loss_of(x0: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        pixels = decode(x0).float()
        loss = scale * clip_loss(clip, pixels, target, cutouts, gens, options) if scale else 0.0
        if options.tv_scale:
            loss = loss + options.tv_scale * total_variation(pixels)
        if options.range_scale:
            loss = loss + options.range_scale * range_penalty(pixels)
        return loss.sum()  # images are independent: each one's gradient is its own loss's

    def guided(x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        sig = batch_sigma(sigma, x)  # (B,)
        if not bool((sig > 0).any()):
            return denoiser(x, sigma, cond)
        gens = generators if generators is not None else [torch.Generator().manual_seed(0) for _ in range(len(x))]
        if len(gens) != len(x):
            raise ValueError(f"{len(gens)} cutout generators for a batch of {len(x)}: give one per image")
        s = append_dims(sig, x.ndim)
        with torch.enable_grad():
            if options.through_denoiser:
                x_in = x.detach().requires_grad_()
                x0 = denoiser(x_in, sigma, cond)
                grad = torch.autograd.grad(loss_of(x0, gens), x_in)[0]
            else:
                with torch.no_grad():
                    x0 = denoiser(x, sigma, cond)
                leaf = x0.detach().requires_grad_()
                jacobian = options.sigma_data**2 / (s**2 + options.sigma_data**2)
                grad = torch.autograd.grad(loss_of(leaf, gens), leaf)[0] * jacobian
        step = s**2 * grad.float()
        dims = list(range(1, x.ndim))
        rms = step.pow(2).mean(dim=dims, keepdim=True).sqrt()
        bound = options.clamp * (s / options.sigma_data).clamp(max=1.0)  # never more than the noise left
        step = step * (bound / torch.maximum(rms, bound).clamp_min(1e-12))  # RMS at most `bound`, direction kept
        return x0.detach().float() - step

    return guided


NOISY_CLAMP = 1.0  # noise-aware CLIP guidance: the largest RMS of a step, in latent units (docs/clip.md)


def noisy_clip_guided_denoiser(
    denoiser: DenoiserFn,
    clip: NoisyCLIPModel,
    text_embedding: torch.Tensor,
    *,
    scale: float,
    clamp: float = NOISY_CLAMP,
) -> DenoiserFn:
    """Noise-aware CLIP guidance as a denoiser (GLIDE's CLIP guidance, Nichol et al. 2022, sec. 3, in
    k-diffusion's `cond_fn` form):

        x0' = x0 - sigma^2 grad_x L(x, sigma),   L = scale * d(E_I(x, sigma), E_T(text))

    with x0 = D(x, sigma) the wrapped denoiser's estimate, E_I the noise-aware CLIP's embedding of the noisy
    latents x themselves (`NoisyCLIPModel.encode_latents`), E_T the text's (`text_embedding`, (1 or B, D)) and d
    the spherical distance. As with a noisy classifier (Dhariwal & Nichol 2021), -grad_x L stands for
    grad_x log p(text | x): the sampler then follows the score of p(x) p(text | x)^scale' whatever its kind.
    The gradient needs no decoder, no cutouts and no backward pass through the denoiser. The step
    sigma^2 grad is clamped per image to an RMS of at most `clamp` (latent units). `scale` 0 returns `denoiser`
    itself; a call at sigma 0 is not guided. Wrap a CFG denoiser (`cfg_denoiser`) to guide on top of it.
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"CLIP guidance scale must be a finite number >= 0 (0 = off), got {scale}")
    if not (math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"the step clamp must be a finite number > 0, got {clamp}")
    if scale == 0.0:
        return denoiser
    target = text_embedding.detach().float()

    def guided(x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        x0 = denoiser(x, sigma, cond).float()
        sig = batch_sigma(sigma, x)  # (B,)
        if not bool((sig > 0).any()):
            return x0
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_()
            embeds = clip.encode_latents(x_in, sig).float()  # (B, D)
            loss = scale * spherical_distance(embeds, target).sum()  # images are independent
            grad = torch.autograd.grad(loss, x_in)[0]
        s = append_dims(sig, x.ndim)
        step = s**2 * grad  # zero where sigma is 0
        dims = list(range(1, x.ndim))
        rms = step.pow(2).mean(dim=dims, keepdim=True).sqrt()
        step = step * (clamp / torch.maximum(rms, torch.full_like(rms, clamp)))  # RMS at most `clamp`
        return x0 - step

    return guided


# Self-recurrence of guided steps (Bansal et al. 2023, "Universal Guidance for Diffusion Models", sec. 3.3): the
# steps starting in limits.RECURRENCE_SIGMAS are taken `--clip-repeats` times.


def recurrent_steps(sigmas: torch.Tensor, low: float, high: float) -> list[bool]:
    """For each step i of a run (sigma_i -> sigma_{i+1}), whether it starts in [low, high] and is repeated."""
    sig = [float(s) for s in sigmas.detach().cpu()]
    return [low <= sig[i] <= high for i in range(len(sig) - 1)]


def self_recurrent(sampler: Callable, repeats: int, low: float, high: float) -> Callable:
    """A sampler that takes each step starting at a sigma in [low, high] `repeats` times (per-step
    self-recurrence, Bansal et al. 2023, sec. 3.3): after the step sigma_i -> sigma_{i+1}, fresh noise of variance
    sigma_i^2 - sigma_{i+1}^2 takes x back to sigma_i and the step is taken again, so a guidance wrapped into the
    denoiser acts `repeats` times at the noise levels where it counts, each time from a consistent x. The other
    steps run as `sampler` runs them, in unbroken stretches (a multistep sampler keeps its history there; it
    restarts at first order after each repeated step). `repeats` 1 returns `sampler` itself. The callback's
    step index is the run's (a repeated step reports each time); the noise comes from the run's generators, so a
    seed gives the same image."""
    if repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats}")
    if repeats == 1:
        return sampler
    from .diffusion.noise import randn_like

    def run(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
            callback: Callable | None = None, generator: Any = None, **kwargs: Any) -> torch.Tensor:
        marks = recurrent_steps(sigmas, low, high)
        sig = [float(s) for s in sigmas.detach().cpu()]

        def shifted(offset: int) -> Callable | None:
            if callback is None:
                return None
            return lambda info: callback({**info, "i": info["i"] + offset})

        i = 0
        while i < len(marks):
            if not marks[i]:  # an unbroken stretch of plain steps
                j = i
                while j < len(marks) and not marks[j]:
                    j += 1
                x = sampler(denoiser, x, sigmas[i:j + 1], extra_args=extra_args, callback=shifted(i),
                            generator=generator, **kwargs)
                i = j
                continue
            for r in range(repeats):
                x = sampler(denoiser, x, sigmas[i:i + 2], extra_args=extra_args, callback=shifted(i),
                            generator=generator, **kwargs)
                if r < repeats - 1:
                    x = x + randn_like(x, generator) * math.sqrt(max(sig[i] ** 2 - sig[i + 1] ** 2, 0.0))
            i += 1
        return x

    return run
