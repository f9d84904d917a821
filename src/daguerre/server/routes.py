"""The FastAPI application of `daguerre serve`: every route of the core `Server` (AUTOMATIC1111's
`/sdapi/v1/...`, server/app.py), OpenAI's Images API (server/openai_images.py) and the page, each described
in `/openapi.json` (and browsable at `/docs`) with its request body's schema. server/http.py puts `Guard`
in front of it (who may call, how large a body, how fast) and serves it with uvicorn.

Imported only by `daguerre serve` (FastAPI and uvicorn are the `server` extra). The A1111 routes hand
their body to `Server.handle`, which validates it against the field table (payload.py) and answers a 422
naming the field, as before; OpenAI's bodies are validated by their
pydantic schemas (`ImageGeneration`, `ImageEdit`) with the same kind of message. Model work runs in
worker threads (`threads` at most: one per open connection), one generation at a time (`Server.lock`);
`scope[GONE]` tells a running generation that its client has left.
"""

import asyncio
import contextlib
from typing import Any

import anyio
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from .app import API, Server, _page
from .jobs import RETRY_AFTER, QueueFull
from .openai_images import (
    ImageEdit,
    ImageGeneration,
    edit_images,
    generation_request,
    images_response,
    models,
    parse_fields,
)
from .payload import FIELDS, ApiError, parse_body

GONE = "daguerre.gone"  # ASGI scope key: a threading.Event set once the client has closed its connection (http.Guard)

DESCRIPTION = """daguerre's HTTP API over one loaded model: AUTOMATIC1111's web API (`/sdapi/v1/...`) and
OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`).
See docs/usage.md, "daguerre serve"."""
# what the A1111 routes' POST bodies hold, for /openapi.json (the server checks them against the field table)
BODIES: dict[str, dict[str, Any]] = {
    f"{API}/txt2img": {"type": "object", "properties": {k: {} for k in sorted(FIELDS["txt2img"])},
                       "additionalProperties": False},
    f"{API}/img2img": {"type": "object", "properties": {k: {} for k in sorted(FIELDS["img2img"])},
                       "additionalProperties": False},
    f"{API}/png-info": {"type": "object", "properties": {"image": {"type": "string", "format": "base64"}},
                        "required": ["image"]},
    f"{API}/options": {"type": "object", "description": "A1111 settings: accepted when they change nothing"},
}
SUMMARIES = {
    "txt2img": "text to image", "img2img": "image to image; with a mask, inpainting",
    "png-info": "the generation parameters a PNG carries", "interrupt": "stop the running request",
    "skip": "end the running batch", "progress": "progress, the live preview and the seconds left",
}


