"""`daguerre serve`: AUTOMATIC1111's web API (the `/sdapi/v1/...` endpoints that scripts, bots and
editor plug-ins call) over one loaded model, and a small page to try it in a browser.

Endpoints (request and response fields as A1111 names them; docs/usage.md, "daguerre serve"):

    POST /sdapi/v1/txt2img     {"prompt", "negative_prompt", "steps", "sampler_name", "scheduler",
                                "cfg_scale", "seed", "width", "height", "batch_size", "n_iter", ...}
    POST /sdapi/v1/img2img     the same and "init_images" (base64), "denoising_strength", "resize_mode",
                               "mask", "mask_blur", "inpainting_fill", "inpainting_mask_invert"
                               -> {"images": [base64 PNG, ...], "parameters": {...}, "info": "<json>"}
    POST /sdapi/v1/png-info    {"image"} -> the generation parameters it carries
    POST /sdapi/v1/interrupt   stop the running request (it answers with no images)
    GET  /sdapi/v1/samplers, /sdapi/v1/schedulers, /sdapi/v1/sd-models, /sdapi/v1/progress, /sdapi/v1/options
    POST /sdapi/v1/options     accepted when it changes nothing (one model per server)
    GET  /                     the page

The payload becomes a `GenerationRequest` here, the one schema the CLI and the Python API share, and
is checked once by `GenerationRequest.validate`: a bad value is a 422 whose "detail" names it. A1111
fields daguerre does not implement (hires fix, face restoration, scripts, ...) are refused when set,
never silently ignored; those that only steer A1111's own saving are accepted. Requests run one at a
time (one model, one lock); the PNGs carry the same `parameters` text chunk as the CLI's.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from ..pipelines.request import GenerationRequest

API = "/sdapi/v1"
# A1111 img2img "inpainting_fill" (Masked content) and "resize_mode" codes -> daguerre's names
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
RESIZE_MODE = {0: "stretch", 1: "crop", 2: "fit"}  # Just resize, Crop and resize, Resize and fill
# A1111 payload fields about its own saving and UI state, or read by A1111 only when a switch that
# daguerre refuses (below) is on: accepted whatever their value
IGNORED = {"send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "styles",
           "override_settings_restore_afterwards", "include_init_images", "script_name", "script_args",
           "alwayson_scripts", "firstpass_image", "force_task_id", "infotext",
           "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
           "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg",
           "denoising_strength_hr", "refiner_switch_at", "inpaint_full_res_padding", "subseed",
           "denoising_strength"}  # in txt2img, the strength of the hires fix's second pass
# A1111 features daguerre lacks -> the values that leave them off (None always does): refused otherwise
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "enable_hr": (False,), "restore_faces": (False,), "tiling": (False,), "subseed_strength": (0,),
    "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0), "refiner_checkpoint": ("",),
    "s_min_uncond": (0,), "s_churn": (0,), "s_tmin": (0,), "s_tmax": (0, float("inf")), "s_noise": (1,),
    "eta": (), "image_cfg_scale": (), "initial_noise_multiplier": (1,), "inpaint_full_res": (False, 0),
    "latent_mask": (),
}
TXT2IMG_FIELDS = {"prompt", "negative_prompt", "steps", "sampler_name", "sampler_index", "scheduler", "cfg_scale",
                  "seed", "width", "height", "batch_size", "n_iter", "override_settings"}
IMG2IMG_FIELDS = TXT2IMG_FIELDS | {"init_images", "denoising_strength", "resize_mode", "mask", "mask_blur",
                                   "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpainting_mask_invert"}
OVERRIDE_SETTINGS = {"CLIP_stop_at_last_layers": "clip_skip"}  # A1111 setting -> request field


class ApiError(ValueError):
    """A request the API refuses: `status` (422 unless said) and a message naming the field."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY):
        super().__init__(message)
        self.status = status


