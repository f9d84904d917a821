"""Text-to-image (and class-conditional / unconditional) generation over `Components`.

The LDM sampling path of Rombach et al. 2022, Sec. 3.3: noise z_T ~ N(0, I) in the latent space,
a sampler over the guided denoiser D(z, sigma, tau_theta(y)), then the VAE decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..components import Components
from ..diffusion.denoisers import Denoiser
from ..diffusion.noise import generators_for, randn
from ..diffusion.sampler_names import resolve_sampler
from ..diffusion.samplers_sde import SAMPLERS
from ..guidance import cfg_denoiser
from ..pngmeta import format_parameters
from .prompts import encode_weighted
from .request import GenerationRequest, _class_index


@dataclass
class GeneratedImage:
    """One result: the image, its seed, and the A1111-format parameter text stored in its PNG."""

    image: Image.Image
    seed: int
    parameters: str


def encode_prompts(components: Components, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """tau_theta(y): the text encoder's hidden states (B, 77 k, d) for `prompts`, A1111 prompt syntax."""
    if components.text_encoder is None or components.tokenizer is None:
        raise ValueError(f"model {components.config.name!r} has no text encoder; it does not take prompts")
    te = components.text_encoder
    skip = te.cfg.skip_layers + clip_skip - 1
    return encode_weighted(te, components.tokenizer, prompts, skip_layers=skip)


def latents_to_images(components: Components, latents: torch.Tensor) -> list[Image.Image]:
    """Decode diffusion latents with the VAE (in its own dtype, float32 by default) to PIL images."""
    vae = components.vae
    param = next(vae.parameters())
    z = vae.unscale_latents(latents.to(device=param.device, dtype=param.dtype))
    x = vae.decode(z).float().clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    mode = "L" if arr.shape[-1] == 1 else "RGB"
    return [Image.fromarray(np.squeeze(a, -1) if mode == "L" else a, mode) for a in arr]


def sampler_parameters(request: GenerationRequest, components: Components, model_hash: str | None) -> dict[str, Any]:
    """The A1111 key/value pairs describing how an image was made (seed filled in per image)."""
    choice = resolve_sampler(request.sampler, request.schedule)
    return {
        "Steps": request.steps,
        "Sampler": choice.a1111_name,
        "Schedule type": choice.a1111_schedule,
        "CFG scale": f"{request.cfg_scale:g}",
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": components.config.name,
        "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
        "Guidance rescale": f"{request.guidance_rescale:g}" if request.guidance_rescale else None,
    }


@torch.no_grad()
def txt2img(
    components: Components,
    request: GenerationRequest,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_hash: str | None = None,
) -> list[GeneratedImage]:
    """Generate `request.n` images; image i uses a CPU generator seeded `seed + i`."""
    req = request.validate(components.config)
    cfg = components.config
    unet_param = next(components.unet.parameters())
    device = unet_param.device
    choice = resolve_sampler(req.sampler, req.schedule)
    denoiser = Denoiser(components.unet, cfg.schedule)
    sigmas = choice.sigmas(req.steps, denoiser.sigmas).to(device)
    sampler = SAMPLERS[choice.sampler]

    lat_c = cfg.vae.latent_channels
    f = cfg.vae.downsample_factor
    shape = (lat_c, req.height // f, req.width // f)
    params = sampler_parameters(req, components, model_hash)
    results: list[GeneratedImage] = []
    cond1, uncond1 = _conditioning(components, req, device)  # once per request, batch of 1
    for start in range(0, req.n, req.batch_size):
        b = min(req.batch_size, req.n - start)
        seeds = [req.seed + start + i for i in range(b)]
        gens = generators_for(req.seed + start, b)
        cond = _expand(cond1, b)
        guided = denoiser
        if uncond1 is not None:
            guided = cfg_denoiser(denoiser, _expand(uncond1, b), req.cfg_scale, req.guidance_rescale)
        x = randn((b, *shape), gens, device=device) * sigmas[0]
        step_cb = None
        if callback is not None:
            def step_cb(info: dict[str, Any], _start: int = start) -> None:
                callback({**info, "batch_start": _start})
        z = sampler(guided, x, sigmas, extra_args={"cond": cond}, callback=step_cb, generator=gens, **choice.kwargs)
        for i, image in enumerate(latents_to_images(components, z)):
            text = format_parameters(req.prompt, req.negative_prompt, {**params, "Seed": seeds[i]})
            results.append(GeneratedImage(image=image, seed=seeds[i], parameters=text))
    return results


def _conditioning(
    components: Components, req: GenerationRequest, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(cond, uncond) dicts of batch 1 for the denoiser; uncond is None when guidance is off (scale 1)."""
    cfg = components.config
    use_cfg = req.cfg_scale != 1.0
    if cfg.conditioning == "text":
        prompts = [req.prompt, req.negative_prompt] if use_cfg else [req.prompt]
        context = encode_prompts(components, prompts, req.clip_skip)  # one call; rows padded to equal length
        return {"context": context[:1]}, ({"context": context[1:]} if use_cfg else None)
    if cfg.conditioning == "class":
        y = torch.tensor([_class_index(cfg, req.class_label)], device=device)
        null = torch.tensor([cfg.unet.num_classes - 1], device=device)  # the last class is the "no class" label
        return {"y": y}, ({"y": null} if use_cfg else None)
    return {}, None


def _expand(cond: dict[str, Any], b: int) -> dict[str, Any]:
    """Repeat every tensor of a batch-1 conditioning dict to batch b."""
    return {k: v.expand(b, *v.shape[1:]) if torch.is_tensor(v) else v for k, v in cond.items()}
