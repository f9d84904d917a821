"""AUTOMATIC1111 txt2img / img2img payloads -> `GenerationRequest`, the schema the CLI and the Python API share.

A1111 builds its request schemas (`StableDiffusionTxt2ImgProcessingAPI`, `...Img2ImgProcessingAPI`,
modules/api/models.py) from the init fields of its processing classes (modules/processing.py) plus a
few API fields, and clients send all of them: `webuiapi`'s defaults include `firstphase_width`,
`eta=1.0`, `image_cfg_scale=1.5` and `inpaint_full_res=True`. Every field of those schemas is
accepted here, each in one of three ways (`FIELDS`):

- mapped to a request field: the `a1111` keys of `GenerationRequest`'s field table (`prompt`, `steps`,
  `eta`, `mask`, `inpaint_full_res`, ...; pipelines/fields.py holds the few codecs, such as `n_iter`
  batches of `batch_size`), read by `request_from_payload` for the fields of the payload's task;
- ignored, because A1111 reads it only for its own saving or UI, or only under a switch that is off
  or refused (`save_images`, `hr_cfg`), or only for models daguerre cannot load
  (`image_cfg_scale`, instruct-pix2pix only);
- refused with a 422 naming it when it switches on a feature daguerre lacks (`hr_prompt`,
  `restore_faces`, `script_name`, ...), and accepted at the values that leave the feature off.

A field of neither schema is refused by name (a typo is not silently dropped).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from ..limits import DEFAULT_LIMITS, LimitError, Limits
from ..pipelines.fields import PayloadError, surface
from ..pipelines.request import GenerationRequest
from ..pngmeta import png_bytes

# the image formats a payload may carry (PIL decodes others too, some through external programs)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
OFF = (None, False, 0, "", "None", "none")  # values that leave an A1111 switch off

# Every field of A1111's two request schemas. "map": becomes a request field (the field table's `a1111` keys,
# `_mapped`) or is read by the server (infotext, send_images, ...); "ignore": accepted whatever its value; a
# tuple: the values that leave a feature daguerre lacks off (None always does), with the feature's name,
# refused at any other value.
Rule = str | tuple[tuple[Any, ...], str]


def _mapped(*tasks: str) -> dict[str, Rule]:
    """"map" for every payload key of the request fields that matter for `tasks`."""
    return {key: "map" for task in tasks for _, payload in surface(GenerationRequest, "a1111", task)
            for key in payload.keys}


COMMON: dict[str, Rule] = {
    "override_settings": "map", "infotext": "map", "send_images": "map",
    "styles": ((None, []), "prompt styles (GET /sdapi/v1/prompt-styles lists none)"),
    "subseed_strength": ((0,), "variation seeds (subseed_strength)"),
    "seed_resize_from_h": ((-1, 0), "resizing the seed (seed_resize_from_h)"),
    "seed_resize_from_w": ((-1, 0), "resizing the seed (seed_resize_from_w)"),
    "restore_faces": ((False,), "face restoration"), "tiling": ((False,), "tiling (seamless images)"),
    "s_churn": ((0,), "s_churn"), "s_tmin": ((0,), "s_tmin"), "s_tmax": ((0, float("inf")), "s_tmax"),
    "s_noise": ((1,), "s_noise"),
    "refiner_checkpoint": (OFF, "refiner checkpoints"),
    "script_name": (("",), "scripts (GET /sdapi/v1/scripts lists none)"),
    "alwayson_scripts": ((None, {}), "always-on scripts (GET /sdapi/v1/scripts lists none)"),
    # A1111's saving, its UI and task bookkeeping; its refiner's switch point (no refiner: refused above)
    "do_not_save_samples": "ignore", "do_not_save_grid": "ignore", "save_images": "ignore",
    "override_settings_restore_afterwards": "ignore", "force_task_id": "ignore", "comments": "ignore",
    "disable_extra_networks": "ignore", "refiner_switch_at": "ignore",
    "subseed": "ignore",  # read only when subseed_strength > 0
    "script_args": "ignore",  # read only with a script_name
}
TXT2IMG: dict[str, Rule] = {
    **COMMON, **_mapped("txt2img"),
    "firstphase_width": ((0,), "the old hires fix's first-pass size (firstphase_width)"),
    "firstphase_height": ((0,), "the old hires fix's first-pass size (firstphase_height)"),
    # the hires fix (enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, hr_resize_x / _y and its
    # denoising_strength) is mapped above (pipelines/hires.py); its second pass runs with the first's model,
    # sampler, schedule, prompts and CFG, so other values of these are refused
    "hr_checkpoint_name": ((*OFF, "Use same checkpoint"), "a second-pass checkpoint (hr_checkpoint_name)"),
    "hr_sampler_name": ((*OFF, "Use same sampler"), "a second-pass sampler (hr_sampler_name)"),
    "hr_scheduler": ((*OFF, "Use same scheduler"), "a second-pass schedule (hr_scheduler)"),
    "hr_prompt": (OFF, "a second-pass prompt (hr_prompt)"),
    "hr_negative_prompt": (OFF, "a second-pass negative prompt (hr_negative_prompt)"),
    **dict.fromkeys(("firstpass_image", "hr_cfg", "hr_distilled_cfg", "denoising_strength_hr",
                     "hr_additional_modules"), "ignore"),
}
IMG2IMG: dict[str, Rule] = {
    **COMMON, **_mapped("img2img", "inpaint"), "include_init_images": "map",
    "image_cfg_scale": "ignore",  # A1111 reads it for instruct-pix2pix models only, which daguerre does not load
    "mask_round": ((True,), "an unrounded latent mask (mask_round=false)"),
    "initial_noise_multiplier": ((1,), "initial_noise_multiplier"),
    "latent_mask": (OFF, "a separate latent mask (latent_mask)"),
    "firstpass_image": "ignore",  # txt2img's hires fix only
}
FIELDS = {"txt2img": TXT2IMG, "img2img": IMG2IMG}
# A1111 settings a payload may override per request -> the request field they set
OVERRIDE_SETTINGS = {payload.setting: f.name for f, payload in surface(GenerationRequest, "a1111") if payload.setting}


class ApiError(ValueError):
    """A request the API refuses: `status` (422 unless said) and a message naming the field."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY):
        super().__init__(message)
        self.status = status


