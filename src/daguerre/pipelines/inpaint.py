"""Inpainting: repaint the white part of a mask, keep the black part, with a regular model or with a
9-channel inpainting model (SD inpainting, `conditioning.InpaintConcat`).

Both start like img2img (the input encoded, noised to the strength's sigma) and both blend the x0
estimate with the known latents outside the mask at every step (`inpaint_blend_denoiser`, guidance.py,
in latent resolution: the mask max-pooled, see `conditioning.latent_mask`). An inpainting model also gets
its extra input channels, cat(mask, latent of the masked image) (`conditioning.InpaintConcat`), for
the conditional and the unconditional branch alike.

After decoding, the original pixels are pasted back outside the (blurred) mask:
out = mask x generated + (1 - mask) x original, as A1111's "inpaint whole picture" does with its
overlay. Where the blurred mask is 0 the output is pixel-identical to the (resized) input, and the
blur gives a soft seam instead of a hard edge. The latent blend alone could not promise this: the VAE
decoder mixes neighbouring latents, and a VAE round trip is not the identity.

Inpaint area "only masked" (`inpaint_area`, A1111's "Only masked", `inpaint_full_res` in its API):
the mask is blurred at the image's own size, and the bounding box of what the blurred mask touches,
widened by `inpaint_padding` pixels of context on each side, is grown to the aspect ratio of width x
height and kept inside the image (`crop_region`). That crop of the image and of the blurred mask is
resized to width x height and inpainted as above, so a small masked area is redrawn at the model's
full resolution; the result is resized back to the crop's size and pasted into the original through
the blurred mask. The output has the input image's size, and every pixel outside the crop, or where
the blurred mask is 0, is the input's own.

Masked content (`inpaint_fill`, A1111's option): "original" starts from the input's latents; "fill"
from the input with the masked area painted by its surroundings (`images.fill_masked`); "latent noise"
from unit noise inside the mask; "latent nothing" from zero latents inside the mask. The last two
want a high strength (1.0) to turn into an image.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from PIL import Image

from ..components import Components
from ..conditioning import latent_mask
from .common import Callback, GeneratedImage, SamplingPlan, encode_images, image_encoder, run_plan
from .images import IMAGE_RESAMPLE, MASK_RESAMPLE, blur_mask, fill_masked, image_to_tensor, mask_to_tensor, resize_image
from .request import ValidRequest, require_valid

if TYPE_CHECKING:
    from ..models.clip import CLIPModel


def inpaint_plan(components: Components, req: ValidRequest, image: Image.Image, mask: Image.Image) -> SamplingPlan:
    """The plan for `image` and its blurred L `mask` (both at the request size)."""
    cfg = components.config
    device = components.device
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
    # an inpainting model's extra input cat(mask, masked-image latent) (1, 1 + c, h, w); none for others
    cond = req.conditioner.concat.mask_input(cfg, pixels, mask_px, image_encoder(components, req.tile, device))
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
    request: ValidRequest,
    *,
    callback: Callback | None = None,
    model_hash: str | None = None,
    clip: CLIPModel | None = None,
) -> list[GeneratedImage]:
    """Repaint `request.mask`'s white area of `request.init_image` (an inpaint `ValidRequest`), softened by
    `mask_blur` px, at denoising `strength` (default 0.75); see the module docstring. Image i uses a CPU
    generator seeded `seed + i`; `callback` as in txt2img. With `inpaint_area` "only masked", only a crop
    around the mask is redrawn, at width x height (module docstring)."""
    req = require_valid(components, request, "inpaint")
    if req.inpaint_area == "only masked":
        plan = only_masked_plan(components, req)
        return run_plan(components, req, plan, callback=callback, model_hash=model_hash, clip=clip)
    image = resize_image(req.init_image, req.width, req.height, req.resize_mode)
    mask = resize_image(req.mask, req.width, req.height, req.resize_mode, resample=MASK_RESAMPLE)
    plan = inpaint_plan(components, req, image, blur_mask(mask, req.mask_blur))
    return run_plan(components, req, plan, callback=callback, model_hash=model_hash, clip=clip)


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2), x2 and y2 exclusive: the bounding box of the mask's non-zero pixels, `padding`
    pixels wider on each side, grown to the aspect ratio width : height about its center, inside the image.

    Where the image is too small for the grown box in one direction, the box takes the image's whole
    extent there (the crop's aspect ratio then differs, and the resize to width x height stretches it).
    """
    box = mask.getbbox()
    if box is None:
        raise ValueError("the mask is entirely black: nothing to repaint (white = repaint)")
    x1, y1, x2, y2 = box
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    w, h = x2 - x1, y2 - y1
    if w * height > h * width:  # wider than width : height -> grow the height
        y1, y2 = _grow(y1, y2, round(w * height / width), mask.height)
    else:
        x1, x2 = _grow(x1, x2, round(h * width / height), mask.width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """The interval [lo, hi) grown to `size` about its center, shifted to lie in [0, limit) (clipped if larger)."""
    lo -= (size - (hi - lo)) // 2
    lo = min(max(lo, 0), max(limit - size, 0))
    return lo, min(lo + size, limit)


def only_masked_plan(components: Components, req: ValidRequest) -> SamplingPlan:
    """The plan of "only masked" inpainting (module docstring): the crop around
    the mask at width x height, and a `finish` that pastes the result back into the whole image."""
    image, blurred = req.init_image, blur_mask(req.mask, req.mask_blur)
    box = crop_region(blurred, req.inpaint_padding, req.width, req.height)
    size = (box[2] - box[0], box[3] - box[1])
    crop = image.crop(box).resize((req.width, req.height), IMAGE_RESAMPLE)
    crop_mask = blurred.crop(box).resize((req.width, req.height), MASK_RESAMPLE)
    plan = inpaint_plan(components, req, crop, crop_mask)
    inner = plan.finish

    def paste(generated: Image.Image) -> Image.Image:
        patch = (inner(generated) if inner is not None else generated).resize(size, IMAGE_RESAMPLE)
        canvas = image.copy()
        canvas.paste(patch, box[:2])
        return Image.composite(canvas, image, blurred)  # outside the blurred mask: the input's own pixels

    params = {**plan.params, "Inpaint area": "Only masked", "Masked area padding": req.inpaint_padding}
    return dataclasses.replace(plan, finish=paste, params=params)
