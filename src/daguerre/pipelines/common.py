"""The sampling core shared by every pipeline: conditioning, guidance, the sampling loop, VAE I/O, PNG parameters.

One implementation of the LDM sampling path (Rombach et al. 2022, Sec. 3.3): a starting latent
x = z0 + sigma_0 eps (z0 = 0 and the full schedule for text-to-image; the encoded input image and
the img2img tail of the schedule, SDEdit (Meng et al. 2022), for image-to-image), a sampler over the
guided denoiser D(x, sigma, c), then the VAE decoder. A pipeline (txt2img, img2img, inpaint, upscale)
only describes what it adds, as a `SamplingPlan`: the input latents, extra conditioning concatenated
to the U-Net input (inpainting and super-resolution models), the known latents and mask of inpaint
blending, and a pixel post-processing step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..components import Components
from ..conditioning import EncodeImages
from ..diffusion.denoisers import Denoiser
from ..diffusion.noise import generators_for, randn
from ..diffusion.sampler_names import SAMPLERS
from ..guidance import (
    CUTOUT_SEED_MIX,
    cfg_denoiser,
    clip_guided_denoiser,
    inpaint_blend_denoiser,
    noisy_clip_guided_denoiser,
    self_recurrent,
)
from ..limits import RECURRENCE_SIGMAS
from ..lora.apply import prepare as prepare_adapters
from ..models.gligen import phrase_embeddings
from ..models.noisy_clip import check_latent_space
from ..models.unet import fewer_calls_args
from ..pngmeta import format_parameters
from ..precision import dtype_of, short_name
from ..quantize import is_quantized
from . import hires
from .infotext import write_parameters
from .prompts import encode_weighted, plain_text
from .request import ValidRequest, check_finite
from .tiling import decode_latents, encode_latents

if TYPE_CHECKING:
    from ..models.clip import CLIPModel

Callback = Callable[[dict[str, Any]], None]


@dataclass
class GeneratedImage:
    """One result: the image, its seed, and the A1111-format parameter text stored in its PNG."""

    image: Image.Image
    seed: int
    parameters: str


class StopSampling(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a step callback (or by a check inside the U-Net's forward) to end the sampling of the current
    batch early; `run_plan` then decodes the batch's latest x0 estimate, as A1111 decodes its last latent.
    Use a subclass: `SkipBatch` or `Interrupted`."""


class SkipBatch(StopSampling):
    """End the current batch with the images of its latest x0 estimate and go on with the next (A1111's /skip)."""


class Interrupted(StopSampling):  # noqa: N818
    """Stop the request (A1111's /interrupt). `run_plan` re-raises it with `results`: the finished images, then
    the current batch's images decoded from its latest x0 estimate (none if it had not finished a step)."""

    def __init__(self, message: str = "interrupted", results: list[GeneratedImage] | None = None):
        super().__init__(message)
        self.results: list[GeneratedImage] = results or []


@dataclass
class SamplingPlan:
    """What one pipeline adds to the shared sampling loop. Tensors have batch 1 (the same for every
    image of the request) and live at latent resolution (B, C, H/f, W/f).

    `init_latents` z0 is noised to the first of the request's sigmas (the img2img tail, `ValidRequest.sigmas`);
    None starts from pure noise. `init_noise_mask` (1, 1, h, w) replaces z0 by fresh unit noise where it is 1
    (A1111 "latent noise"). `cond` is merged into both the conditional and the unconditional branch
    ("concat" channels, "y"). `concat_noise` = (a, s) augments cond["concat"] per image as
    a * concat + s * eps (noise-conditioning augmentation, Ho et al. 2022, cascaded diffusion).
    `known` and `mask` (1 = repaint) turn on inpaint blending of the x0 estimate (guidance.py);
    `finish` post-processes each decoded image (inpaint paste-back); `params` are added to the PNG text;
    `final_latents`, if a list, receives each batch's final latents (B, C, h, w) (the hires fix's first pass).
    """

    init_latents: torch.Tensor | None = None
    init_noise_mask: torch.Tensor | None = None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    concat_noise: tuple[float, float] | None = None
    known: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    finish: Callable[[Image.Image], Image.Image] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    final_latents: list[torch.Tensor] | None = None


# --- conditioning ----------------------------------------------------------------------------------

