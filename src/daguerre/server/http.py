"""The HTTP plumbing of `daguerre serve`: a standard-library HTTP server that hands each request to
`Server.handle` (daguerre.server.app), which knows nothing of sockets.

It is what stands between the model and the network, so it refuses, before any work:
- a `Host` that is not a name of the bound address (DNS rebinding: a web page whose name resolves to
  127.0.0.1 must not read the answers); any name when listening on every interface;
- an `Origin` (sent by browsers) that is neither this server's own nor allowed by `Access` (any web
  page could otherwise drive the server: a cross-site `text/plain` POST needs no preflight);
- a body that is not sent as `application/json` (a form or `text/plain` POST is how such a page does it);
- without the credentials of `Access.credentials` (`--api-auth`), everything but a CORS preflight;
- a body with no valid length, or over `MAX_BODY_BYTES`, or chunked.
Connections are bounded: at most `max_connections` threads (over that, a quick 503), each request's
head (and the idle wait before it) within `timeout` seconds, its body at `MIN_RATE` bytes/s or faster.
A client that closes its connection while its request runs stops that request (`cancelled`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import json
import math
import re
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .app import Server, _json

MAX_BODY_BYTES = 64 * 1024 * 1024  # a few init images of a few megapixels, base64
MAX_CONNECTIONS = 64  # connection threads; a browser keeps about 6 per server
TIMEOUT = 30.0  # seconds for the idle wait and the head of a request, and the slack of a body or answer
MIN_RATE = 64 * 1024  # bytes/s a body or an answer must at least move at (64 MB: about 17 minutes)
BACKLOG = 128  # connections the kernel queues before the server accepts them
LINGER = 2.0  # seconds a turned-away connection is kept half-open, so that the client reads its 503
ALL_INTERFACES = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
METHODS = "GET, POST, OPTIONS"


@dataclass(frozen=True)
class Access:
    """Who may use the server besides its own page: the origins of other web pages allowed to call it
    (`--cors-allow-origins`, `--cors-allow-origins-regex`, as in AUTOMATIC1111), and the credentials HTTP
    Basic authentication asks for on every route (`--api-auth`), kept as SHA-256 digests of `user:password`.
    Make one with `Access.from_flags`, which checks the flags."""

    cors_origins: frozenset[str] = frozenset()
    cors_regex: re.Pattern | None = None
    credentials: tuple[bytes, ...] = ()

    @classmethod
    def from_flags(cls, cors_allow_origins: str | None = None, cors_allow_origins_regex: str | None = None,
                   api_auth: str | None = None) -> Access:
        """The access of the flags' values (None: not given); a bad value raises a ValueError naming it."""
        origins = set()
        for origin in (cors_allow_origins or "").split(","):
            origin = origin.strip().rstrip("/").lower()
            if not origin:
                continue
            if not re.fullmatch(r"https?://[^/\s?#]+|null", origin):
                raise ValueError(f"--cors-allow-origins: {origin!r} is not an origin; give scheme://host[:port] "
                                 "as a browser sends it, e.g. http://localhost:3000 (comma-separated)")
            origins.add(origin)
        regex = None
        if cors_allow_origins_regex:
            try:
                regex = re.compile(cors_allow_origins_regex)
            except re.error as e:
                raise ValueError(f"--cors-allow-origins-regex {cors_allow_origins_regex!r} is not a regular "
                                 f"expression ({e})") from None
        credentials = []
        entries = (api_auth or "").split(",") if api_auth is not None else []
        for i, entry in enumerate(entries, 1):
            user, colon, password = entry.partition(":")
            if not colon or not user or not password:  # the entry is not echoed: it may hold a password
                raise ValueError(f"--api-auth: credential {i} of {len(entries)} is not user:password; give "
                                 "user:password[,user2:password2]")
            credentials.append(hashlib.sha256(entry.encode("utf-8")).digest())
        return cls(frozenset(origins), regex, tuple(credentials))

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Whether a browser page of `origin` may call this server, reached as `host` (its Host header)."""
        if origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}"):  # our own page
            return True
        return origin.lower() in self.cors_origins or bool(self.cors_regex and self.cors_regex.fullmatch(origin))

    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries one of the credentials (compared in constant time)."""
        if not self.credentials:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = hashlib.sha256(base64.b64decode(token.strip(), validate=True)).digest()
        except (binascii.Error, ValueError):
            return False
        found = False
        for digest in self.credentials:  # every one, so that the time says nothing of which matched
            found |= hmac.compare_digest(given, digest)
        return found


