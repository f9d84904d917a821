"""Upscaling: latent super-resolution with an SR model, or resize + img2img with a regular model.

Super-resolution model (config.concat == "lowres"; the LDM SR design, Rombach et al. 2022, Sec. 4.4,
and the Stable Diffusion x4 upscaler): a U-Net whose input concatenates the noisy latent with the
low-resolution image. daguerre's convention for the concatenated image, the one both of those models
use: RGB PIXELS in [-1, 1] (not a VAE latent), resampled bicubically to the target latent grid
(H/f, W/f); for the x4 upscaler (f = 4, factor 4) that grid is the low-res image's own size. So the
U-Net has latent_channels + image channels inputs (4 + 3 = 7). Sampling starts from pure noise at the
target latent size. When the U-Net is told the noise level (`unet.num_classes` set: the x4 upscaler's
label embedding), the low-res image is first noised to `noise_level` on the augmentation schedule
`LOWRES_NOISE_SCHEDULE` (noise-conditioning augmentation, Ho et al. 2022, cascaded diffusion) and the
level goes in as the label y, for both guidance branches.

Regular model (the fallback, A1111's "hires fix" / "SD upscale" without tiles): the image is resized up
by the factor with Lanczos, then redrawn by img2img at a moderate strength (default 0.4), which adds
detail the resize cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..components import Components
from ..config import ModelConfig, ScheduleConfig
from ..diffusion.schedules import alphas_cumprod, betas_from_config
from .common import Callback, GeneratedImage, SamplingPlan, run_plan
from .images import image_to_tensor, resize_image
from .img2img import img2img_plan
from .request import ValidRequest, require_valid

# The x4 upscaler's low-res augmentation schedule (CompVis x4-upscaling.yaml `low_scale_config`:
# linear_start 1e-4, linear_end 0.02 in CompVis' "linear", i.e. linspace of sqrt(beta), squared).
LOWRES_NOISE_SCHEDULE = ScheduleConfig(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)
FALLBACK_UPSCALER = "Lanczos"


def is_sr_model(components: Components) -> bool:
    """Whether the model is a super-resolution model (its U-Net takes the low-res image)."""
    return components.config.concat == "lowres"


def lowres_concat(config: ModelConfig, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The SR model's extra input: the low-res pixels (B, C, h0, w0) in [-1, 1], bicubic to the latent
    grid of a height x width output -> (B, C, height/f, width/f). The one definition of this input:
    `upscale` and the trainer (`daguerre.training.concat`) both build it here."""
    f = config.vae.downsample_factor
    size = (height // f, width // f)
    if tuple(image.shape[-2:]) == size:
        return image
    down = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=down).clamp(-1, 1)


def lowres_noise_scales(level: int) -> tuple[float, float] | None:
    """(a, s) of noise-conditioning augmentation at `level` on `LOWRES_NOISE_SCHEDULE`: the low-res input
    becomes a * concat + s * eps, a = sqrt(abar_level), s = sqrt(1 - abar_level); None at level 0 (the
    input is used as it is). Shared by `upscale` and the trainer."""
    if level <= 0:
        return None
    abar = float(alphas_cumprod(betas_from_config(LOWRES_NOISE_SCHEDULE))[level])
    return abar**0.5, (1 - abar) ** 0.5


def sr_plan(components: Components, req: ValidRequest, image: torch.Tensor) -> SamplingPlan:
    """The plan of a super-resolution model for the low-res `image` (1, C, h0, w0) in [-1, 1]."""
    device = next(components.unet.parameters()).device
    cond = {"concat": lowres_concat(components.config, image.to(device), req.height, req.width)}
    params = {"Upscale": f"{req.upscale_factor:g}"}
    noise = None
    if components.config.unet.num_classes is not None:
        noise = lowres_noise_scales(req.noise_level)
        cond["y"] = torch.tensor([req.noise_level], device=device)
        params["Noise level"] = req.noise_level
    return SamplingPlan(cond=cond, concat_noise=noise, params=params)


def upscale(
    components: Components,
    request: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
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
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash)