def parse_body(body: bytes) -> Any:
    """The JSON value of a request body (empty: {}); a 400 `ApiError` if it is not JSON or nests deeper than
    `untrusted.MAX_JSON_DEPTH` levels (a 100 000-deep list exhausts the parser's recursion: refused, not a 500)."""
    from ..untrusted import parse_json

    try:
        return parse_json(body or b"{}", "the request body")
    except ValueError as e:
        raise ApiError(str(e), HTTPStatus.BAD_REQUEST) from None


def png_base64(image, parameters: str | None = None) -> str:
    """A PIL image as base64 PNG text, as A1111's and OpenAI's answers carry it (with its PNG parameters when
    given)."""
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


def decode_image(data: Any, field: str, limits: Limits = DEFAULT_LIMITS):
    """A PIL image from base64 text, with or without a `data:image/...;base64,` prefix, read by
    `pipelines.images.open_image`: its declared size is checked against `limits.max_input_pixels` before
    its pixels are decoded (a 100-byte PNG may declare 20000 x 20000), PIL's own decompression-bomb guard
    holds, and only the common raster formats (`IMAGE_FORMATS`) are opened. Every refusal is a 422.
    """
    from ..pipelines.images import open_image

    if not isinstance(data, str) or not data:
        raise ApiError(f"{field} must be a base64-encoded image, got {type(data).__name__}")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{field} is not valid base64") from None
    try:
        return open_image(io.BytesIO(raw), field, limits, formats=IMAGE_FORMATS)
    except LimitError:
        raise
    except ValueError as e:
        raise ApiError(str(e)) from None