def build_app(server: Server, threads: int = 64) -> FastAPI:
    """The FastAPI application of `server`'s routes; `threads` bounds the worker threads of its handlers."""
    app = FastAPI(title="daguerre", version=__version__, description=DESCRIPTION, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json")
    limiter: list[anyio.CapacityLimiter] = []  # made in the event loop, at the first request

    async def in_thread(fn, *args):
        if not limiter:
            limiter.append(anyio.CapacityLimiter(threads))
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        detail = e.detail
        if e.status_code == 404:
            detail = f"no endpoint {request.url.path}; see /docs (the routes) or docs/usage.md"
        elif e.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": type(e).__name__, "detail": detail}, e.status_code, headers=e.headers)

    def a1111(method: str, path: str):
        async def endpoint(request: Request) -> Response:
            body = await request.body() if method == "POST" else b""
            target = path + (f"?{request.url.query}" if request.url.query else "")
            gone = request.scope.get(GONE)
            status, ctype, out = await in_thread(server.handle, method, target, body, gone.is_set if gone else None)
            busy = {"Retry-After": str(RETRY_AFTER)} if status == 503 else None  # the queue is full
            return Response(out, status_code=int(status), media_type=ctype, headers=busy)

        return endpoint

    for method, path in server.routes:
        name = path.rsplit("/", 1)[-1]
        extra = None
        if method == "POST" and path in BODIES:
            extra = {"requestBody": {"content": {"application/json": {"schema": BODIES[path]}}}}
        app.add_api_route(path, a1111(method, path), methods=[method], tags=["AUTOMATIC1111"],
                          summary=SUMMARIES.get(name, name), name=f"{method.lower()}_{name}", openapi_extra=extra)

    @app.get("/", response_class=HTMLResponse, tags=["page"], summary="the page")
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    # --- OpenAI's Images API ----------------------------------------------------------------------

    def openai_error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}, "detail": message}, int(status))

    async def run(request: Request, fields: ImageGeneration, make) -> JSONResponse:
        """Build the request (`make()`), validate and run it in a worker thread; OpenAI's answer or error."""
        gone = request.scope.get(GONE)

        def work():
            generation = make()
            return server.run(generation, "openai", gone.is_set if gone else None)

        try:
            _, results, _ = await in_thread(work)
        except QueueFull as e:
            response = openai_error(e.status, str(e))
            response.headers["Retry-After"] = str(RETRY_AFTER)
            return response
        except ApiError as e:
            return openai_error(e.status, str(e))
        except (ValueError, FileNotFoundError) as e:  # validate() (LimitError too) and the pipeline's checks
            return openai_error(422, str(e))
        except Exception as e:  # a bug, not the request: the client hears of it, the server keeps serving
            import traceback

            traceback.print_exc()
            return JSONResponse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}, 500)
        return JSONResponse(images_response(results or [], fields))

    generation_schema = ImageGeneration.model_json_schema()

    @app.post("/v1/images/generations", tags=["OpenAI"], summary="text to image (OpenAI's images.generate)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": generation_schema}}}})
    async def generations(request: Request) -> JSONResponse:
        try:
            payload = parse_body(await request.body())
            if not isinstance(payload, dict):
                raise ApiError(f"the request body must be a JSON object, got {type(payload).__name__}")
            fields = parse_fields(payload, ImageGeneration)
            generation_request(fields)  # the fields' own checks, before waiting for a worker
        except ApiError as e:
            return openai_error(e.status, str(e))
        return await run(request, fields, lambda: generation_request(fields))

    edit_schema = ImageEdit.model_json_schema()
    edit_schema["properties"] = {"image": {"type": "string", "format": "binary", "description": "the image (PNG)"},
                                 "mask": {"type": "string", "format": "binary", "description": "a PNG of the "
                                          "image's size whose fully transparent pixels are repainted"},
                                 **edit_schema["properties"]}
    edit_schema["required"] = ["image", "prompt"]

    @app.post("/v1/images/edits", tags=["OpenAI"], summary="inpainting (OpenAI's images.edit)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"multipart/form-data": {"schema": edit_schema}}}})
    async def edits(request: Request) -> JSONResponse:
        files: dict[str, bytes] = {}
        values: dict[str, str] = {}
        try:
            if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                raise ApiError("images.edit takes multipart/form-data (the image and mask as files)", 415)
            form = await request.form()
            for key, value in form.multi_items():
                name = "image" if key == "image[]" else key
                if isinstance(value, UploadFile):
                    if name not in ("image", "mask"):
                        raise ApiError(f"unknown file field {key!r}; files: image, mask")
                    if name in files:
                        raise ApiError(f"one {name} per edit, got more")
                    files[name] = await value.read()
                elif name in ("image", "mask"):
                    raise ApiError(f"{name} must be sent as a file (multipart), not as text")
                elif name in values:
                    raise ApiError(f"field {name!r} is sent twice")
                else:
                    values[name] = value
            if "image" not in files:
                raise ApiError("image is required: the picture to edit, as a PNG file")
            fields = parse_fields(values, ImageEdit)
            generation_request(fields, "inpaint")  # the fields' own checks, before decoding any image
        except ApiError as e:
            return openai_error(e.status, str(e))

        def make():
            return generation_request(fields, "inpaint", **edit_images(files["image"], files.get("mask"),
                                                                         server.limits))

        return await run(request, fields, make)

    @app.get("/v1/models", tags=["OpenAI"], summary="the loaded model (OpenAI's models.list)")
    async def model_list() -> dict[str, Any]:
        return models(server.model_name)

    @app.get("/v1/models/{model_id:path}", tags=["OpenAI"], summary="the loaded model (OpenAI's models.retrieve)")
    async def model_get(model_id: str) -> dict[str, Any]:
        return models(server.model_name)["data"][0]

    # --- progress as a stream ----------------------------------------------------------------------------

    @app.websocket("/ws/progress")
    async def progress_stream(socket: WebSocket, interval: float = 0.5, skip_current_image: bool = False) -> None:
        """/sdapi/v1/progress's answer (the live preview included) every `interval` seconds (0.1 to 10) while
        the socket is open; a message from the client asks for one at once."""
        await socket.accept()
        interval = min(max(interval, 0.1), 10.0)
        try:
            while True:
                report = await in_thread(server.progress_report, skip_current_image)
                await socket.send_json(report)
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    if (await asyncio.wait_for(socket.receive(), interval))["type"] == "websocket.disconnect":
                        return
        except (WebSocketDisconnect, RuntimeError):  # the client has gone
            return

    # --- jobs: submit, status, result, cancel ------------------------------------------------------------

    def job_error(e: Exception) -> JSONResponse:
        status = e.status if isinstance(e, ApiError) else 422
        headers = {"Retry-After": str(RETRY_AFTER)} if isinstance(e, QueueFull) else None
        return JSONResponse({"error": type(e).__name__, "detail": str(e)}, int(status), headers=headers)

    def add_submit(task: str) -> None:
        async def submit(request: Request) -> JSONResponse:
            body = await request.body()
            try:
                job = await in_thread(lambda: server.submit(parse_body(body), task))
            except (ValueError, FileNotFoundError) as e:  # ApiError, LimitError and validate()'s
                return job_error(e)
            job, ahead = server.jobs.get(job.id)
            return JSONResponse(job.describe(ahead), 202, headers={"Location": f"/jobs/{job.id}"})

        app.add_api_route(f"/jobs/{task}", submit, methods=["POST"], tags=["jobs"], name=f"submit_{task}",
                          summary=f"queue an A1111 {task} payload; answers 202 with the job's id at once",
                          openapi_extra={"requestBody": {"content": {"application/json": {
                              "schema": BODIES[f"{API}/{task}"]}}}})

    for task in ("txt2img", "img2img"):
        add_submit(task)

    @app.get("/jobs", tags=["jobs"], summary="every job known: the finished ones kept, the running one, the queue")
    async def job_list() -> dict[str, Any]:
        return {"jobs": server.jobs.list(), **server.jobs.counts()}

    @app.get("/jobs/{job_id}", tags=["jobs"], summary="a job's status (queued, running, done, failed, cancelled)")
    async def job_status(job_id: str) -> JSONResponse:
        try:
            job, ahead = server.jobs.get(job_id)
        except ApiError as e:
            return job_error(e)
        out = job.describe(ahead)
        if job.status == "running":
            out["progress"] = await in_thread(server.progress_report, True)
        return JSONResponse(out)

    @app.get("/jobs/{job_id}/result", tags=["jobs"],
             summary="a finished job's answer, as its blocking route gives it (202 while it waits or runs)")
    async def job_result(job_id: str) -> JSONResponse:
        try:
            job, ahead = server.jobs.get(job_id)
        except ApiError as e:
            return job_error(e)
        if not job.done.is_set():
            return JSONResponse(job.describe(ahead), 202)
        if job.error is not None:
            return job_error(job.error if isinstance(job.error, ValueError) else ApiError(str(job.error), 500))
        if job.result is None:
            return JSONResponse({"error": "Cancelled", "detail": f"job {job.id} was cancelled before it ran"}, 409)
        return JSONResponse(job.result)

    @app.post("/jobs/{job_id}/cancel", tags=["jobs"],
              summary="cancel a job: taken out of the queue, or stopped within a U-Net block (its result: the images "
              "so far)")
    async def job_cancel(job_id: str) -> JSONResponse:
        try:
            return JSONResponse(server.jobs.cancel(job_id).describe())
        except ApiError as e:
            return job_error(e)

    return app
