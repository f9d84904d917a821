"""The HTTP plumbing of `daguerre serve`: a standard-library HTTP server that hands each request to
`Server.handle` (daguerre.server.app), which knows nothing of sockets."""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .app import Server, _json

MAX_BODY_BYTES = 64 * 1024 * 1024  # a few init images of a few megapixels, base64


def make_http_server(server: Server, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A `ThreadingHTTPServer` answering with `server.handle` (port 0 picks a free port)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "daguerre"

        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                status, ctype, body = _json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                            {"detail": f"request body of {length} bytes is over the "
                                                       f"{MAX_BODY_BYTES} byte limit"})
                self.close_connection = True
            else:
                status, ctype, body = server.handle(method, self.path, self.rfile.read(length) if length else b"")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:  # one line per request, on stderr
            import sys

            print(f"{self.address_string()} {format % args}", file=sys.stderr)

    return ThreadingHTTPServer((host, port), Handler)

