"""`daguerre serve`: the AUTOMATIC1111 web API, OpenAI's images API and a small page over one model
(daguerre.server.app, routes, http)."""

from __future__ import annotations

import argparse
import sys

from ..limits import add_limit_arguments, limits_from_args
from ..server.limits import MAX_BODY_BYTES, MAX_CONNECTIONS, QUEUE_SIZE, TIMEOUT
from .generate import add_adapter_arguments, add_model_arguments, attach_adapters, checked_config, set_threads
from .registry import command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_adapter_arguments(p)
    p.add_argument("--host", default=None,
                   help="address to listen on (default 127.0.0.1, this computer only); see --listen")
    p.add_argument("--listen", action="store_true",
                   help="listen on every interface (0.0.0.0), answering to any host name, as A1111's --listen; "
                   "use with --api-auth")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's; 0 picks a free one)")
    p.add_argument("--api-auth", metavar="USER:PASSWORD[,USER2:PASSWORD2]",
                   help="ask for one of these user names and passwords (HTTP Basic) on every route")
    p.add_argument("--api-key", metavar="KEY",
                   help="ask for this key as 'Authorization: Bearer KEY' (OpenAI's clients' api_key) on every route; "
                   "with --api-auth, either one lets a client in")
    p.add_argument("--cors-allow-origins", "--cors-origin", metavar="ORIGIN[,ORIGIN2]",
                   help="other web pages allowed to call the API, e.g. http://localhost:3000 (comma-separated; "
                   "by default only this server's own page)")
    p.add_argument("--cors-allow-origins-regex", metavar="REGEX",
                   help="other web pages allowed to call the API: origins the whole regular expression matches")
    p.add_argument("--clip", action="append", default=[], metavar="MODEL",
                   help="a CLIP model (path or shipped name) payloads may name as clip_model for CLIP guidance, "
                   "besides the shipped CLIPs; repeat for several (a payload never names a file to open)")
    add_limit_arguments(p)
    g = p.add_argument_group("connections", "bounds of the server's connections (docs/security.md)")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"bytes of one request body (default {MAX_BODY_BYTES}, 64 MB: a few base64 images)")
    g.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"connections open at once; a request on one more is answered 503 (default {MAX_CONNECTIONS})")
    g.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                   help=f"generations waiting at once (the running one aside); one more is answered 503 with "
                   f"Retry-After (default {QUEUE_SIZE})")
    g.add_argument("--timeout", type=float, default=TIMEOUT,
                   help=f"seconds a client may take to send a request's head, and (plus 1 s per 64 KB) its body, "
                   f"before its connection is closed (default {TIMEOUT:g})")


@command("serve", "serve the AUTOMATIC1111 web API (/sdapi/v1/txt2img, img2img, ...), OpenAI's images API "
         "(/v1/images/generations, edits) and a page", _add_arguments)
def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"daguerre serve needs FastAPI and uvicorn ({e.name} is not installed): "
                         "pip install 'daguerre[server]'") from None
    from ..server.http import ALL_INTERFACES, Access, make_http_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    for flag, value in (("--max-body-bytes", args.max_body_bytes), ("--max-connections", args.max_connections),
                        ("--timeout", args.timeout), ("--queue-size", args.queue_size)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.listen and args.host is not None:
        raise ValueError(f"--listen listens on every interface; it cannot go with --host {args.host}")
    host = "0.0.0.0" if args.listen else args.host or "127.0.0.1"
    access = Access.from_flags(args.cors_allow_origins, args.cors_allow_origins_regex, args.api_auth, args.api_key)
    limits = limits_from_args(args)
    from ..api import Pipeline
    from ..registry import default_model_name, model_file, open_model
    from ..server.app import Server

    spec = args.model or default_model_name()
    yaml = checked_config(args.config, spec)
    from ..pipelines.common import open_guide

    for clip in args.clip:
        open_guide(clip, args.device)  # found and readable, before the model is loaded
    comps, model_hash = open_model(spec, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                   compile=args.compile, original_config=yaml, base=args.base)
    set_threads(args, comps)
    attach_adapters(args, comps)  # the folders the prompts' <lora:...> tags and embedding names are found in
    server = Server(Pipeline(comps, model_hash), comps.config.name or spec, limits=limits, clips=tuple(args.clip),
                    queue_size=args.queue_size, **model_file(spec))
    try:
        http = make_http_server(server, host, args.port, access=access, max_connections=args.max_connections,
                                timeout=args.timeout, max_body=args.max_body_bytes)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{args.port} ({e.strerror}); pick another --port") from None
    port = http.server_address[1]
    if host.strip("[]") in ALL_INTERFACES and not (access.credentials or access.keys):
        print("daguerre serve: warning: listening on every interface with no --api-auth or --api-key: anyone who can "
              "reach this computer can use it, and any web page can through DNS rebinding", file=sys.stderr)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    print(f"daguerre serve: {spec} on http://{shown}:{port}/ (A1111 API at /sdapi/v1/, OpenAI's at /v1/, "
          "routes at /docs; Ctrl-C stops)", file=sys.stderr, flush=True)
    if args.verbose:
        from ..precision import describe_run

        print(f"daguerre serve: {describe_run(comps.unet)}", file=sys.stderr, flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        print("daguerre serve: stopped", file=sys.stderr)
    finally:
        http.server_close()
    return 0