def host_names(host: str, bound: str, port: int) -> frozenset[str] | None:
    """The `Host` header values that name a server bound to address `bound` (asked for as `host`) on
    `port`; None when it listens on every interface, where any name may reach it."""
    host = host.strip("[]").lower()
    if host in ALL_INTERFACES:
        return None
    names = {host, bound.lower()}
    try:
        if ipaddress.ip_address(bound.split("%")[0]).is_loopback:
            names |= set(LOOPBACK_NAMES)
    except ValueError:
        pass
    names = {f"[{n}]" if ":" in n else n for n in names}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


class _Refused(Exception):
    """A request answered with `status` and a JSON `detail` before it reaches `Server.handle`."""

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class _DeadlineReader(io.RawIOBase):
    """The reading side of a connection, which gives up (TimeoutError) once `deadline` (time.monotonic)
    has passed: a time-out on each read alone lets a client send a byte every few seconds forever."""

    def __init__(self, sock: socket.socket):
        self.sock, self.deadline = sock, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _HTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with at most `max_connections` connection threads: a connection over that is
    answered 503 at once by the accepting thread, half-closed, and closed after `LINGER` seconds (closing
    at once, before reading what the client sent, would reset the connection and lose the 503)."""

    request_queue_size = BACKLOG

    def __init__(self, host: str, port: int, handler: type, max_connections: int):
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_connections)
        self.lingering: deque[tuple[float, socket.socket]] = deque()
        super().__init__((host.strip("[]"), port), handler)
        self.host_names = host_names(host, *self.server_address[:2])  # the Host headers it answers

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _turn_away(self, sock: socket.socket) -> None:
        body = json.dumps({"error": "Service Unavailable", "detail": f"the server has {self.max_connections} "
                           "connections open, its limit; try again"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            sock.setblocking(False)
            sock.send(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.lingering.append((time.monotonic() + LINGER, sock))
        while len(self.lingering) > BACKLOG:
            self.lingering.popleft()[1].close()

    def service_actions(self) -> None:
        """Between requests (and every half second): read and drop what turned-away clients sent, and
        close their connections once they have closed theirs or `LINGER` has passed."""
        super().service_actions()
        now, keep = time.monotonic(), deque()
        for deadline, sock in self.lingering:
            try:
                for _ in range(16):
                    if not sock.recv(65536):
                        raise ConnectionAbortedError
            except BlockingIOError:
                if now < deadline:
                    keep.append((deadline, sock))
                    continue
            except OSError:
                pass
            sock.close()
        self.lingering = keep

    def server_close(self) -> None:
        for _, sock in self.lingering:
            sock.close()
        self.lingering.clear()
        super().server_close()


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def make_http_server(server: Server, host: str = "127.0.0.1", port: int = 7860, *, access: Access | None = None,
                     max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT) -> ThreadingHTTPServer:
    """A threading HTTP server answering with `server.handle` on `host`:`port` (port 0 picks a free port;
    `host` "0.0.0.0" or "::" listens on every interface), refusing what `access` does not allow."""
    kind = _HTTPServer6 if ":" in host else _HTTPServer
    return kind(host, port, _handler(server, access or Access(), timeout), max_connections)


def _handler(server: Server, access: Access, timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "daguerre"

        def setup(self) -> None:
            self.timeout = timeout
            super().setup()
            self.rfile.close()
            self.reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader)
            self.gone = False

        def handle_one_request(self) -> None:
            self.reader.deadline = time.monotonic() + timeout  # the idle wait and the request's head
            super().handle_one_request()

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def do_OPTIONS(self) -> None:  # noqa: N802
            self._answer("OPTIONS")

        def _answer(self, method: str) -> None:
            try:
                cors = self._check_caller()
                if method == "OPTIONS":  # a CORS preflight: browsers send no credentials with it
                    if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
                        self.close_connection = True  # its body is not read
                    self._send(HTTPStatus.NO_CONTENT, None, b"", {
                        **cors, "Allow": METHODS, "Access-Control-Allow-Methods": METHODS,
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
                    return
                if not access.authorized(self.headers.get("Authorization")):
                    raise _Refused(HTTPStatus.UNAUTHORIZED, "this server asks for a user name and password "
                                   "(daguerre serve --api-auth)",
                                   {**cors, "WWW-Authenticate": 'Basic realm="daguerre", charset="UTF-8"'})
                body = self._read_body()
            except _Refused as e:
                self.close_connection = True  # the body, if any, is left unread
                status, ctype, out = _json(e.status, {"error": HTTPStatus(e.status).phrase, "detail": e.detail})
                self._send(e.status, ctype, out, {**e.headers, "Connection": "close"})
                return
            if body is None:  # the client went away, or was too slow
                self.close_connection = True
                return
            status, ctype, out = server.handle(method, self.path, body if method == "POST" else b"",
                                               cancelled=self._departed)
            self._send(status, ctype, out, cors)

        def _check_caller(self) -> dict[str, str]:
            """Refuse a wrong Host or a foreign Origin; the CORS headers of an allowed Origin."""
            hosts, origins = self.headers.get_all("Host") or [], self.headers.get_all("Origin") or []
            names = self.server.host_names
            if len(hosts) != 1 or (names is not None and hosts[0].strip().lower() not in names):
                raise _Refused(HTTPStatus.BAD_REQUEST, f"Host {', '.join(hosts) or '(none)'} is not a name of this "
                               f"server; use one of {', '.join(sorted(names or ()))}, or start it with --listen "
                               "to answer to any name")
            if not origins:  # not a browser's cross-origin call (scripts, curl, a page's own GETs)
                return {}
            if len(origins) != 1 or not access.origin_allowed(origins[0].strip(), hosts[0].strip()):
                raise _Refused(HTTPStatus.FORBIDDEN, f"web pages of origin {', '.join(origins)} may not use this "
                               "server; start it with --cors-allow-origins ORIGIN to allow them")
            return {"Access-Control-Allow-Origin": origins[0].strip(), "Access-Control-Allow-Credentials": "true",
                    "Vary": "Origin"}

        def _read_body(self) -> bytes | None:
            """The request's body, after checking its length and type; None if the client did not send it."""
            if "Transfer-Encoding" in self.headers:
                raise _Refused(HTTPStatus.LENGTH_REQUIRED, "chunked (Transfer-Encoding) bodies are not "
                               "taken: send the body with a Content-Length")
            lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ["0"]}
            if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,20}", next(iter(lengths))):
                raise _Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {', '.join(sorted(lengths))} is not "
                               "one whole number of bytes")
            length = int(lengths.pop())
            if length > MAX_BODY_BYTES:
                raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes is over "
                               f"the {MAX_BODY_BYTES} byte limit")
            if length == 0:
                return b""
            ctype = self.headers.get("Content-Type") or ""
            if self.command == "POST" and ctype.split(";")[0].strip().lower() != "application/json":
                raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the request body must be JSON sent with "
                               f"Content-Type: application/json, not {ctype or '(none)'!r}")
            self.reader.deadline = time.monotonic() + timeout + length / MIN_RATE
            try:
                body = self.rfile.read(length)
            except OSError:  # TimeoutError included
                return None
            return body if len(body) == length else None

        def _departed(self) -> bool:
            """Whether the client has closed its connection (a peek reads its end) while its request runs."""
            if not self.gone:
                try:
                    self.gone = _readable(self.connection) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    self.gone = True
            return self.gone

        def _send(self, status: int, ctype: str | None, body: bytes, headers: dict[str, str]) -> None:
            self.connection.settimeout(timeout + len(body) / MIN_RATE)
            self.send_response(status)
            if ctype is not None:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # one line per request, on stderr
            print(f"{self.address_string()} {format % args}", file=sys.stderr)

    return Handler


def _readable(sock: socket.socket) -> bool:
    """Whether a read would not block (data, end of stream or an error is waiting), without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])
