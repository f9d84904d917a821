"""Inpainting: repaint the white part of a mask, keep the black part, with a regular model or with a
9-channel inpainting model (SD inpainting, config.concat == "inpaint").

Both start like img2img (the input encoded, noised to the strength's sigma) and both blend the x0
estimate with the known latents outside the mask at every step (`inpaint_blend_denoiser`, guidance.py,
in latent resolution: the mask max-pooled, see `common.latent_mask`). An inpainting model also gets
its extra input channels, cat(mask, latent of the masked image) (`common.inpaint_model_concat`), for
the conditional and the unconditional branch alike.

After decoding, the original pixels are pasted back outside the (blurred) mask:
out = mask x generated + (1 - mask) x original, as A1111's "inpaint whole picture" does with its
overlay. Where the blurred mask is 0 the output is pixel-identical to the (resized) input, and the
blur gives a soft seam instead of a hard edge. The latent blend alone could not promise this: the VAE
decoder mixes neighbouring latents, and a VAE round trip is not the identity.

Masked content (`inpaint_fill`, A1111's option): "original" starts from the input's latents; "fill"
from the input with the masked area painted by its surroundings (`images.fill_masked`); "latent noise"
from unit noise inside the mask; "latent nothing" from zero latents inside the mask. The last two
want a high strength (1.0) to turn into an image.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from ..components import Components
from .common import (
    Callback,
    GeneratedImage,
    SamplingPlan,
    encode_images,
    inpaint_model_concat,
    latent_mask,
    run_plan,
)
from .images import MASK_RESAMPLE, blur_mask, fill_masked, image_to_tensor, mask_to_tensor, resize_image
from .request import GenerationRequest


def inpaint_plan(components: Components, req: GenerationRequest, image: Image.Image, mask: Image.Image) -> SamplingPlan:
    """The plan for `image` and its blurred L `mask` (both at the request size; req validated)."""
    cfg = components.config
    device = next(components.unet.parameters()).device
    pixels = image_to_tensor(image).to(device)  # (1, C, H, W)
    mask_px = mask_to_tensor(mask).to(device)  # (1, 1, H, W), 1 = repaint
    lat_mask = latent_mask(mask_px, cfg.vae.downsample_factor)  # (1, 1, h, w)
    known = encode_images(components, pixels, req.tile)  # (1, c, h, w)
    init, noise_mask = known, None
    if req.inpaint_fill == "fill":
        init = encode_images(components, image_to_tensor(fill_masked(image, mask)).to(device), req.tile)
    elif req.inpaint_fill == "latent nothing":
        init = known * (1 - lat_mask)
    elif req.inpaint_fill == "latent noise":
        noise_mask = lat_mask
    cond = {}
    if cfg.concat == "inpaint":
        cond["concat"] = inpaint_model_concat(components.vae, pixels, mask_px, req.tile)  # (1, 1 + c, h, w)
    params = {
        "Denoising strength": f"{req.strength:g}",
        "Mask blur": req.mask_blur,
        "Masked content": req.inpaint_fill if req.inpaint_fill != "original" else None,
    }
    return SamplingPlan(
        init_latents=init, init_noise_mask=noise_mask, cond=cond, known=known, mask=lat_mask,
        finish=lambda generated: Image.composite(generated, image, mask), params=params,
    )


def inpaint(
    components: Components,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
) -> list[GeneratedImage]:
    """Repaint `request.mask`'s white area of `request.init_image` (paths or PIL images of the same
    size), softened by `mask_blur` px, at denoising `strength` (default 0.75); see the module docstring.
    Image i uses a CPU generator seeded `seed + i`; `callback` as in txt2img."""
    req = dataclasses.replace(request, task="inpaint").validate(components.config)
    image = resize_image(req.init_image, req.width, req.height, req.resize_mode)
    mask = resize_image(req.mask, req.width, req.height, req.resize_mode, resample=MASK_RESAMPLE)
    plan = inpaint_plan(components, req, image, blur_mask(mask, req.mask_blur))
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash)
