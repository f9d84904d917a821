"""`daguerre serve`: the AUTOMATIC1111 web API and a small page over one model (daguerre.server.app)."""

from __future__ import annotations

import argparse
import sys

from ..cli import command
from .generate import add_model_arguments, set_threads


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this computer only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's; 0 picks a free one)")


@command("serve", "serve the AUTOMATIC1111 web API (/sdapi/v1/txt2img, img2img, ...) and a page", _add_arguments)
def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    from ..api import Pipeline, set_compute_dtype
    from ..registry import default_model_name, model_file, open_model
    from ..server.app import Server
    from ..server.http import make_http_server

    spec = args.model or default_model_name()
    comps, model_hash = open_model(spec, device=args.device)
    set_threads(args, comps)
    set_compute_dtype(comps, args.dtype)
    try:
        server = Server(Pipeline(comps, model_hash), comps.config.name or spec, **model_file(spec))
        http = make_http_server(server, args.host, args.port)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    host, port = http.server_address[:2]
    print(f"daguerre serve: {spec} on http://{host}:{port}/ (A1111 API at /sdapi/v1/; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        print("daguerre serve: stopped", file=sys.stderr)
    finally:
        http.server_close()
    return 0