def encode_prompts(components: Components, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """tau_theta(y): the text encoder's hidden states (B, 77 k, d) for `prompts`, A1111 prompt syntax."""
    if components.text_encoder is None or components.tokenizer is None:
        raise ValueError(f"model {components.config.name!r} has no text encoder; it does not take prompts")
    from ..lora.syntax import strip_tags

    components.acquire("text_encoder")
    te = components.text_encoder
    skip = te.config.skip_layers + clip_skip - 1
    tokenizer = components.tokenizer
    embeddings = components.adapters.embeddings(components) if components.adapters is not None else None
    if embeddings is not None:  # textual-inversion words (daguerre.lora.embeddings)
        tokenizer = embeddings.tokenizer(te, tokenizer)
    return encode_weighted(te, tokenizer, [strip_tags(p) for p in prompts], skip_layers=skip)


def conditional_rows(context: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The indices (on the CPU) of the rows of a U-Net call's `context` (N, S, d) that are the prompt's, whatever
    way guidance batched the call: those that begin with `reference` (1, tokens, d), the prompt's context as
    `conditioning` gives it (a layout model appends its own tokens after it)."""
    tokens = reference.shape[1]
    if context.shape[1] < tokens:
        return torch.zeros(0, dtype=torch.long)
    ref = reference.to(device=context.device, dtype=context.dtype)
    return torch.nonzero((context[:, :tokens] == ref).flatten(1).all(1)).flatten().cpu()


def conditioning(
    components: Components, req: ValidRequest, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(cond, uncond) dicts of batch 1 for the denoiser, from the model's conditioner
    (`daguerre.conditioning`); uncond is None when guidance is off (scale 1) or the model is unconditional."""
    def encode(prompts: list[str]) -> torch.Tensor:
        return encode_prompts(components, prompts, req.clip_skip)

    def phrases(texts: list[str]) -> torch.Tensor:  # a GLIGEN layout's phrases: pooled text embeddings
        components.acquire("text_encoder")
        pool = components.config.unet.gligen.phrase_pool
        return phrase_embeddings(components.text_encoder, components.tokenizer, texts, pool)

    return req.conditioner.pair(req, device, encode, phrases)


def expand(cond: dict[str, Any], b: int) -> dict[str, Any]:
    """Repeat every tensor of a batch-1 conditioning dict to batch b."""
    return {k: v.expand(b, *v.shape[1:]) if torch.is_tensor(v) else v for k, v in cond.items()}


# --- VAE I/O ----------------------------------------------------------------------------------------

def encode_images(components: Components, pixels: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Pixels (B, C, H, W) in [-1, 1] -> diffusion latents (B, c, H/f, W/f) float32 on the pixels' device:
    the posterior mode, scaled (z0 = scale_latents(E(x).mode()), deterministic, as diffusers' img2img
    with `argmax` and A1111)."""
    components.acquire("vae_encoder")
    return encode_latents(components.vae, pixels, tiled).to(pixels.device)


def latents_to_images(components: Components, latents: torch.Tensor, tiled: bool | None = None) -> list[Image.Image]:
    """Decode diffusion latents with the VAE (in its own dtype, float32 by default; tiled for large images,
    `daguerre.pipelines.tiling`) to PIL images."""
    components.acquire("vae_decoder")
    x = decode_latents(components.vae, latents, tiled)
    check_finite(x, "decoded pixels", components)  # a NaN pixel would be saved as black
    arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    mode = "L" if arr.shape[-1] == 1 else "RGB"
    return [Image.fromarray(np.squeeze(a, -1) if mode == "L" else a, mode) for a in arr]


def image_encoder(components: Components, tiled: bool | None, device: torch.device) -> EncodeImages:
    """Pixels -> diffusion latents on `device` with the model's VAE (tiled as `encode_images`): what the
    conditioner's image concatenations (`daguerre.conditioning`) encode masked images with."""
    return lambda pixels: encode_images(components, pixels.to(device), tiled)


# --- CLIP guidance -----------------------------------------------------------------------------------

def open_guide(spec: str, device: torch.device) -> CLIPModel:
    """The CLIP model `spec` names (a shipped CLIP's name or a path: `registry.open_clip`), float32 on `device`.
    The last one opened is kept (until its file changes), so that many requests guided by one CLIP (an
    evaluation, a server) read it once."""
    from ..registry import clip_path

    path = clip_path(spec)  # FileNotFoundError naming the spec and the shipped CLIPs
    stat = path.stat()
    return _open_guide(str(path), stat.st_mtime_ns, stat.st_size, str(device))


@functools.lru_cache(maxsize=1)
def _open_guide(path: str, _mtime: int, _size: int, device: str) -> CLIPModel:
    from ..registry import open_clip

    return open_clip(path, device=device)


def text_embedding(clip: CLIPModel, prompt: str) -> torch.Tensor:
    """(1, D) CLIP embedding of a prompt's words (`prompts.plain_text`: emphasis syntax and LoRA tags dropped),
    tokenised with CLIP's own tokenizer (its window and padding)."""
    from ..lora.syntax import strip_tags
    from ..models.tokenizer import CLIPTokenizer

    cfg = clip.clip_config.text_encoder
    ids = CLIPTokenizer(max_length=cfg.max_length, pad_token_id=cfg.pad_token_id)([plain_text(strip_tags(prompt))])
    with torch.no_grad():
        return clip.encode_text(ids.to(clip.logit_scale.device)).float()


def differentiable_decode(components: Components) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> pixels with the model's VAE decoder, float32, unclamped (CLIP guidance's range penalty sees
    pixels beyond [-1, 1]) and differentiable: no tiling, no float32 retry (`tiling.decode_latents`)."""
    vae = components.vae
    dtype = next(vae.parameters()).dtype
    return lambda latents: vae.decode(vae.unscale_latents(latents.float()).to(dtype)).float()


# --- the loop --------------------------------------------------------------------------------------

def count_steps(request: ValidRequest, sigmas: torch.Tensor | None = None) -> int:
    """How many times the sampler of one batch of `request` reports a step (for progress bars) on its run
    through `sigmas` (default: the request's): one per step, so `steps`, fewer at img2img strength < 1; with CLIP
    guidance each step in limits.RECURRENCE_SIGMAS reports `clip_repeats` times (guidance.self_recurrent)."""
    sigmas = request.sigmas if sigmas is None else sigmas
    return len(sigmas) - 1 + request.repeated_steps(sigmas)


def progress_total(request: ValidRequest) -> int:
    """How many times `run_plan` calls its callback for `request`: `count_steps` for each batch (a batch of
    `batch_size` images advances together), so n=4, batch_size=2 at 20 steps is 40; with the hires fix, plus
    each image's second pass."""
    batches = -(-request.n // request.batch_size)
    if hires.enabled(request):  # then each image's second pass (pipelines/hires.py)
        return batches * count_steps(request) + request.n * count_steps(request, hires.second_pass_sigmas(request))
    return batches * count_steps(request)


@torch.no_grad()
def run_plan(
    components: Components,
    req: ValidRequest,
    plan: SamplingPlan,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """Generate `req.n` images in batches of `req.batch_size` through `req.sigmas`; image i draws all
    its noise from a CPU generator seeded `seed + i`, in a fixed order (starting noise, latent-noise fill,
    concat augmentation, then the sampler), so it is the same image in any batch. `callback` gets the
    sampler's step dict plus `batch_start`, the index of the batch's first image; it may raise `SkipBatch`
    or `Interrupted` (see `StopSampling`) to end a batch or the request early with partial images.

    The work comes in phases, each network used in one (`Components.acquire`; with `release_after_use` each is
    released when its phase ends, `Components.done_with`): the prompts are encoded (text encoder), every batch
    is sampled (U-Net), then every batch is decoded (VAE decoder), batch by batch as it was sampled.

    With `req.clip_guidance` > 0 the CFG denoiser is wrapped in CLIP guidance (`guidance.clip_guided_denoiser`)
    towards the prompt, through the VAE decoder, by `clip` (default: `open_guide(req.clip_model)`); image i
    draws its cutouts from its own generator, seeded (seed + i) ^ CUTOUT_SEED_MIX."""
    cfg = components.config
    device = components.device
    choice = req.choice
    sigmas = req.sigmas.to(device)
    sampler = SAMPLERS[choice.sampler]
    kwargs = dict(choice.kwargs)
    if choice.eta is not None and req.eta is not None:  # samplers without eta ignore it, as A1111's do
        kwargs["eta"] = req.eta
    f = cfg.vae.downsample_factor
    shape = (cfg.vae.latent_channels, req.height // f, req.width // f)
    lora_params = prepare_adapters(components, req)  # the request's LoRAs merged, an earlier request's undone
    prompt, negative, params = write_parameters(req, cfg.name, model_hash, short_name(dtype_of(components.unet)),
                                                "int8" if is_quantized(components.unet) else "none")
    params.update(lora_params)
    params.update(plan.params)
    text = (prompt, negative, params)

    cond1, uncond1 = conditioning(components, req, device)  # once per request, batch of 1
    components.done_with("text_encoder")
    extra = {k: v.to(device) for k, v in plan.cond.items()}
    if "concat" not in extra:  # an inpainting model without a mask: everything masked (NoConcat: nothing)
        encode = image_encoder(components, req.tile, device)
        extra.update(req.conditioner.concat.unmasked_input(cfg, req.height, req.width, device, encode))
    components.done_with("vae_encoder")  # the plan's input images and masks are encoded by now
    guide = None
    if req.clip_guidance > 0:
        clip = clip if clip is not None else open_guide(req.clip_model, device)
        if clip.clip_config.latent_space is not None:  # a noise-aware CLIP: of this model's latents only
            check_latent_space(clip.clip_config, cfg, cfg.name, shape[1:])
        else:  # CLIP guidance through the decoded pixels: the decoder runs at every step
            components.acquire("vae_decoder")
        guide = (clip, text_embedding(clip, req.prompt), differentiable_decode(components))
    init = plan.init_latents.to(device) if plan.init_latents is not None else None
    components.acquire("unet")
    denoiser = Denoiser(components.unet, cfg.schedule)
    max_sigma = req.deepcache_max_sigma
    max_t = float(denoiser.sigma_to_t(torch.tensor([max_sigma]))[0]) if max_sigma else None  # DeepCache's window
    sampled: list[tuple[torch.Tensor, list[int]]] = []  # each batch's final latents and seeds, to decode
    interrupted: Interrupted | None = None
    for start in range(0, req.n, req.batch_size):
        b = min(req.batch_size, req.n - start)
        seeds = list(req.seeds[start:start + b])
        gens = generators_for(req.seed + start, b)
        x = randn((b, *shape), gens, device=device) * sigmas[0]  # (B, C, h, w)
        if init is not None:
            z0 = init.expand(b, *shape)
            if plan.init_noise_mask is not None:
                m = plan.init_noise_mask.to(device)
                z0 = z0 * (1 - m) + randn((b, *shape), gens, device=device) * m
            x = z0 + x
        batch_extra = expand(extra, b)
        if plan.concat_noise is not None and "concat" in batch_extra:
            a, s = plan.concat_noise
            c = batch_extra["concat"]
            batch_extra["concat"] = a * c + s * randn(c.shape, gens, device=device, dtype=c.dtype)
        cond = {**expand(cond1, b), **batch_extra}
        guided = denoiser.with_net_args(**fewer_calls_args(req.deepcache_interval, req.deepcache_depth,  # per batch
                                                           req.tome_ratio, max_t))
        guided = req.conditioner.scheduled(guided, req)  # GLIGEN: the layout for the first steps only
        if uncond1 is not None:
            guided = cfg_denoiser(guided, {**expand(uncond1, b), **batch_extra}, req.cfg_scale, req.guidance_rescale,
                                  min_sigma=req.cfg_min_sigma, cutoff_sigma=req.cfg_cutoff_sigma)
        if guide is not None and guide[0].clip_config.latent_space is not None:
            guided = noisy_clip_guided_denoiser(guided, guide[0], guide[1], scale=req.clip_guidance)
        elif guide is not None:
            cutout_gens = [torch.Generator().manual_seed(s ^ CUTOUT_SEED_MIX) for s in seeds]
            guided = clip_guided_denoiser(guided, guide[0], guide[1], scale=req.clip_guidance, cutouts=req.cutouts,
                                          decode=guide[2], generators=cutout_gens)
        run = sampler
        if guide is not None:  # the steps where the guidance counts taken req.clip_repeats times
            run = self_recurrent(sampler, req.clip_repeats, *RECURRENCE_SIGMAS)
        if plan.mask is not None and plan.known is not None:
            guided = inpaint_blend_denoiser(guided, plan.known.to(device).expand(b, *shape), plan.mask.to(device))
        latest: dict[str, torch.Tensor] = {}  # the batch's latest x0 estimate, for a batch stopped early

        def step_cb(info: dict[str, Any], _start: int = start, _latest: dict = latest) -> None:
            _latest["denoised"] = info["denoised"]
            if callback is not None:
                callback({**info, "batch_start": _start})
        try:
            if len(sigmas) > 1:
                x = run(guided, x, sigmas, extra_args={"cond": cond}, callback=step_cb, generator=gens, **kwargs)
        except StopSampling as stop:
            x = latest.get("denoised")
            interrupted = stop if isinstance(stop, Interrupted) else None
        if x is not None:
            check_finite(x, "final latents", components, req)
            sampled.append((x, seeds))
            if plan.final_latents is not None:
                plan.final_latents.append(x)
        if interrupted is not None:
            break
    components.done_with("unet")
    results = [image for x, seeds in sampled for image in _finished(components, req, plan, x, seeds, text)]
    components.done_with("vae_decoder")
    if interrupted is not None:
        interrupted.results = results
        raise interrupted
    return results


def _finished(components: Components, req: ValidRequest, plan: SamplingPlan, x: torch.Tensor,
              seeds: list[int], text: tuple[str, str, dict[str, Any]]) -> list[GeneratedImage]:
    """The decoded, post-processed images of a batch's final latents, with their PNG parameters `text`
    (prompt, negative prompt, key/value pairs; the seed filled in per image)."""
    prompt, negative, params = text
    results = []
    for i, image in enumerate(latents_to_images(components, x, req.tile)):
        if plan.finish is not None:
            image = plan.finish(image)
        parameters = format_parameters(prompt, negative, {**params, "Seed": seeds[i]})
        results.append(GeneratedImage(image=image, seed=seeds[i], parameters=parameters))
    return results
