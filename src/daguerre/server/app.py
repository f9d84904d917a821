"""`daguerre serve`: AUTOMATIC1111's web API (the `/sdapi/v1/...` endpoints that scripts, bots and
editor plug-ins call) over one loaded model, and a small page to try it in a browser.

Endpoints (request and response fields as A1111 names them; docs/usage.md, "daguerre serve"):

    POST /sdapi/v1/txt2img     {"prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "eta",
                                "cfg_scale", "seed", "width", "height", "batch_size", "n_iter", ...}
    POST /sdapi/v1/img2img     the same and "init_images" (base64), "denoising_strength", "resize_mode",
                               "mask", "mask_blur", "inpainting_fill", "inpainting_mask_invert",
                               "inpaint_full_res", "inpaint_full_res_padding"
                               -> {"images": [base64 PNG, ...], "parameters": {...}, "info": "<json>"}
    POST /sdapi/v1/png-info    {"image"} -> the generation parameters it carries
    POST /sdapi/v1/interrupt   stop the running request: it answers with the images so far, the current
                               batch's decoded from the model's latest x0 estimate
    POST /sdapi/v1/skip        end the current batch the same way and go on with the next
    GET  /sdapi/v1/progress    A1111's progress state (job, job_count, job_no, sampling_step, ...), the
                               live preview and the seconds left
    GET  /sdapi/v1/samplers, schedulers, sd-models, options, memory, cmd-flags, and the lists of what
         daguerre does not have (loras, embeddings, upscalers, sd-vae, hypernetworks, face-restorers,
         realesrgan-models, prompt-styles, latent-upscale-modes, scripts, script-info, extensions): empty
    POST /sdapi/v1/options     accepted when it changes nothing (one model per server)
    POST /sdapi/v1/refresh-checkpoints, refresh-vae, refresh-loras: nothing to refresh
    GET  /daguerre/attention/last  the cross-attention maps (DAAM) of the last image made, one overlay per word
                               of its prompt, computed on demand in the queue as a generation is
                               (daguerre.explain.attention; the page's "Attention" panel)
    GET  /                     the page

The payload becomes a `GenerationRequest` (server/payload.py), checked once by
`GenerationRequest.validate` against the server's `Limits`: a bad value is a 422 whose "detail" names
it; the `ValidRequest` it returns is what runs. Requests run one at a time, as jobs of a bounded queue
with one worker (server/jobs.py: full, a 503); the /jobs routes (server/routes.py) submit them without
waiting. The PNGs carry the same `parameters` text chunk as the CLI's. A request stops at the next U-Net block after
/interrupt, or when `cancelled` (the socket layer's "the client went away") says so.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from ..conditioning import InpaintConcat, conditioner_for
from ..limits import DEFAULT_LIMITS, Limits
from ..pngmeta import parse_parameters
from .jobs import QUEUE_SIZE, Job, Jobs
from .payload import (  # noqa: F401  (ApiError, decode_image, request_from_payload: this module's names before)
    ApiError,
    check_clip_model,
    check_settings,
    decode_image,
    parse_body,
    png_base64,
    request_from_payload,
)

API = "/sdapi/v1"
ATTENTION_ROUTE = "/daguerre/attention/last"
CANCEL_POLL = 0.05  # seconds between two asks of `cancelled` (a system call) while a request runs
# A1111 lists of things daguerre does not have, in A1111's empty shapes: route -> answer
NOTHING: dict[str, Any] = {
    "upscalers": [], "latent-upscale-modes": [], "sd-vae": [], "hypernetworks": [], "face-restorers": [],
    "realesrgan-models": [], "prompt-styles": [], "script-info": [], "extensions": [],
    "scripts": {"txt2img": [], "img2img": []},
}
Cancelled = Callable[[], bool] | None


class Server:
    """One model behind the API: `handle(method, path, body, cancelled) -> (status, content type, bytes)`.

    Kept apart from the HTTP plumbing (server/http.py) so that it can be tested and embedded.
    Generations hold `lock`, so requests run one after another; `state` is A1111's progress state.
    """

    def __init__(self, pipe, model_name: str = "model", file: str | None = None, sha256: str | None = None,
                 limits: Limits | None = None, clips: tuple[str, ...] = (), queue_size: int = QUEUE_SIZE):
        if limits is not None and limits != pipe.limits:  # one set of bounds: the server's run the pipeline too
            pipe = copy.copy(pipe)
            pipe.limits = limits
        self.pipe = pipe
        self.model_name = model_name
        self.file, self.sha256 = file, sha256  # the checkpoint file, for /sd-models (None: random, folder)
        self.clips = tuple(clips)  # CLIP models a payload may name besides the shipped ones (serve --clip)
        self.limits: Limits = pipe.limits
        self.lock = threading.Lock()
        self.jobs = Jobs(queue_size)  # one worker runs the generations, in turn, from a bounded queue
        self.state: dict[str, Any] = {"skipped": False, "interrupted": False, "stopping_generation": False,
                                      "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
                                      "sampling_step": 0, "sampling_steps": 0}
        self._live: dict[str, Any] = {"started": 0.0, "done": 0, "total": 0, "latent": None}
        self._preview = None  # PreviewDecoder, made at the first live preview
        self._interrupt = threading.Event()  # set by /interrupt: the running request stops
        self._last: tuple[Any, int] | None = None  # the last request that made images, and its last image's seed
        self._attention: tuple[tuple[Any, int], dict[str, Any]] | None = None  # the maps of that image, once made
        self._skip = threading.Event()  # set by /skip: the running batch ends
        # (method, path) -> handler(query dict for GET, JSON payload for POST; cancelled) -> a JSON-able answer
        self.routes: dict[tuple[str, str], Callable[[Any, Cancelled], Any]] = {
            ("POST", f"{API}/txt2img"): lambda payload, cancelled: self.generate(payload, "txt2img", cancelled),
            ("POST", f"{API}/img2img"): lambda payload, cancelled: self.generate(payload, "img2img", cancelled),
            ("POST", f"{API}/png-info"): lambda payload, _: png_info(payload, self.limits),
            ("POST", f"{API}/interrupt"): lambda _payload, _: self.interrupt(),
            ("POST", f"{API}/skip"): lambda _payload, _: self.skip(),
            ("GET", f"{API}/samplers"): lambda _query, _: samplers(),
            ("GET", f"{API}/schedulers"): lambda _query, _: schedulers(),
            ("GET", f"{API}/sd-models"): lambda _query, _: self.models(),
            ("GET", f"{API}/options"): lambda _query, _: self.options(),
            ("POST", f"{API}/options"): lambda payload, _: self.set_options(payload),
            ("GET", f"{API}/progress"): lambda query, _: self.progress_report(_flag(query, "skip_current_image")),
            ("GET", f"{API}/memory"): lambda _query, _: self.memory(),
            ("GET", f"{API}/cmd-flags"): lambda _query, _: self.cmd_flags(),
            ("GET", ATTENTION_ROUTE): lambda _query, cancelled: self.attention_of_last(cancelled),
            **{("GET", f"{API}/{name}"): (lambda _q, _, a=answer: a) for name, answer in NOTHING.items()},
            # the LoRAs of --lora-dir and the embeddings of --embeddings-dir (daguerre.lora), in A1111's shapes
            ("GET", f"{API}/loras"): lambda _query, _: self.loras(),
            ("GET", f"{API}/embeddings"): lambda _query, _: self.embeddings(),
            # one model, found at start: nothing to refresh (A1111 answers null)
            **{("POST", f"{API}/refresh-{what}"): (lambda _p, _: None) for what in ("checkpoints", "vae", "loras")},
        }

    def handle(self, method: str, path: str, body: bytes = b"", cancelled: Cancelled = None) -> tuple[int, str, bytes]:
        """The answer to one request. `cancelled`, if given, returns True once the client has gone: a
        generation then stops at its next U-Net block (server/http.py passes it)."""
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
                return _json(HTTPStatus.OK, routes[method, route](parse_qs(query), cancelled))
            return _json(HTTPStatus.OK, routes[method, route](parse_body(body), cancelled))
        except ApiError as e:
            return _json(e.status, {"error": type(e).__name__, "detail": str(e)})
        except (ValueError, FileNotFoundError) as e:  # GenerationRequest.validate (LimitError too), pipeline checks
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": type(e).__name__, "detail": str(e)})
        except Exception as e:  # a bug, not the request: the client hears of it, the server keeps serving
            traceback.print_exc()
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(e).__name__, "detail": str(e)})

    # --- generation -------------------------------------------------------------------------------

    def _check_infotext_precision(self, payload: Any) -> None:
        """An `infotext` that names a `Precision` or `Weights` other than this server's would silently give another
        image than the one it describes: refused, naming both (a text without those keys, such as A1111's, is
        taken as it is)."""
        from ..pipelines.infotext import PRECISION_KEY, WEIGHTS_KEY, settings_from_parameters
        from ..pngmeta import parse_parameters
        from ..precision import dtype_of, short_name
        from ..quantize import is_quantized

        text = payload.get("infotext") if isinstance(payload, dict) else None
        if not (isinstance(text, str) and text.strip()):
            return
        named = parse_parameters(text)[2]
        if PRECISION_KEY not in named and WEIGHTS_KEY not in named:
            return
        made = settings_from_parameters(text, "infotext")
        unet = self.pipe.components.unet
        here = (short_name(dtype_of(unet)), "int8" if is_quantized(unet) else "none")
        if (made.precision, made.quantize) != here:
            def say(precision: str, weights: str) -> str:
                return precision + (" with int8 weights" if weights == "int8" else "")

            flags = f"--dtype {made.precision}" + (" --quantize int8" if made.quantize == "int8" else "")
            raise ApiError(f"infotext: the image was made in {say(made.precision, made.quantize)}, this server "
                           f"computes in {say(*here)}, so the same settings would give another image; start the "
                           f"server with {flags}, or remove {PRECISION_KEY} and {WEIGHTS_KEY} from the infotext to "
                           "accept the difference")

    def generate(self, payload: Any, task: str, cancelled: Cancelled = None) -> dict[str, Any]:
        """A1111's txt2img / img2img: the images (partial ones after /interrupt or /skip), the payload, the info."""
        request = self.validated(self.a1111_request(payload, task))
        result = self.jobs.call(task, lambda cancel: self.answer(payload, task, *self.execute(request, task, cancel)),
                                cancelled)
        if result is None:  # the client left while waiting for its turn
            return {"images": [], "parameters": payload, "info": json.dumps({"interrupted": True})}
        return result

    def submit(self, payload: Any, task: str) -> Job:
        """A1111's txt2img / img2img as a job of the queue (the /jobs routes): checked now, run in turn."""
        request = self.validated(self.a1111_request(payload, task))
        return self.jobs.submit(task, lambda cancel: self.answer(payload, task, *self.execute(request, task, cancel)))

    def a1111_request(self, payload: Any, task: str):
        """The `GenerationRequest` of an A1111 payload (refused by name if it does not fit)."""
        request = request_from_payload(payload, task, settings=self.settings(), limits=self.limits)
        self._check_infotext_precision(payload)
        return request

    def answer(self, payload: Any, task: str, request, results: list, interrupted: bool) -> dict[str, Any]:
        """A1111's answer to a txt2img / img2img payload: images, parameters, info."""
        send = payload.get("send_images", True) is not False
        images = [png_base64(r.image, r.parameters) for r in results] if send else []
        parameters = dict(payload)
        if task == "img2img" and not payload.get("include_init_images"):
            parameters.update(init_images=None, mask=None)  # as A1111: the inputs are not sent back
        return {"images": images, "parameters": parameters, "info": json.dumps(self._info(request, results,
                                                                                          interrupted))}

    def validated(self, request):
        """A `GenerationRequest` checked against the model and the server's limits: its `ValidRequest`."""
        request = request.validate(self.pipe.components.config, self.limits)  # a bad value, or one over a limit
        check_clip_model(request, self.clips)  # a payload names no CLIP file to open
        return request

    def run(self, request, job: str, cancelled: Cancelled = None) -> tuple[Any, list | None, bool]:
        """Validate a `GenerationRequest` and run it as a job of the queue, waiting for it: (the valid request,
        its results or None if `cancelled` before it started, whether it was interrupted). OpenAI's routes
        (server/openai_images.py) run theirs so; `job` names it in /progress."""
        request = self.validated(request)
        ran = self.jobs.call(job, lambda cancel: self.execute(request, job, cancel), cancelled)
        return ran if ran is not None else (request, None, True)

    def execute(self, request, job: str, cancelled: Cancelled = None) -> tuple[Any, list, bool]:
        """Run a valid request now (the queue's worker calls this): (request, results, interrupted)."""
        from ..pipelines.common import Interrupted, progress_total

        components = self.pipe.components
        with self.lock:
            self._interrupt.clear()
            self._skip.clear()
            self.state.update(job=job, job_count=-(-request.n // request.batch_size), job_no=0, sampling_step=0,
                              sampling_steps=request.sampler_steps, interrupted=False, skipped=False,
                              job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"))
            self._live.update(started=time.monotonic(), done=0, total=progress_total(request), latent=None)
            check = self._stop_check(cancelled)

            def on_step(info: dict) -> None:
                batch, step = info["batch_start"] // request.batch_size, info["i"] + 1
                self.state.update(job_no=batch, sampling_step=step)  # a repeated step (clip_repeats) shows again
                self._live.update(done=self._live["done"] + 1, latent=info["denoised"][:1].detach().clone())
                check()

            interrupted = False
            try:
                with checks_inside(components.unet, check):
                    results = self.pipe(request, callback=on_step)
            except Interrupted as e:
                results, interrupted = e.results, True
            finally:
                self.state.update(job="", job_count=0, job_no=0, sampling_step=0, sampling_steps=0, skipped=False)
                self._live.update(latent=None)
            if results:
                self._last = (request, results[-1].seed)
        return request, results, interrupted

    def attention_of_last(self, cancelled: Cancelled = None) -> dict[str, Any]:
        """The DAAM cross-attention maps of the last image made (daguerre.explain.attention): its request again for
        that one image, checked against the server's limits and run in the queue like a generation (interrupted
        the same way), the recorder reading the U-Net's cross-attention on the way; kept until the next image.
        -> {prompt, seed, width, height, image: base64 PNG, words: [{word, overlay: base64 PNG}]}."""
        last = self._last
        if last is None:
            raise ApiError("no image made yet: generate one with txt2img first", HTTPStatus.NOT_FOUND)
        cached = self._attention
        if cached is not None and cached[0] is last:
            return cached[1]
        request, seed = last
        if request.task != "txt2img":
            raise ApiError(f"the last image was made by {request.task}: attention maps are drawn for txt2img images; "
                           "generate one with txt2img", HTTPStatus.CONFLICT)
        one = self.validated(dataclasses.replace(request, n=1, batch_size=1, seed=seed))
        answer = self.jobs.call("attention", lambda cancel: self._attention_answer(one, cancel), cancelled)
        if answer is None:  # the client left while waiting for its turn
            raise ApiError("cancelled before it ran", HTTPStatus.CONFLICT)
        self._attention = (last, answer)
        return answer

    def _attention_answer(self, request, cancelled: Cancelled = None) -> dict[str, Any]:
        """Run `request` (one txt2img image) with the attention recorder now (the queue's worker calls this)."""
        from ..explain.attention import attention_maps, overlay
        from ..pipelines.common import Interrupted

        with self.lock:
            self._interrupt.clear()
            self._skip.clear()
            self.state.update(job="attention", job_count=1, job_no=0, sampling_step=0,
                              sampling_steps=request.sampler_steps, interrupted=False, skipped=False)
            try:
                with checks_inside(self.pipe.components.unet, self._stop_check(cancelled)):
                    result = attention_maps(self.pipe.components, request)[0]
            except Interrupted:
                raise ApiError("the attention maps were interrupted", HTTPStatus.CONFLICT) from None
            finally:
                self.state.update(job="", job_count=0, sampling_steps=0)
        image = result.image
        return {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": image.seed,
                "width": image.image.width, "height": image.image.height,
                "image": png_base64(image.image, image.parameters),
                "words": [{"word": w, "overlay": png_base64(overlay(image.image, m))} for w, m in result.maps.items()]}

    def loras(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras: [{name, alias, path, metadata}] of the server's --lora-dir."""
        from ..lora.syntax import describe_loras

        adapters = self.pipe.components.adapters
        return describe_loras(adapters.lora_dir if adapters is not None else None)

    def embeddings(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings: {loaded: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
        skipped: {...}} of the server's --embeddings-dir (skipped: another text encoder's width)."""
        components = self.pipe.components
        table = components.adapters.embeddings(components) if components.adapters is not None else None
        if table is None:
            return {"loaded": {}, "skipped": {}}
        return {"loaded": {n: e.info() for n, e in table.loaded.items()},
                "skipped": {n: e.info() for n, e in table.skipped.items()}}

    def _info(self, request, results: list, interrupted: bool) -> dict[str, Any]:
        """A1111's `info` (Processed.js()) of a request's results, and whether it was `interrupted`."""
        first = results[0].image if results else None
        seeds = [r.seed for r in results]
        n = len(results)
        return {
            "prompt": request.prompt, "all_prompts": [request.prompt] * n, "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * n, "seed": seeds[0] if seeds else request.seed,
            "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": first.width if first else request.width, "height": first.height if first else request.height,
            "sampler_name": request.sampler,
            "scheduler": request.schedule, "cfg_scale": request.cfg_scale, "steps": request.steps,
            "batch_size": request.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": self.model_name, "sd_model_hash": self.pipe.model_hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request.strength, "eta": request.eta, "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": [r.parameters for r in results], "styles": [],
            "job_timestamp": self.state["job_timestamp"], "clip_skip": request.clip_skip,
            "is_using_inpainting_conditioning": isinstance(conditioner_for(self.pipe.components.config).concat,
                                                           InpaintConcat),
            "interrupted": interrupted,
        }

    def _stop_check(self, cancelled: Cancelled) -> Callable[[], None]:
        """The check run at every step and before every U-Net block: raises `Interrupted` after /interrupt
        or once the client has gone, `SkipBatch` after /skip."""
        from ..pipelines.common import Interrupted, SkipBatch

        asked = [0.0]  # when `cancelled` was last asked

        def check() -> None:
            if self._interrupt.is_set():
                raise Interrupted("interrupted (/sdapi/v1/interrupt)")
            if cancelled is not None and time.monotonic() - asked[0] >= CANCEL_POLL:
                asked[0] = time.monotonic()
                if cancelled():
                    self.state["interrupted"] = True
                    raise Interrupted("the client went away")
            if self._skip.is_set():
                self._skip.clear()
                raise SkipBatch

        return check

    def interrupt(self) -> dict[str, Any]:
        """Stop the running request at its next U-Net block (A1111's /interrupt); it answers with its images
        so far, the current batch's decoded from the model's latest x0 estimate."""
        if self.state["job"]:
            self.state["interrupted"] = True
            self._interrupt.set()
        return {}

    def skip(self) -> None:
        """End the running batch the same way and go on with the next (A1111's /skip; it answers null)."""
        if self.state["job"]:
            self.state["skipped"] = True
            self._skip.set()

    # --- settings and facts -----------------------------------------------------------------------

    def settings(self) -> dict[str, tuple]:
        """The A1111 settings this server reports, each with the values that name its current state (the
        first is the one GET /options shows): they cannot change (one model; per-request settings are fields)."""
        title = self.models()[0]["title"]
        names = (title, self.model_name, self.pipe.model_hash, self.sha256, f"{self.model_name}.safetensors")
        return {"sd_model_checkpoint": tuple(n for n in names if n), "sd_checkpoint_hash": (self.sha256,),
                "samples_format": ("png",), "CLIP_stop_at_last_layers": (1,), "eta_ancestral": (1.0,),
                "eta_ddim": (0.0,), "sd_vae": ("Automatic", "None")}

    def options(self) -> dict[str, Any]:
        """The A1111 settings clients read: the loaded checkpoint, daguerre's fixed output format, the defaults."""
        return {key: values[0] for key, values in self.settings().items()}

    def set_options(self, payload: Any) -> dict[str, Any]:
        """A1111 clients set the checkpoint before generating: accepted when it names the loaded one."""
        if not isinstance(payload, dict):
            raise ApiError(f"options must be a JSON object, got {type(payload).__name__}")
        check_settings(payload, self.settings())
        return {}

    def models(self) -> list[dict[str, Any]]:
        h = self.pipe.model_hash
        title = f"{self.model_name} [{h}]" if h else self.model_name
        return [{"title": title, "model_name": self.model_name, "hash": h, "sha256": self.sha256,
                 "filename": self.file or self.model_name, "config": None}]

    def cmd_flags(self) -> dict[str, Any]:
        """A1111's /cmd-flags, for the flags that describe this server: the model, the API, the device and dtype."""
        device = self._device()
        return {"api": True, "nowebui": False, "ckpt": self.file or self.model_name, "use_cpu": ["all"]
                if device.type == "cpu" else [], "device_id": None if device.index is None else str(device.index),
                "no_half": str(next(self.pipe.components.unet.parameters()).dtype) == "torch.float32",
                "lowvram": False, "medvram": False, "xformers": False, "api_log": True}

    def memory(self) -> dict[str, Any]:
        """A1111's /memory: the machine's RAM (total, available) and this process's resident set, in bytes
        (from /proc); CUDA's when the model is on a CUDA device, else A1111's {"error": "unavailable"}."""
        try:
            with open("/proc/meminfo") as f:
                info = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)}
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            ram: dict[str, Any] = {"free": info["MemAvailable"], "used": rss, "total": info["MemTotal"]}
        except (OSError, KeyError, ValueError, IndexError) as e:  # not Linux
            ram = {"error": f"cannot read /proc: {e}"}
        cuda: dict[str, Any] = {"error": "unavailable"}
        device = self._device()
        if device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device)
            s = torch.cuda.memory_stats(device)
            cuda = {"system": {"free": free, "used": total - free, "total": total},
                    **{k: {"current": s[f"{k}_bytes.all.current"], "peak": s[f"{k}_bytes.all.peak"]}
                       for k in ("active", "allocated", "reserved")},
                    "inactive": {"current": s["inactive_split_bytes.all.current"],
                                 "peak": s["inactive_split_bytes.all.peak"]},
                    "events": {"retries": s["num_alloc_retries"], "oom": s["num_ooms"]}}
        return {"ram": ram, "cuda": cuda}

    def _device(self):
        return next(self.pipe.components.unet.parameters()).device

    def progress_report(self, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's /progress: the fraction done, the seconds left, A1111's state, and (unless skipped) the live
        preview: the model's current x0 estimate of the first image (daguerre.pipelines.preview, `approx`)."""
        state, live, queue = dict(self.state), dict(self._live), self.jobs.counts()
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "queue": queue}
        done = min(live["done"] / live["total"], 1.0) if live["total"] else 0.0
        elapsed = time.monotonic() - live["started"]
        image = None
        if live["latent"] is not None and not skip_current_image:
            from ..pipelines.preview import PreviewDecoder

            if self._preview is None:
                self._preview = PreviewDecoder(self.pipe.components.vae)
            image = png_base64(self._preview.decode(live["latent"])[0])
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0.0, "state": state,
                "current_image": image, "textinfo": None, "queue": queue}


@contextmanager
def checks_inside(unet, check: Callable[[], None]) -> Iterator[None]:
    """Run `check()` before every block of the U-Net (its input blocks, middle block and output blocks) while
    the context lasts, so an exception it raises stops even one long step within a block."""
    blocks = [*getattr(unet, "input_blocks", ()), *([unet.middle_block] if hasattr(unet, "middle_block") else []),
              *getattr(unet, "output_blocks", ())]
    handles = [block.register_forward_pre_hook(lambda _module, _args: check()) for block in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def png_info(payload: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A1111's /png-info: the generation parameters a PNG carries, as text and parsed."""
    if not isinstance(payload, dict) or "image" not in payload:
        raise ApiError('png-info takes {"image": "<base64 PNG>"}')
    image = decode_image(payload["image"], "image", limits)
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
