"""The hires fix's run (A1111's `enable_hr`): the plan at the base size, then each image upscaled and redrawn.

Its fields, sizes and PNG keys are `pipelines/hires.py`'s; the run lives here, beside `common.run_plan` that it
calls, so that the request side (`hires`, read by `request` and `common`) imports no pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .hires import UPSCALERS, check, second_pass_sigmas, upscaler_name

if TYPE_CHECKING:
    from ..components import Components
    from ..models.clip import CLIPModel
    from .common import Callback, GeneratedImage
    from .request import ValidRequest


def hires_fix(
    components: Components,
    req: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """txt2img of a validated request with the hires fix on: the first pass at the base size, then each image
    upscaled and redrawn at `hires_strength` (image i seeded seed + i), keeping the first pass's PNG text."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from PIL import Image

    from .common import GeneratedImage, SamplingPlan, encode_images, run_plan
    from .images import image_to_tensor

    cfg = components.config
    factor = cfg.vae.downsample_factor * cfg.unet.downsample_factor
    width, height = check(req, req.width, req.height, factor)
    first_latents: list[torch.Tensor] = []
    first = run_plan(components, req, SamplingPlan(cond=req.conditioner.concat.request_input(cfg, req),
                                                   final_latents=first_latents),
                     callback=callback, model_hash=model_hash, clip=clip)
    latents = torch.cat(first_latents)  # (n, c, h, w)
    space, mode = UPSCALERS[upscaler_name(req.hires_upscaler)]
    steps = req.hires_steps or req.steps
    sigmas = second_pass_sigmas(req)
    f = cfg.vae.downsample_factor
    results = []
    for i, done in enumerate(first):
        if space == "latent":
            antialias = mode.endswith("-antialias")
            z0 = F.interpolate(latents[i:i + 1].float(), size=(height // f, width // f),
                               mode=mode.removesuffix("-antialias"), antialias=antialias)
        else:
            resample = Image.Resampling.LANCZOS if mode == "lanczos" else Image.Resampling.NEAREST
            pixels = image_to_tensor(done.image.resize((width, height), resample))
            z0 = encode_images(components, pixels.to(components.device), req.tile)
        second = dataclasses.replace(req, width=width, height=height, steps=steps, seed=done.seed, n=1,
                                     batch_size=1, sigmas=sigmas, hires_scale=0.0, hires_width=0, hires_height=0)
        image = run_plan(components, second, SamplingPlan(init_latents=z0), callback=callback,
                         model_hash=model_hash, clip=clip)[0]
        results.append(GeneratedImage(image=image.image, seed=done.seed, parameters=done.parameters))
    return results
