"""Text-to-image (and class-conditional / unconditional) generation over `Components`.

The LDM sampling path of Rombach et al. 2022, Sec. 3.3: noise z_T ~ N(0, I) in the latent space,
a sampler over the guided denoiser D(z, sigma, tau_theta(y)), then the VAE decoder. The loop itself
is the shared core in common.py; text-to-image is the plan with nothing added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..components import Components
from . import hires, hires_run
from .common import (  # noqa: F401  (re-exported: the public names of this module before common.py)
    Callback,
    GeneratedImage,
    SamplingPlan,
    encode_prompts,
    latents_to_images,
    run_plan,
)
from .request import ValidRequest, require_valid

if TYPE_CHECKING:
    from ..models.clip import CLIPModel


def txt2img(
    components: Components,
    request: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """Generate `request.n` images from noise (a txt2img `ValidRequest`: `GenerationRequest(...).validate(
    components.config)`); image i uses a CPU generator seeded `seed + i`.

    `callback` gets `{x, i, sigma, sigma_next, denoised, batch_start}` at every sampler step. An
    inpainting model runs with everything masked (common.py); a super-resolution model is an error; a
    semantic-synthesis model draws the request's map, a layout model its layout (daguerre.conditioning).
    With the hires fix on (`hires_scale`, `hires_width`, `hires_height`) the images are then upscaled and
    redrawn at the larger size (pipelines/hires.py).
    """
    req = require_valid(components, request, "txt2img")
    if hires.enabled(req):  # A1111's hires fix: this plan at the base size, then upscaled and redrawn
        return hires_run.hires_fix(components, req, callback=callback, model_hash=model_hash, clip=clip)
    plan = SamplingPlan(cond=req.conditioner.concat.request_input(components.config, req))  # a semantic map
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash, clip=clip)
