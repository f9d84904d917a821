"""OpenAI's Images API over the loaded model: `POST /v1/images/generations`, `POST /v1/images/edits`,
`GET /v1/models` (https://platform.openai.com/docs/api-reference/images), as stable-diffusion.cpp's server
and LocalAI speak it, so that the official `openai` clients, Open WebUI and SillyTavern can call daguerre.

- `model`: any value means the loaded model (clients send `dall-e-2`, `gpt-image-1`, ...).
- `size` "WIDTHxHEIGHT" (or "auto", or absent: the model's own size), `n` images, `prompt`.
- `response_format`: `b64_json` (also when absent: daguerre keeps no files for clients to fetch); `url` is
  refused by name.
- The fields daguerre cannot honour are accepted at their defaults (`DEFAULTS`: quality, style, background,
  output format, ...) and refused by name at any other value; `user` and `safety_identifier` are accepted.
- daguerre's own settings ride along as extra body fields (`extra_body` in the `openai` client):
  `seed`, `steps`, `sampler`, `scheduler`, `cfg_scale`, `negative_prompt`, and for edits `strength`.
- Edits take OpenAI's mask convention: the mask's fully transparent pixels are repainted; without a mask,
  the image's own fully transparent pixels are.
A field that is neither is refused by name (a typo is not silently dropped). The result is a
`GenerationRequest`, validated and run as A1111's routes run theirs (`Server.run`: limits, one at a time).
"""

from __future__ import annotations

import io
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..pipelines.request import GenerationRequest
from .payload import IMAGE_FORMATS, ApiError, png_base64

# fields of OpenAI's image requests that daguerre cannot honour -> the values that leave them at their default
DEFAULTS: dict[str, tuple[Any, ...]] = {
    "quality": (None, "auto", "standard"),
    "style": (None, "vivid"),
    "background": (None, "auto", "opaque"),
    "moderation": (None, "auto"),
    "output_format": (None, "png"),
    "output_compression": (None, 100),
    "stream": (None, False),
    "partial_images": (None, 0),
    "input_fidelity": (None, "low"),
}


class ImageGeneration(BaseModel):
    """The body of `POST /v1/images/generations` (JSON), and the form fields of `/v1/images/edits`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw")
    model: str | None = Field(None, description="any value: the model this server loaded")
    n: int | None = Field(None, description="number of images (default 1)")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512; auto or absent: the model's own size")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (the default here); url is refused: the server keeps no files to fetch")
    quality: str | None = Field(None, description="accepted at its defaults: auto, standard")
    style: str | None = Field(None, description="accepted at its default: vivid")
    background: str | None = Field(None, description="accepted at auto or opaque")
    moderation: str | None = Field(None, description="accepted at its default: auto")
    output_format: str | None = Field(None, description="accepted at its default: png")
    output_compression: int | None = Field(None, description="accepted at its default: 100")
    stream: bool | None = Field(None, description="accepted at its default: false")
    partial_images: int | None = Field(None, description="accepted at its default: 0")
    user: str | None = Field(None, description="accepted, unused")
    safety_identifier: str | None = Field(None, description="accepted, unused")
    # daguerre's own settings
    seed: int | None = Field(None, description="daguerre: the seed (absent or -1: drawn)")
    steps: int | None = Field(None, description="daguerre: sampler steps (default: the model's)")
    sampler: str | None = Field(None, description="daguerre: sampler name, as GET /sdapi/v1/samplers lists them")
    scheduler: str | None = Field(None, description="daguerre: schedule name, as GET /sdapi/v1/schedulers lists")
    cfg_scale: float | None = Field(None, description="daguerre: classifier-free guidance scale")
    negative_prompt: str = Field("", description="daguerre: what not to draw")


class ImageEdit(ImageGeneration):
    """The form fields of `POST /v1/images/edits` besides its files (`image`, `mask`)."""

    input_fidelity: str | None = Field(None, description="accepted at its default: low")
    strength: float | None = Field(None, description="daguerre: denoising strength of the repainted area "
                                   "(default 1: repainted from noise)")


def parse_fields(fields: dict[str, Any], model: type[ImageGeneration]) -> ImageGeneration:
    """`fields` checked against `model`: a 422 `ApiError` naming the first wrong field."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise ApiError(validation_message(e.errors())) from None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's (or FastAPI's) errors as one sentence naming the fields."""
    parts = []
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "form")) or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        elif err.get("type") == "missing":
            parts.append(f"{field} is required")
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid')} (got {err.get('input')!r:.60})")
    return "; ".join(parts)


