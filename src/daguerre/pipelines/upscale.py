"""Upscaling: latent super-resolution with an SR model, or resize + img2img with a regular model.

Super-resolution model (`conditioning.LowresConcat`; the LDM SR design, Rombach et al. 2022, Sec. 4.4,
and the Stable Diffusion x4 upscaler): a U-Net whose input concatenates the noisy latent with the
low-resolution image. daguerre's convention for the concatenated image, the one both of those models
use: RGB PIXELS in [-1, 1] (not a VAE latent), resampled bicubically to the target latent grid
(H/f, W/f); for the x4 upscaler (f = 4, factor 4) that grid is the low-res image's own size. So the
U-Net has latent_channels + image channels inputs (4 + 3 = 7). Sampling starts from pure noise at the
target latent size. When the U-Net is told the noise level (`unet.num_classes` set: the x4 upscaler's
label embedding), the low-res image is first noised to `noise_level` on the augmentation schedule
`conditioning.LOWRES_NOISE_SCHEDULE` (noise-conditioning augmentation, Ho et al. 2022, cascaded diffusion) and the
level goes in as the label y, for both guidance branches.

Regular model (the fallback, A1111's "hires fix" / "SD upscale" without tiles): the image is resized up
by the factor with Lanczos, then redrawn by img2img at a moderate strength (default 0.4), which adds
detail the resize cannot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..components import Components
from ..conditioning import LowresConcat, conditioner_for
from .common import Callback, GeneratedImage, SamplingPlan, run_plan
from .images import image_to_tensor, resize_image
from .img2img import img2img_plan
from .request import ValidRequest, require_valid

if TYPE_CHECKING:
    from ..models.clip import CLIPModel

FALLBACK_UPSCALER = "Lanczos"


def is_sr_model(components: Components) -> bool:
    """Whether the model is a super-resolution model (its U-Net takes the low-res image)."""
    return isinstance(conditioner_for(components.config).concat, LowresConcat)


def sr_plan(components: Components, req: ValidRequest, image: torch.Tensor) -> SamplingPlan:
    """The plan of a super-resolution model for the low-res `image` (1, C, h0, w0) in [-1, 1]."""
    device = components.device
    cond = {"concat": LowresConcat.build(components.config, image.to(device), req.height, req.width)}
    params = {"Upscale": f"{req.upscale_factor:g}"}
    noise = None
    if components.config.unet.num_classes is not None:
        noise = LowresConcat.noise_scales(req.noise_level)
        cond["y"] = torch.tensor([req.noise_level], device=device)
        params["Noise level"] = req.noise_level
    return SamplingPlan(cond=cond, concat_noise=noise, params=params)


def upscale(
    components: Components,
    request: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """Upscale `request.init_image` (an upscale `ValidRequest`) by `request.upscale_factor` (output size
    snapped to the model's grid): latent super-resolution with an SR model, else Lanczos resize + img2img
    at `strength` (default 0.4); see the module docstring. Image i uses a CPU generator seeded `seed + i`;
    `callback` as in txt2img."""
    req = require_valid(components, request, "upscale")
    if is_sr_model(components):
        plan = sr_plan(components, req, image_to_tensor(req.init_image))
    else:
        mode = "crop" if req.resize_mode == "none" else req.resize_mode
        big = resize_image(req.init_image, req.width, req.height, mode)
        plan = img2img_plan(components, req, image_to_tensor(big))
        plan.params = {"Hires upscale": f"{req.upscale_factor:g}", "Hires upscaler": FALLBACK_UPSCALER,
                       **plan.params}
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash, clip=clip)