def decode_image(data: Any, field: str):
    """A PIL image from base64 text, with or without a `data:image/...;base64,` prefix."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise ApiError(f"{field} must be a base64-encoded image, got {type(data).__name__}")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError):
        raise ApiError(f"{field} is not valid base64") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ApiError(f"{field} is not a readable image ({e})") from None
    return image


def request_from_payload(payload: Any, task: str = "txt2img") -> GenerationRequest:
    """The `GenerationRequest` of an A1111 txt2img / img2img payload (not yet validated against a model).

    img2img with a `mask` is inpainting. `seed` -1 draws one; `n_iter` batches of `batch_size` make
    n_iter x batch_size images. Unknown fields, and known A1111 features daguerre lacks when they are
    switched on, raise an `ApiError` that names them.
    """
    if not isinstance(payload, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(payload).__name__}")
    allowed = IMG2IMG_FIELDS if task == "img2img" else TXT2IMG_FIELDS
    for key, value in payload.items():
        if key in allowed or key in IGNORED:
            continue
        if key in UNSUPPORTED:
            if value is not None and value not in UNSUPPORTED[key]:
                raise ApiError(f"{key}={value!r} is not supported by daguerre; leave it out")
            continue
        raise ApiError(f"unknown field {key!r} for {task}; fields: {', '.join(sorted(allowed))}")
    p = payload
    fields: dict[str, Any] = {"prompt": p.get("prompt") or "", "negative_prompt": p.get("negative_prompt") or ""}
    for key, name in (("steps", "steps"), ("cfg_scale", "cfg_scale"), ("width", "width"), ("height", "height")):
        if p.get(key) is not None:
            fields[name] = p[key]
    sampler = p.get("sampler_name") or p.get("sampler_index")
    if sampler:
        fields["sampler"] = sampler
    if p.get("scheduler"):
        fields["schedule"] = p["scheduler"]
    seed = p.get("seed", -1)
    fields["seed"] = None if seed is None or seed == -1 else seed
    batch_size, n_iter = p.get("batch_size", 1), p.get("n_iter", 1)
    for key, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(f"{key} must be a whole number >= 1, got {value!r}")
    fields["batch_size"], fields["n"] = batch_size, batch_size * n_iter
    overrides = p.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise ApiError(f"override_settings must be an object, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if key not in OVERRIDE_SETTINGS:
            raise ApiError(f"override setting {key!r} is not supported by daguerre; supported: "
                           f"{', '.join(OVERRIDE_SETTINGS)}")
        fields[OVERRIDE_SETTINGS[key]] = value
    if task == "img2img":
        fields.update(_img2img_fields(p))
    return GenerationRequest(**fields)


def _img2img_fields(p: dict) -> dict[str, Any]:
    from PIL import ImageOps

    images = p.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise ApiError("init_images must be a list of one base64-encoded image (daguerre takes one init image)")
    fields: dict[str, Any] = {"task": "img2img", "init_image": decode_image(images[0], "init_images[0]")}
    if p.get("denoising_strength") is not None:
        fields["strength"] = p["denoising_strength"]
    mode = p.get("resize_mode", 0)
    if mode not in RESIZE_MODE:
        raise ApiError(f"resize_mode {mode!r} is not supported; use 0 (just resize), 1 (crop and resize) "
                       "or 2 (resize and fill)")
    fields["resize_mode"] = RESIZE_MODE[mode]
    if p.get("mask"):
        mask = decode_image(p["mask"], "mask").convert("L")
        if p.get("inpainting_mask_invert"):
            mask = ImageOps.invert(mask)
        fields.update(task="inpaint", mask=mask)
        fill = p.get("inpainting_fill", 1)
        if fill not in INPAINTING_FILL:
            raise ApiError(f"inpainting_fill {fill!r} must be 0 (fill), 1 (original), 2 (latent noise) "
                           "or 3 (latent nothing)")
        fields["inpaint_fill"] = INPAINTING_FILL[fill]
        blur, xy = p.get("mask_blur"), {p.get("mask_blur_x"), p.get("mask_blur_y")} - {None}
        if blur is None and len(xy) == 1:
            blur = xy.pop()
        elif xy and xy != {blur}:
            raise ApiError(f"mask_blur_x / mask_blur_y ({p.get('mask_blur_x')}, {p.get('mask_blur_y')}) differ from "
                           f"mask_blur ({blur}) or from each other: daguerre blurs the mask the same way in both "
                           "directions; give mask_blur alone")
        if blur is not None:
            fields["mask_blur"] = blur
    return fields


class Server:
    """One model behind the API: `handle(method, path, body) -> (status, content type, bytes)`.

    Kept apart from the HTTP plumbing so that it can be tested and embedded; `serve` wraps it in a
    `ThreadingHTTPServer`. Generations hold `lock`, so requests run one after another.
    """

    def __init__(self, pipe, model_name: str = "model", file: str | None = None, sha256: str | None = None):
        self.pipe = pipe
        self.model_name = model_name
        self.file, self.sha256 = file, sha256  # the checkpoint file, for /sd-models (None: random, folder)
        self.lock = threading.Lock()
        self.progress: dict[str, Any] = {"step": 0, "total": 0, "job": None, "started": 0.0, "latent": None}
        self._preview = None  # PreviewDecoder, made at the first live preview
        self._interrupt = threading.Event()  # set by /interrupt: the running request stops at its next step
        # (method, path) -> handler(query dict for GET, JSON payload for POST) -> a JSON-able answer
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", f"{API}/txt2img"): lambda payload: self.generate(payload, "txt2img"),
            ("POST", f"{API}/img2img"): lambda payload: self.generate(payload, "img2img"),
            ("POST", f"{API}/png-info"): png_info,
            ("POST", f"{API}/interrupt"): lambda _payload: self.interrupt(),
            ("GET", f"{API}/samplers"): lambda _query: samplers(),
            ("GET", f"{API}/schedulers"): lambda _query: schedulers(),
            ("GET", f"{API}/sd-models"): lambda _query: self.models(),
            ("GET", f"{API}/options"): lambda _query: self.options(),
            ("POST", f"{API}/options"): self.set_options,
            ("GET", f"{API}/progress"): lambda query: self.progress_report(_flag(query, "skip_current_image")),
        }

    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, str, bytes]:
        route, _, query = path.partition("?")
        route = route.rstrip("/") or "/"
        if method == "GET" and route == "/":
            return HTTPStatus.OK, "text/html; charset=utf-8", _page()
        routes = self.routes
        if (method, route) not in routes:
            if any(r == route for _, r in routes):
                return _json(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": f"{method} is not allowed on {route}"})
            return _json(HTTPStatus.NOT_FOUND, {"detail": f"no endpoint {route}; see {API}/... in docs/usage.md"})
        try:
            if method == "GET":
                return _json(HTTPStatus.OK, routes[method, route](parse_qs(query)))
            try:
                payload = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(f"the request body is not JSON ({e})", HTTPStatus.BAD_REQUEST) from None
            return _json(HTTPStatus.OK, routes[method, route](payload))
        except ApiError as e:
            return _json(e.status, {"error": type(e).__name__, "detail": str(e)})
        except (ValueError, FileNotFoundError) as e:  # GenerationRequest.validate and the pipelines' checks
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": type(e).__name__, "detail": str(e)})
        except Exception as e:  # a bug, not the request: the client hears of it, the server keeps serving
            traceback.print_exc()
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(e).__name__, "detail": str(e)})

    def generate(self, payload: Any, task: str) -> dict[str, Any]:
        from ..pipelines.common import count_steps
        from ..pngmeta import png_bytes

        request = self.pipe.request(request_from_payload(payload, task))  # validated: a bad value fails here
        with self.lock:
            self.progress.update(step=0, total=request.n * count_steps(self.pipe.components, request), job=task,
                                 started=time.monotonic(), latent=None)

            self._interrupt.clear()

            def on_step(info: dict) -> None:
                if self._interrupt.is_set():
                    raise _Interrupted
                self.progress["step"] += 1
                self.progress["latent"] = info["denoised"][:1].detach().clone()  # the x0 estimate, first image

            try:
                results = self.pipe(request, callback=on_step)
            except _Interrupted:
                info = {"prompt": request.prompt, "seed": request.seed, "all_seeds": [], "infotexts": [],
                        "interrupted": True, "sampling_step": self.progress["step"]}
                return {"images": [], "parameters": payload, "info": json.dumps(info)}
            finally:
                self.progress.update(job=None, latent=None)
        images = [base64.b64encode(png_bytes(r.image, r.parameters)).decode("ascii") for r in results]
        info = {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": results[0].seed,
            "all_seeds": [r.seed for r in results], "all_prompts": [request.prompt] * len(results),
            "all_negative_prompts": [request.negative_prompt] * len(results), "steps": request.steps,
            "sampler_name": request.sampler, "scheduler": request.schedule, "cfg_scale": request.cfg_scale,
            "width": results[0].image.width, "height": results[0].image.height, "batch_size": request.batch_size,
            "sd_model_name": self.model_name, "sd_model_hash": self.pipe.model_hash,
            "infotexts": [r.parameters for r in results],
        }
        return {"images": images, "parameters": payload, "info": json.dumps(info)}

    def interrupt(self) -> dict[str, Any]:
        """Stop the running request at its next step (A1111's /interrupt): it answers with no images."""
        if self.progress["job"] is not None:
            self._interrupt.set()
        return {}

    def options(self) -> dict[str, Any]:
        """The A1111 settings clients read: the loaded checkpoint, and daguerre's fixed output format."""
        return {"sd_model_checkpoint": self.models()[0]["title"], "samples_format": "png",
                "CLIP_stop_at_last_layers": 1}

    def set_options(self, payload: Any) -> dict[str, Any]:
        """A1111 clients set the checkpoint before generating: accepted when it names the loaded one."""
        if not isinstance(payload, dict):
            raise ApiError(f"options must be a JSON object, got {type(payload).__name__}")
        current = self.options()
        for key, value in payload.items():
            if key == "sd_model_checkpoint" and value in (current[key], self.model_name, self.pipe.model_hash):
                continue
            if key in current and value == current[key]:
                continue
            if key == "sd_model_checkpoint":
                raise ApiError(f"sd_model_checkpoint {value!r}: this server holds one model, {current[key]!r}; "
                               "start another with daguerre serve --model")
            raise ApiError(f"option {key}={value!r} cannot be changed in daguerre serve; per request, "
                           "use the payload's fields (e.g. override_settings.CLIP_stop_at_last_layers)")
        return {}

    def models(self) -> list[dict[str, Any]]:
        h = self.pipe.model_hash
        title = f"{self.model_name} [{h}]" if h else self.model_name
        return [{"title": title, "model_name": self.model_name, "hash": h, "sha256": self.sha256,
                 "filename": self.file or self.model_name, "config": None}]

    def progress_report(self, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's /progress: the fraction done, the seconds left, and (unless skipped) the live preview:
        the model's current x0 estimate of the first image (daguerre.pipelines.preview, `approx`)."""
        state = dict(self.progress)
        job, step, total, latent = state["job"], state["step"], state["total"], state["latent"]
        done = step / total if job and total else 0.0
        elapsed = time.monotonic() - state["started"] if job else 0.0
        image = None
        if job and latent is not None and not skip_current_image:
            from ..pipelines.preview import PreviewDecoder
            from ..pngmeta import png_bytes

            if self._preview is None:
                self._preview = PreviewDecoder(self.pipe.components.vae)
            image = base64.b64encode(png_bytes(self._preview.decode(latent)[0])).decode("ascii")
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0.0,
                "state": {"job": job or "", "sampling_step": step, "sampling_steps": total},
                "current_image": image, "textinfo": None}


class _Interrupted(Exception):
    """Raised in the sampler callback when /interrupt was called."""


def png_info(payload: Any) -> dict[str, Any]:
    """A1111's /png-info: the generation parameters a PNG carries, as text and parsed."""
    from ..pngmeta import parse_parameters

    if not isinstance(payload, dict) or "image" not in payload:
        raise ApiError('png-info takes {"image": "<base64 PNG>"}')
    image = decode_image(payload["image"], "image")
    text = image.info.get("parameters") or ""
    prompt, negative, params = parse_parameters(text) if text else ("", "", {})
    parameters = {"Prompt": prompt, "Negative prompt": negative, **params} if text else {}
    return {"info": text, "items": {k: v for k, v in image.info.items() if isinstance(v, str)},
            "parameters": parameters}


def samplers() -> list[dict[str, Any]]:
    from ..diffusion.sampler_names import SAMPLER_NAMES

    return [{"name": s.label, "aliases": list(s.aliases), "options": {}} for s in SAMPLER_NAMES]


def schedulers() -> list[dict[str, Any]]:
    from ..diffusion.sampler_names import AUTOMATIC, SCHEDULES

    rows = [{"name": "automatic", "label": AUTOMATIC, "aliases": None}]
    for s in SCHEDULES:
        rows.append({"name": s.label.lower().replace(" ", "_"), "label": s.label, "aliases": list(s.aliases) or None})
    return rows


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter (`?name=true` / `1`), false when absent."""
    return query.get(name, ["false"])[-1].lower() in ("true", "1")


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode("utf-8")


def _page() -> bytes:
    return resources.files("daguerre.server").joinpath("page.html").read_bytes()