def request_from_payload(payload: Any, task: str = "txt2img", *, settings: Mapping[str, tuple] | None = None,
                         limits: Limits = DEFAULT_LIMITS) -> GenerationRequest:
    """The `GenerationRequest` of an A1111 txt2img / img2img payload (not yet validated against a model).

    Each field of the task reads its keys (the field table's `a1111` codecs); img2img with a `mask` is
    inpainting. `seed` -1 draws one; `n_iter` batches of `batch_size` make n_iter x batch_size images.
    `settings` holds, for each A1111 setting the server reports (GET /options), the values that name
    its current state (`check_settings`): an `override_settings` entry among them changes nothing and
    is accepted. Input images are checked against `limits` before they are decoded. Unknown fields, and
    features daguerre lacks when they are switched on, raise an
    `ApiError` that names them.
    """
    if not isinstance(payload, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(payload).__name__}")
    rules = FIELDS[task]
    for key, value in payload.items():
        rule = rules.get(key)
        if rule is None:
            other = "img2img" if task == "txt2img" else "txt2img"
            hint = f" (it is a field of {other})" if key in FIELDS[other] else ""
            raise ApiError(f"unknown field {key!r} for {task}{hint}; fields: {', '.join(sorted(rules))}")
        if isinstance(rule, tuple) and value is not None and value not in rule[0]:
            raise ApiError(f"{key}={value!r} switches on {rule[1]}, which daguerre does not have; leave it out "
                           f"or set it to {_shown(rule[0])}")
    p = payload
    if task == "img2img" and p.get("mask"):
        task = "inpaint"
    fields: dict[str, Any] = {"task": task}
    if isinstance(p.get("infotext"), str) and p["infotext"].strip():
        fields.update(_infotext_fields(p["infotext"], p))

    def decode(data: Any, name: str):
        return decode_image(data, name, limits)

    for f, codec in surface(GenerationRequest, "a1111", task):
        try:
            fields.update(codec.read(p, f, decode))
        except PayloadError as e:
            raise ApiError(str(e)) from None
    _check_overrides(p.get("override_settings"), settings or {})
    return GenerationRequest(**fields)


def check_clip_model(request: GenerationRequest, served: tuple[str, ...] = ()) -> None:
    """The CLIP a guided request names must be one the server may open: a CLIP shipped in the package or one
    given to `daguerre serve --clip` (`served`). A payload never names a path to open, as it never names a
    model file: `sd_model_checkpoint` is refused the same way (one model, chosen at start)."""
    if not request.clip_guidance or request.clip_model is None:
        return
    from ..registry import shipped_clips

    allowed = sorted({*shipped_clips(), *served})
    if request.clip_model not in allowed:
        raise ApiError(f"clip_model {request.clip_model!r}: this server guides only with the CLIP models it was "
                       f"started with or ships ({', '.join(allowed) or 'none'}); start it with daguerre serve --clip "
                       "MODEL to add one")


def _shown(values: tuple[Any, ...]) -> str:
    """The values that leave a feature off, as JSON would spell them."""
    import json

    return " or ".join(json.dumps(v) if not isinstance(v, float) or v != float("inf") else "Infinity" for v in values)


def _check_overrides(overrides: Any, settings: Mapping[str, tuple]) -> None:
    """`override_settings` is an object whose settings are request fields (`OVERRIDE_SETTINGS`, read with
    the other fields) or keep their value."""
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ApiError(f"override_settings must be an object, got {type(overrides).__name__}")
    check_settings({k: v for k, v in overrides.items() if k not in OVERRIDE_SETTINGS}, settings, "override setting")


def check_settings(changes: Mapping[str, Any], settings: Mapping[str, tuple], what: str = "option") -> None:
    """Refuse a change of an A1111 setting this server cannot make: `settings[key]` holds the values that
    name its current state (the loaded checkpoint by title, name or hash); any other value, or a setting
    the server does not report, is an `ApiError` naming it."""
    for key, value in changes.items():
        if key in settings and value in settings[key]:
            continue
        if key == "sd_model_checkpoint":
            raise ApiError(f"sd_model_checkpoint {value!r}: this server holds one model, {settings[key][0]!r}; "
                           "start another with daguerre serve --model")
        current = f"it stays {settings[key][0]!r}" if key in settings else "daguerre does not have this setting"
        per_request = ", ".join(f"{k} (in a payload's override_settings)" for k in OVERRIDE_SETTINGS)
        raise ApiError(f"{what} {key}={value!r} cannot be changed in daguerre serve ({current}); settings it takes "
                       f"per request: {per_request}, and the payload's own fields (eta, ...)")


def _infotext_fields(text: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's `infotext`: the settings of a `parameters` text, for the fields the payload does not set (a
    field is set by its first payload key, or its entry in `override_settings`, even at null)."""
    from ..pipelines.infotext import settings_from_parameters

    settings = settings_from_parameters(text, "infotext")
    if settings.ignored:
        raise ApiError(f"infotext carries settings daguerre does not apply: {', '.join(settings.ignored)}; "
                       "remove them from the text, or send the fields instead of an infotext")
    given = {f.name for f, codec in surface(GenerationRequest, "a1111") if codec.given(payload)}
    return {name: value for name, value in settings.fields.items() if name not in given}