def generation_request(fields: ImageGeneration, task: str = "txt2img", **images: Any) -> GenerationRequest:
    """The `GenerationRequest` of OpenAI's fields (and, for edits, `init_image` and `mask`)."""
    for name, allowed in DEFAULTS.items():
        value = getattr(fields, name, None)
        if value not in allowed:
            shown = " or ".join(repr(v) for v in allowed if v is not None)
            raise ApiError(f"{name}={value!r} is not something daguerre can do; leave it out or send {shown}")
    if fields.response_format == "url":
        raise ApiError("response_format 'url' is not served: daguerre keeps no files for clients to fetch; "
                       "send response_format b64_json (the default here)")
    width = height = None
    if fields.size not in (None, "auto"):
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", fields.size)
        if not match:
            raise ApiError(f"size {fields.size!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto")
        width, height = int(match[1]), int(match[2])
    extra = {"strength": fields.strength} if isinstance(fields, ImageEdit) and fields.strength is not None else {}
    if task == "inpaint":
        extra.setdefault("strength", 1.0)
    return GenerationRequest(
        task=task, prompt=fields.prompt, negative_prompt=fields.negative_prompt, n=1 if fields.n is None else fields.n,
        width=width, height=height, seed=None if fields.seed in (None, -1) else fields.seed, steps=fields.steps,
        sampler=fields.sampler, schedule=fields.scheduler, cfg_scale=fields.cfg_scale, **extra, **images)


def edit_images(image: bytes, mask: bytes | None, limits) -> dict[str, Any]:
    """The init image (RGB) and daguerre's mask (L, white = repaint) of an edit's uploads: OpenAI's convention,
    where the mask's fully transparent pixels (alpha 0) are repainted, and without a mask the image's own."""
    from PIL import Image

    from ..pipelines.images import open_image

    def read(data: bytes, name: str) -> Image.Image:
        try:
            return open_image(io.BytesIO(data), name, limits, formats=IMAGE_FORMATS)
        except ValueError as e:
            if type(e) is not ValueError:  # LimitError: its own message
                raise
            raise ApiError(f"{name}: {e}") from None

    picture = read(image, "image")
    source, name = (read(mask, "mask"), "mask") if mask is not None else (picture, "image")
    if source.size != picture.size:
        raise ApiError(f"mask is {source.width}x{source.height} but image is {picture.width}x{picture.height}; "
                       "send a mask of the image's size")
    if "A" not in source.getbands() and not (source.mode == "P" and "transparency" in source.info):
        raise ApiError(f"{name} has no alpha channel: OpenAI's edits repaint the fully transparent pixels of the "
                       "mask (or, without a mask, of the image); send a PNG with transparency")
    alpha = source.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    if repaint.getbbox() is None:
        raise ApiError(f"{name} has no fully transparent pixels, so nothing would be repainted; make the area "
                       "to repaint transparent (alpha 0)")
    return {"init_image": picture.convert("RGB"), "mask": repaint}


def images_response(results: list, fields: ImageGeneration) -> dict[str, Any]:
    """OpenAI's ImagesResponse: {created, data: [{b64_json, revised_prompt}], ...}; PNGs carry their parameters."""
    first = results[0].image if results else None
    return {"created": int(time.time()),
            "data": [{"b64_json": png_base64(r.image, r.parameters),
                      "revised_prompt": fields.prompt} for r in results],
            "output_format": "png", "background": "opaque", "quality": "standard",
            "size": f"{first.width}x{first.height}" if first else fields.size}


def models(model_name: str) -> dict[str, Any]:
    """OpenAI's model list: the one loaded model."""
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "daguerre"}]}
