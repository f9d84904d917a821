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
from ..diffusion.schedules import get_sigmas
from ..guidance import cfg_denoiser
from ..pngmeta import format_parameters
from .request import GenerationRequest, _class_index


@dataclass
class GeneratedImage:
    """One result: the image, its seed, and the A1111-format parameter text stored in its PNG."""

    image: Image.Image
    seed: int
    parameters: str


def encode_prompts(components: Components, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """tau_theta(y): the text encoder's hidden states (B, 77, d) for `prompts`."""
    if components.text_encoder is None or components.tokenizer is None:
        raise ValueError(f"model {components.config.name!r} has no text encoder; it does not take prompts")
    te = components.text_encoder
    device = next(te.parameters()).device
    ids = components.tokenizer(prompts).to(device)
    skip = te.cfg.skip_layers + clip_skip - 1
    return te(ids, skip_layers=skip, output_pooled=False).hidden.float()


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
    sigmas = get_sigmas(choice.schedule, req.steps, denoiser.sigmas).to(device)
    sampler = SAMPLERS[choice.sampler]

    lat_c = cfg.vae.latent_channels
    f = cfg.vae.downsample_factor
    shape = (lat_c, req.height // f, req.width // f)
    params = sampler_parameters(req, components, model_hash)
    results: list[GeneratedImage] = []
    for start in range(0, req.n, req.batch_size):
        b = min(req.batch_size, req.n - start)
        seeds = [req.seed + start + i for i in range(b)]
        gens = [g for s in seeds for g in generators_for(s, 1)]
        cond, uncond = _conditioning(components, req, b, device)
        guided = cfg_denoiser(denoiser, uncond, req.cfg_scale, req.guidance_rescale) if uncond is not None else denoiser
        x = randn((b, *shape), gens, device=device) * sigmas[0]
        step_cb = None
        if callback is not None:
            def step_cb(info: dict[str, Any], _start: int = start) -> None:
                callback({**info, "batch_start": _start})
        z = sampler(guided, x, sigmas, extra_args={"cond": cond}, callback=step_cb, generator=gens)
        for i, image in enumerate(latents_to_images(components, z)):
            text = format_parameters(req.prompt, req.negative_prompt, {**params, "Seed": seeds[i]})
            results.append(GeneratedImage(image=image, seed=seeds[i], parameters=text))
    return results


def _conditioning(
    components: Components, req: GenerationRequest, b: int, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(cond, uncond) dicts for the denoiser; uncond is None when guidance is off (scale 1)."""
    cfg = components.config
    use_cfg = req.cfg_scale != 1.0
    if cfg.conditioning == "text":
        context = encode_prompts(components, [req.prompt] * b, req.clip_skip)
        negative = encode_prompts(components, [req.negative_prompt] * b, req.clip_skip) if use_cfg else None
        return {"context": context}, ({"context": negative} if use_cfg else None)
    if cfg.conditioning == "class":
        index = _class_index(cfg, req.class_label)
        y = torch.full((b,), index, dtype=torch.long, device=device)
        null = torch.full((b,), cfg.unet.num_classes - 1, dtype=torch.long, device=device)
        return {"y": y}, ({"y": null} if use_cfg else None)
    return {}, None
