"""The HTTP plumbing of `daguerre serve`: uvicorn (HTTP/1.1, keep-alive) serving the FastAPI application of
server/routes.py, behind `Guard`, an ASGI layer that refuses, before any work:
- a `Host` that is not a name of the bound address (DNS rebinding: a web page whose name resolves to
  127.0.0.1 must not read the answers); any name when listening on every interface;
- an `Origin` (sent by browsers) that is neither this server's own nor allowed by `Access` (any web
  page could otherwise drive the server: a cross-site `text/plain` POST needs no preflight);
- a body that is not sent as `application/json` (a form or `text/plain` POST is how such a page does it),
  but for the routes that take uploads (`MULTIPART_ROUTES`: OpenAI's image edits), which take
  `multipart/form-data` too;
- without the credentials of `Access` (`--api-auth` user:password as HTTP Basic, `--api-key` as
  `Authorization: Bearer`), everything but a CORS preflight;
- a body with no valid length, or over `max_body` bytes (`--max-body-bytes`), or chunked.
Connections are bounded: at most `max_connections` open (one more is answered 503 at once), each
request's head (and the idle wait before it) within `timeout` seconds (`_Protocol`), its body at
`MIN_RATE` bytes/s or faster. An idle connection costs no thread (asyncio). A client that closes its
connection while its request runs stops that request (`GONE`). Websockets (/ws/progress) pass the same
Host, Origin and credential checks; a refused one is closed before it opens (HTTP 403).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .app import Server
from .limits import MAX_BODY_BYTES, MAX_CONNECTIONS, MIN_RATE, TIMEOUT  # noqa: F401 (names of this module before)
from .routes import GONE, build_app

BACKLOG = 128  # connections the kernel queues before the server accepts them
LINGER = 2.0  # seconds a turned-away connection is kept half-open, so that the client reads its 503
ALL_INTERFACES = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
METHODS = "GET, POST, OPTIONS"
MULTIPART_ROUTES = ("/v1/images/edits",)  # routes whose body may be multipart/form-data (file uploads)


@dataclass(frozen=True)
class Access:
    """Who may use the server besides its own page: the origins of other web pages allowed to call it
    (`--cors-allow-origins`, `--cors-allow-origins-regex`, as in AUTOMATIC1111), the credentials HTTP
    Basic authentication asks for on every route (`--api-auth`), kept as SHA-256 digests of `user:password`,
    and the API keys taken as `Authorization: Bearer KEY` (`--api-key`, OpenAI's clients' form), kept as
    digests too. With both, either one lets a client in. Make one with `Access.from_flags`, which checks them."""

    cors_origins: frozenset[str] = frozenset()
    cors_regex: re.Pattern | None = None
    credentials: tuple[bytes, ...] = ()
    keys: tuple[bytes, ...] = ()

    @classmethod
    def from_flags(cls, cors_allow_origins: str | None = None, cors_allow_origins_regex: str | None = None,
                   api_auth: str | None = None, api_key: str | None = None) -> Access:
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
            credentials.append(_digest(entry))
        keys = []
        if api_key is not None:
            if not re.fullmatch(r"[\x21-\x7e]{8,}", api_key):  # the key is not echoed either
                raise ValueError("--api-key: give a key of at least 8 printable characters without spaces")
            keys.append(_digest(api_key))
        return cls(frozenset(origins), regex, tuple(credentials), tuple(keys))

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Whether a browser page of `origin` may call this server, reached as `host` (its Host header)."""
        if origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}"):  # our own page
            return True
        return origin.lower() in self.cors_origins or bool(self.cors_regex and self.cors_regex.fullmatch(origin))

    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries one of the credentials (Basic) or keys (Bearer), compared
        in constant time; True when the server asks for none."""
        if not self.credentials and not self.keys:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "basic" and self.credentials:
            try:
                given = hashlib.sha256(base64.b64decode(token, validate=True)).digest()
            except (binascii.Error, ValueError):
                return False
            return _any_equal(given, self.credentials)
        if scheme.lower() == "bearer" and self.keys and token:
            return _any_equal(_digest(token), self.keys)
        return False

    def challenge(self) -> str:
        """The `WWW-Authenticate` header of a 401."""
        return 'Basic realm="daguerre", charset="UTF-8"' if self.credentials else 'Bearer realm="daguerre"'


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _any_equal(given: bytes, digests: tuple[bytes, ...]) -> bool:
    found = False
    for digest in digests:  # every one, so that the time says nothing of which matched
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
    """A request answered with `status` and a JSON `detail` before it reaches the application."""

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class Guard:
    """The ASGI layer in front of the application (see the module's docstring): checks the caller, reads
    the body whole within its deadline and under `max_body`, hands it on, and watches for the client
    leaving (`scope[GONE]`). `host_names` (from `host_names`) are the Host headers it answers; None: any."""

    def __init__(self, app, access: Access, host_names: frozenset[str] | None, *, max_body: int = MAX_BODY_BYTES,
                 timeout: float = TIMEOUT):
        self.app, self.access, self.host_names = app, access, host_names
        self.max_body, self.timeout = max_body, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan (off under uvicorn here)
            await self.app(scope, receive, send)
            return
        headers: dict[str, list[str]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        if scope["type"] == "websocket":  # browsers apply no CORS to websockets: the Origin check is the guard
            try:
                self._check_caller(headers)
                if not self.access.authorized((headers.get("authorization") or [None])[0]):
                    raise _Refused(HTTPStatus.UNAUTHORIZED, "credentials needed")
            except _Refused:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})  # before accepting: an HTTP 403
                return
            await self.app(scope, receive, send)
            return
        extra: dict[str, str] = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}
        try:
            extra.update(self._check_caller(headers))
            if scope["method"] == "OPTIONS":  # a CORS preflight: browsers send no credentials with it
                await _answer(send, HTTPStatus.NO_CONTENT, None, {
                    **extra, "Allow": METHODS, "Access-Control-Allow-Methods": METHODS,
                    "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600",
                    **({"Connection": "close"} if _has_body(headers) else {})})  # its body is not read
                return
            if not self.access.authorized((headers.get("authorization") or [None])[0]):
                raise _Refused(HTTPStatus.UNAUTHORIZED, "this server asks for a user name and password "
                               "(daguerre serve --api-auth) or an API key (--api-key, sent as Authorization: "
                               "Bearer KEY)", {**extra, "WWW-Authenticate": self.access.challenge()})
            length = self._check_body(scope, headers)
            body = await self._read_body(receive, length)
        except _Refused as e:
            await _answer(send, e.status, {"error": HTTPStatus(e.status).phrase, "detail": e.detail},
                          {**extra, **e.headers, "Connection": "close"})  # the body, if any, is left unread
            return
        if body is None:  # the client went away
            return
        gone, left = threading.Event(), asyncio.Event()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            left.set()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app({**scope, GONE: gone}, replay, send_with_headers)
        finally:
            watcher.cancel()

    def _check_caller(self, headers: dict[str, list[str]]) -> dict[str, str]:
        """Refuse a wrong Host or a foreign Origin; the CORS headers of an allowed Origin."""
        hosts, origins, names = headers.get("host", []), headers.get("origin", []), self.host_names
        if len(hosts) != 1 or (names is not None and hosts[0].strip().lower() not in names):
            raise _Refused(HTTPStatus.BAD_REQUEST, f"Host {', '.join(hosts) or '(none)'} is not a name of this "
                           f"server; use one of {', '.join(sorted(names or ()))}, or start it with --listen "
                           "to answer to any name")
        if not origins:  # not a browser's cross-origin call (scripts, curl, a page's own GETs)
            return {}
        if len(origins) != 1 or not self.access.origin_allowed(origins[0].strip(), hosts[0].strip()):
            raise _Refused(HTTPStatus.FORBIDDEN, f"web pages of origin {', '.join(origins)} may not use this "
                           "server; start it with --cors-allow-origins ORIGIN to allow them")
        return {"Access-Control-Allow-Origin": origins[0].strip(), "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin"}

    def _check_body(self, scope, headers: dict[str, list[str]]) -> int:
        """The body's length, after checking it and its type."""
        if "transfer-encoding" in headers:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "chunked (Transfer-Encoding) bodies are not "
                           "taken: send the body with a Content-Length")
        lengths = {v.strip() for v in headers.get("content-length", ["0"])}
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,20}", next(iter(lengths))):
            raise _Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {', '.join(sorted(lengths))} is not "
                           "one whole number of bytes")
        length = int(lengths.pop())
        if length > self.max_body:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes is over "
                           f"the {self.max_body} byte limit (daguerre serve --max-body-bytes)")
        if length and scope["method"] == "POST":
            ctype = (headers.get("content-type") or [""])[0]
            kind = ctype.split(";")[0].strip().lower()
            uploads = scope["path"].rstrip("/") in MULTIPART_ROUTES
            if kind != "application/json" and not (uploads and kind == "multipart/form-data"):
                allowed = "application/json or multipart/form-data" if uploads else "application/json"
                raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the request body must be sent with Content-Type: "
                               f"{allowed}, not {ctype or '(none)'!r}")
        return length

    async def _read_body(self, receive, length: int) -> bytes | None:
        """The whole body, within `timeout` + length / MIN_RATE seconds; None if the client left."""
        chunks: list[bytes] = []
        deadline = self.timeout + length / MIN_RATE

        async def read() -> bool:
            more = length > 0
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            return True

        try:
            if not await asyncio.wait_for(read(), deadline):
                return None
        except asyncio.TimeoutError:
            got = sum(map(len, chunks))
            raise _Refused(HTTPStatus.REQUEST_TIMEOUT, f"the body came too slowly: {got} of {length} bytes in "
                           f"{deadline:.0f} s") from None
        return b"".join(chunks)


