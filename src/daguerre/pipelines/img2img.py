"""Image-to-image: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations") in the latent space of LDM.

The input image is resized to the request size (`resize_mode`, images.py), encoded to
z0 = scale_latents(E(x).mode()), noised to the first sigma of the schedule's tail
(`img2img_sigmas(sigmas, strength)`, A1111's rule: strength s runs about s x steps), x = z0 + sigma_start eps,
and the sampler runs over that tail. Strength 0 runs no step (the image comes back through the VAE
only); strength 1 starts at sigma_max, where the input barely matters (text-to-image-like).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..components import Components
from .common import Callback, GeneratedImage, SamplingPlan, encode_images, run_plan
from .images import image_to_tensor, resize_image
from .request import ValidRequest, require_valid

if TYPE_CHECKING:
    from ..models.clip import CLIPModel


def img2img_plan(components: Components, req: ValidRequest, image: torch.Tensor) -> SamplingPlan:
    """The plan that starts from `image` (1, C, H, W) in [-1, 1] at the request size."""
    device = components.device
    z0 = encode_images(components, image.to(device), req.tile)  # (1, c, h, w)
    return SamplingPlan(init_latents=z0, params={"Denoising strength": f"{req.strength:g}"})


def img2img(
    components: Components,
    request: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """Redraw `request.init_image` at denoising `request.strength` (default 0.75), guided by the prompt (an
    img2img `ValidRequest`); image i uses a CPU generator seeded `seed + i`. `callback` as in txt2img."""
    req = require_valid(components, request, "img2img")
    image = resize_image(req.init_image, req.width, req.height, req.resize_mode)
    plan = img2img_plan(components, req, image_to_tensor(image))
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash, clip=clip)