def _has_body(headers: dict[str, list[str]]) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", ["0"])[0].strip() != "0"


async def _answer(send, status: int, obj: Any, headers: dict[str, str]) -> None:
    body = b"" if obj is None else json.dumps(obj).encode("utf-8")
    fields = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if obj is not None:
        fields.append((b"content-type", b"application/json"))
    fields.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": int(status), "headers": fields})
    await send({"type": "http.response.body", "body": body})


def _protocol(timeout: float, max_connections: int):
    """uvicorn's h11 protocol with a deadline on the idle wait and the head of each request: uvicorn's own
    keep-alive time-out restarts at every byte, so a client sending a header line every few seconds (slowloris)
    would hold its connection forever. A connection over `max_connections` is answered 503 at once."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

        turned_away = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._turn_away()
                return
            self._arm()
            self.bad_request = ""
            parse = self.conn.next_event

            def next_event():  # keeps h11's reason for a 400: uvicorn's own answer does not say it
                try:
                    return parse()
                except h11.RemoteProtocolError as e:
                    self.bad_request = str(e)
                    raise

            self.conn.next_event = next_event

        def _turn_away(self) -> None:
            """Answer 503 at once, half-close, and close after `LINGER` seconds (closing at once, before reading
            what the client sent, would reset the connection and lose the 503)."""
            self.turned_away = True
            body = json.dumps({"error": "Service Unavailable", "detail": f"the server has {max_connections} "
                               "connections open, its limit (--max-connections); try again"}).encode()
            self.transport.write(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                                 .encode() + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if not self.turned_away:  # what a turned-away client sends is dropped
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": "Bad Request", "detail": "not a valid HTTP/1.1 request: "
                               f"{self.bad_request or msg}"}).encode()
            head = [(b"content-type", b"application/json"), (b"connection", b"close"),
                    (b"content-length", str(len(body)).encode())]
            for event in (h11.Response(status_code=400, headers=head, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event) -> None:
            self._disarm()  # the websocket protocol takes the connection over, with its own pings
            super().handle_websocket_upgrade(event)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head came in whole
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's head is due within the time-out too
            super().on_response_complete()

    return Protocol


class HTTPServer:
    """uvicorn serving `app` on a socket bound at construction (so `server_address` holds the port that
    port 0 picked), with the `ThreadingHTTPServer` calls the CLI and the tests use: `serve_forever()`
    (Ctrl-C stops it), `shutdown()` from another thread, `server_close()`."""

    def __init__(self, server: Server, host: str, port: int, access: Access, *, max_connections: int,
                 timeout: float, max_body: int):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host.strip("[]"), port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.host_names = host_names(host, *self.server_address[:2])  # the Host headers it answers
        app = Guard(build_app(server, max_connections), access, self.host_names, max_body=max_body, timeout=timeout)
        config = uvicorn.Config(app, http=_protocol(timeout, max_connections), ws="wsproto", lifespan="off",
                                interface="asgi3", timeout_keep_alive=max(1, round(timeout)), server_header=False,
                                log_level="warning", access_log=False, h11_max_incomplete_event_size=64 * 1024,
                                timeout_graceful_shutdown=10)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()
        self._done.set()

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until `shutdown()` or Ctrl-C (`poll_interval`: accepted for `ThreadingHTTPServer`'s callers)."""
        self._done.clear()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def make_http_server(server: Server, host: str = "127.0.0.1", port: int = 7860, *, access: Access | None = None,
                     max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT,
                     max_body: int = MAX_BODY_BYTES) -> HTTPServer:
    """An HTTP server answering with `server`'s routes on `host`:`port` (port 0 picks a free port; `host`
    "0.0.0.0" or "::" listens on every interface), refusing what `access` does not allow."""
    return HTTPServer(server, host, port, access or Access(), max_connections=max_connections, timeout=timeout,
                      max_body=max_body)
