"""`daguerre serve`'s HTTP layer (daguerre.server.http) over real sockets on 127.0.0.1: who may call it
(Host, Origin, Content-Type, --api-auth), what a body may be, how many connections it holds and for how
long, and that a client who leaves stops its request."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import daguerre
from conftest import serving
from daguerre.cli import main
from daguerre.server.app import Server
from daguerre.server.http import MAX_BODY_BYTES, Access

TXT2IMG = "/sdapi/v1/txt2img"
SMALL = json.dumps({"prompt": "x", "steps": 1, "seed": 1}).encode()


class Counting:
    """random:tiny's pipeline, counting the requests it runs."""

    def __init__(self):
        self.pipe = daguerre.load("random:tiny")
        self.components, self.model_hash, self.request = self.pipe.components, None, self.pipe.request
        self.limits = self.pipe.limits
        self.runs = 0

    def __call__(self, request, callback):
        self.runs += 1
        return self.pipe(request, callback=callback)


@pytest.fixture(scope="module")
def app():
    return Server(Counting(), "random:tiny")


def call(port, method, path, body=b"", headers=(), json_body=True, timeout=60):
    """(status, headers, body) of one request sent byte for byte: `headers` (name, value) pairs are added to
    Host 127.0.0.1:port (value None leaves a header out), Content-Length and, with a body, a JSON type."""
    fields = {"host": f"127.0.0.1:{port}"}
    if body:
        fields["content-length"] = str(len(body))
        if json_body:
            fields["content-type"] = "application/json"
    given = {name.lower() for name, _ in headers}
    pairs = [(k, v) for k, v in fields.items() if k not in given] + [(k, v) for k, v in headers if v is not None]
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in pairs)]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        response = http.client.HTTPResponse(s, method=method)
        response.begin()
        return response.status, response.headers, response.read()


def basic(user_password: str) -> tuple[str, str]:
    return "Authorization", "Basic " + base64.b64encode(user_password.encode()).decode()


# --- 1. who may call it -----------------------------------------------------------------------------------

def test_a_body_must_be_sent_as_json_and_an_empty_post_still_works(app):
    with serving(app) as port:
        runs = app.pipe.runs
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            status, _, out = call(port, "POST", TXT2IMG, SMALL, [("Content-Type", ctype)])
            assert status == 415 and "application/json" in json.loads(out)["detail"], (ctype, out)
        assert app.pipe.runs == runs  # a cross-site text/plain POST ran nothing
        status, _, out = call(port, "POST", TXT2IMG, SMALL, [("Content-Type", "Application/JSON; charset=utf-8")])
        assert status == 200 and len(json.loads(out)["images"]) == 1 and app.pipe.runs == runs + 1
        # webuiapi's /interrupt: a POST with Content-Length 0 and no type
        assert call(port, "POST", "/sdapi/v1/interrupt", headers=[("Content-Length", "0")])[0] == 200
        assert call(port, "POST", "/sdapi/v1/interrupt")[0] == 200  # no Content-Length either


def test_webuiapi_works_and_so_does_its_basic_auth(app):
    webuiapi = pytest.importorskip("webuiapi")
    with serving(app, access=Access.from_flags(api_auth="ann:secret,bob:p:w")) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        assert api.get_samplers()["error"] == "Unauthorized"
        assert api.set_options({"CLIP_stop_at_last_layers": 1})["error"] == "Unauthorized"
        api.set_auth("bob", "p:w")  # a password may hold a colon
        assert "Euler" in [s["name"] for s in api.get_samplers()]
        assert api.set_options({"CLIP_stop_at_last_layers": 1}) == {}  # a JSON POST
        assert len(api.txt2img(prompt="x", steps=1, seed=1, width=32, height=32).images) == 1
        api.interrupt()


def test_host_must_name_the_bound_address(app):
    with serving(app) as port:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            assert call(port, "GET", "/sdapi/v1/options", headers=[("Host", host)])[0] == 200, host
        status, headers, _ = call(port, "GET", "/")
        assert status == 200 and headers["X-Frame-Options"] == "DENY"  # no other site frames the page
        assert headers["X-Content-Type-Options"] == "nosniff"
        for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", "evil.example", None):
            status, _, out = call(port, "POST", TXT2IMG, SMALL, [("Host", host)])  # DNS rebinding's Host
            assert status == 400 and "Host" in json.loads(out)["detail"], host
        status, _, _ = call(port, "GET", "/", headers=[("Host", f"localhost:{port}"), ("Host", "evil.example")])
        assert status == 400
    with serving(app, host="0.0.0.0") as port:  # --listen: any name reaches it
        assert call(port, "GET", "/sdapi/v1/options", headers=[("Host", "my-pc.lan:1234")])[0] == 200


def test_origin_must_be_the_page_itself_or_allowed(app):
    allowed = Access.from_flags("http://localhost:3000, https://Tool.Example/", r"https://.*\.trusted\.example")
    with serving(app, access=allowed) as port:
        runs = app.pipe.runs
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", "https://trusted.example.evil",
                       "https://a.trusted.example.evil.com"):
            for method, path, body in (("POST", TXT2IMG, SMALL), ("GET", "/sdapi/v1/progress", b""),
                                       ("OPTIONS", TXT2IMG, b"")):
                status, headers, _ = call(port, method, path, body, [("Origin", origin)])
                assert status == 403 and "Access-Control-Allow-Origin" not in headers, (origin, method)
        assert app.pipe.runs == runs
        for origin in (f"http://127.0.0.1:{port}", "http://localhost:3000", "https://tool.example",
                       "https://a.trusted.example"):
            status, headers, _ = call(port, "GET", "/sdapi/v1/options", headers=[("Origin", origin)])
            assert status == 200 and headers["Access-Control-Allow-Origin"] == origin, origin
            status, headers, out = call(port, "OPTIONS", TXT2IMG, headers=[
                ("Origin", origin), ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type")])
            assert status == 204 and out == b"" and headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in headers["Access-Control-Allow-Methods"]
            assert "content-type" in headers["Access-Control-Allow-Headers"].lower()
        status, headers, out = call(port, "POST", TXT2IMG, SMALL, [("Origin", "http://localhost:3000")])
        assert status == 200 and len(json.loads(out)["images"]) == 1
    with serving(app) as port:  # by default, no other page
        assert call(port, "GET", "/sdapi/v1/options", headers=[("Origin", "http://localhost:3000")])[0] == 403


def test_api_auth_guards_every_route_but_the_preflight(app):
    access = Access.from_flags(cors_allow_origins="http://localhost:3000", api_auth="ann:secret,bob:hunter2")
    with serving(app, access=access) as port:
        runs = app.pipe.runs
        for path, method, body in (("/", "GET", b""), ("/sdapi/v1/options", "GET", b""), (TXT2IMG, "POST", SMALL),
                                   ("/sdapi/v1/interrupt", "POST", b"")):
            for auth in ([], [basic("ann:wrong")], [basic("ann:secre")], [basic("bob:secret")],
                         [("Authorization", "Basic !!!")], [("Authorization", "Bearer ann:secret")]):
                status, headers, _ = call(port, method, path, body, auth)
                assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), (path, auth)
        assert app.pipe.runs == runs
        assert call(port, "GET", "/", headers=[basic("ann:secret")])[0] == 200
        assert call(port, "GET", "/sdapi/v1/options", headers=[basic("bob:hunter2")])[0] == 200
        status, _, out = call(port, "POST", TXT2IMG, SMALL, [basic("bob:hunter2")])
        assert status == 200 and len(json.loads(out)["images"]) == 1
        preflight = [("Origin", "http://localhost:3000"), ("Access-Control-Request-Method", "POST")]
        assert call(port, "OPTIONS", TXT2IMG, headers=preflight)[0] == 204  # browsers send no credentials
        status, headers, _ = call(port, "GET", "/sdapi/v1/options", headers=preflight[:1])  # readable 401
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_access_flags_are_checked():
    assert Access.from_flags(api_auth="a:b").authorized("Basic " + base64.b64encode(b"a:b").decode())
    assert not Access.from_flags(api_auth="a:b").authorized(None)
    assert Access().authorized(None)  # no --api-auth
    for bad in ("bob", "bob:", ":pw", "a:b,,c:d"):
        with pytest.raises(ValueError, match="--api-auth: credential . of . is not user:password"):
            Access.from_flags(api_auth=bad)
    with pytest.raises(ValueError, match="'localhost:3000' is not an origin"):
        Access.from_flags("localhost:3000")
    with pytest.raises(ValueError, match=r"--cors-allow-origins-regex '\(' is not a regular expression"):
        Access.from_flags(cors_allow_origins_regex="(")


@pytest.mark.parametrize(("argv", "message"), [
    (["--api-auth", "bob"], "--api-auth: credential 1 of 1 is not user:password"),
    (["--api-auth", "ann:x,bob"], "--api-auth: credential 2 of 2 is not user:password"),
    (["--cors-allow-origins-regex", "[a-"], "--cors-allow-origins-regex '[a-' is not a regular expression"),
    (["--cors-allow-origins", "example.com"], "--cors-allow-origins: 'example.com' is not an origin"),
    (["--listen", "--host", "127.0.0.1"], "--listen listens on every interface; it cannot go with --host"),
])
def test_cli_refuses_bad_flags_in_one_line(capsys, argv, message):
    assert main(["serve", "--model", "random:tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"daguerre serve: error: {message}") and err.count("\n") == 1, err
    if argv[0] == "--api-auth":  # a credential is not echoed
        assert argv[1] not in err and "bob" not in err


def test_the_cli_serves_with_its_flags(monkeypatch):
    import daguerre.server.http as server_http

    made, codes, real = [], [], server_http.make_http_server
    monkeypatch.setattr(server_http, "make_http_server", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    argv = ["serve", "--model", "random:tiny", "--port", "0", "--listen", "--max-steps", "5",
            "--api-auth", "ann:pw", "--cors-allow-origins", "http://localhost:3000"]
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    for _ in range(1200):
        if made or not thread.is_alive():
            break
        time.sleep(0.05)
    http = made[0]
    try:
        port = http.server_address[1]
        assert http.server_address[0] == "0.0.0.0"
        status, _, out = call(port, "POST", TXT2IMG, json.dumps({"prompt": "x", "steps": 10}).encode(),
                              [basic("ann:pw"), ("Host", "my-pc.lan")])  # --listen: any name
        assert status == 422 and "--max-steps" in json.loads(out)["detail"]  # the limits reach the Server
        assert call(port, "GET", "/sdapi/v1/options")[0] == 401
        status, headers, _ = call(port, "GET", "/sdapi/v1/options", headers=[basic("ann:pw"),
                                                                            ("Origin", "http://localhost:3000")])
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        http.shutdown()
        thread.join(30)
    assert codes == [0]


# --- 2. what a body may be ------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status"), [
    ([("Content-Length", "-1")], 400),
    ([("Content-Length", "abc")], 400),
    ([("Content-Length", "+5")], 400),
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Content-Length", str(80 * 1024 * 1024))], 413),
    ([("Content-Length", str(MAX_BODY_BYTES + 1))], 413),
    ([("Transfer-Encoding", "chunked")], 411),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 411),
])
def test_a_body_without_a_valid_length_under_the_limit_is_refused(app, headers, status):
    with serving(app) as port:
        got, answer_headers, out = call(port, "POST", TXT2IMG, headers=[("Content-Type", "application/json"),
                                                                        *headers], timeout=10)
        assert got == status and json.loads(out)["detail"], out
        assert answer_headers["Connection"] == "close"  # the unread body is not taken for a next request
        assert call(port, "GET", "/sdapi/v1/options")[0] == 200  # and the server goes on


def test_a_body_sent_in_full_is_read_whole(app):
    big = b'{"prompt": "x",' + b" " * 3_000_000 + b'"steps": 1, "seed": 1}'  # many reads of the socket
    with serving(app) as port:
        status, _, out = call(port, "POST", TXT2IMG, big)
        assert status == 200 and json.loads(out)["parameters"]["steps"] == 1


# --- 3. connections: how many, how long ------------------------------------------------------------------

def test_idle_connections_do_not_grow_the_threads_past_the_bound(app):
    before = threading.active_count()
    with serving(app, max_connections=4) as port:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
        try:
            time.sleep(0.5)
            assert threading.active_count() - before <= 1 + 4  # serve_forever's thread and the bound
            status, headers, out = call(port, "GET", "/sdapi/v1/options", timeout=5)  # over the bound: told so
            assert status == 503 and headers["Retry-After"] and "connections" in json.loads(out)["detail"]
            answered = [s.recv(4096) for s in idle[20:]]  # turned away at once, without having asked
            assert all(a.startswith(b"HTTP/1.1 503") for a in answered)
        finally:
            for s in idle:
                s.close()
        for _ in range(100):  # the slots come back when the idle clients leave
            if call(port, "GET", "/sdapi/v1/options", timeout=5)[0] == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server stayed full after its idle clients left")


def test_16_concurrent_clients_all_get_answers(app):
    with serving(app) as port:
        start, statuses = threading.Barrier(16), []

        def client():
            start.wait(10)
            for _ in range(5):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=30) as r:
                    statuses.append(r.status)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses == [200] * 80


def test_idle_and_slow_clients_are_cut_off(app):
    with serving(app, timeout=1.0) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # says nothing
            t = time.monotonic()
            assert s.recv(1) == b"" and time.monotonic() - t < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # slowloris: a header at a time
            s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
            t = time.monotonic()
            with pytest.raises(OSError):
                while time.monotonic() - t < 5:  # each line well within the time-out, the whole never
                    s.sendall(b"X-Wait: 1\r\n")
                    time.sleep(0.1)
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            raise ConnectionAbortedError("closed by the server")
                    except BlockingIOError:
                        pass
                    s.setblocking(True)
            assert time.monotonic() - t < 4
        # a client that keeps its connection between requests is served again within the time-out
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(3):
            conn.request("GET", "/sdapi/v1/options")
            assert conn.getresponse().read() and conn.sock is not None
            time.sleep(0.3)
        conn.close()


# --- 5. a client that leaves stops its request ----------------------------------------------------------

def test_a_client_that_closes_its_connection_stops_its_request(app):
    long = json.dumps({"prompt": "x", "steps": 1000, "n_iter": 3, "seed": 1}).encode()  # 3 batches of seconds each

    def state():
        return json.loads(call(port, "GET", "/sdapi/v1/progress?skip_current_image=true")[2])["state"]

    with serving(app) as port:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"POST {TXT2IMG} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(long)}\r\n\r\n".encode() + long)
        for _ in range(600):  # until it runs
            running = state()
            if running["job"] and running["sampling_step"] > 0:
                break
            time.sleep(0.02)
        assert running["job"] == "txt2img" and running["job_no"] == 0 and running["job_count"] == 3
        s.close()
        t, seen = time.monotonic(), []
        for _ in range(500):
            seen.append(state())
            if not seen[-1]["job"]:
                break
            time.sleep(0.02)
        assert not seen[-1]["job"] and time.monotonic() - t < 3, seen[-1]  # it stopped
        assert all(st["job_no"] == 0 for st in seen[:-1])  # within its first batch, not at the end of it
        status, _, out = call(port, "POST", TXT2IMG, SMALL)  # and the server is free
        assert status == 200 and len(json.loads(out)["images"]) == 1


# --- in a browser ---------------------------------------------------------------------------------------

ATTACK = """<!doctype html><body><script>
window.results = [];
const body = JSON.stringify({{prompt: "x", steps: 1, seed: 1}});
// a "simple" request, as a form could send it: no preflight, the answer unreadable, but it arrives
fetch("{target}", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}})
  .then(() => results.push("no-cors sent"), () => results.push("no-cors failed"));
fetch("{target}", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}})
  .then(async (r) => results.push("read " + (await r.json()).images.length), () => results.push("cors failed"));
</script></body>"""


@contextlib.contextmanager
def other_site(page: dict):
    """The port of a second web site, on another origin, whose page is `page["html"]` when it is asked."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page["html"].encode())

        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield site.server_address[1]
    finally:
        site.shutdown()
        site.server_close()


@pytest.mark.parametrize("allowed", [False, True])
def test_another_web_site_cannot_drive_the_server_unless_allowed(app, browser, allowed):
    page = {}
    with other_site(page) as site_port:
        access = Access.from_flags(f"http://127.0.0.1:{site_port}" if allowed else None)
        with serving(app, access=access) as port:
            page["html"] = ATTACK.format(target=f"http://127.0.0.1:{port}{TXT2IMG}")
            runs = app.pipe.runs
            tab = browser.new_page()
            tab.goto(f"http://127.0.0.1:{site_port}/")
            tab.wait_for_function("window.results.length == 2", timeout=30000)
            results = sorted(tab.evaluate("window.results"))
            tab.close()
    if allowed:  # the allowed page reads its answer; its text/plain POST is still refused
        assert results == ["no-cors sent", "read 1"] and app.pipe.runs == runs + 1
    else:
        assert results == ["cors failed", "no-cors sent"] and app.pipe.runs == runs


def test_the_page_works_in_a_browser_behind_api_auth(app, browser):
    with serving(app, access=Access.from_flags(api_auth="ann:secret")) as port:
        url = f"http://127.0.0.1:{port}/"
        from playwright.sync_api import Error

        context = browser.new_context()
        with pytest.raises(Error, match="AUTH"):  # headless: refused, no prompt
            context.new_page().goto(url)
        context.close()
        context = browser.new_context(http_credentials={"username": "ann", "password": "secret"})
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        assert tab.goto(url).status == 200
        tab.wait_for_function("document.querySelectorAll('#sampler_name option').length > 10")  # /samplers
        tab.fill("#steps", "2")
        tab.fill("#batch_size", "1")
        tab.click("button[type=submit]")
        tab.wait_for_selector("#images img", timeout=60000)
        assert "Steps: 2" in tab.inner_text("#status") and not errors
        context.close()


# --- 6. bad requests over the wire: a 4xx naming the problem, and the server goes on --------------------------

def _png_b64(size=(32, 32)) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    (TXT2IMG, b'{"prompt": "x", "steps": ', 400, "JSON"),  # malformed JSON
    (TXT2IMG, b"[" * 100_000, 400, "deep"),  # nested past the parser's recursion
    (TXT2IMG, json.dumps({"prompt": "x", "steps": "many"}).encode(), 422, "steps"),  # wrong type
    (TXT2IMG, json.dumps({"prompt": 5}).encode(), 422, "prompt"),
    (TXT2IMG, json.dumps({"prompt": "x", "width": 100_000, "height": 100_000}).encode(), 422, "--max-pixels"),
    (TXT2IMG, json.dumps({"prompt": "x", "n_iter": 1000}).encode(), 422, "--max-images"),
    (TXT2IMG, json.dumps({"prompt": "x", "steps": 100_000}).encode(), 422, "--max-steps"),
    ("/sdapi/v1/img2img", json.dumps({"prompt": "x", "init_images": ["%%% not base64"]}).encode(), 422, "base64"),
    ("/sdapi/v1/img2img", json.dumps({"prompt": "x", "init_images": [base64.b64encode(b"no image").decode()]}).encode(),
     422, "init_images"),
    ("/sdapi/v1/png-info", json.dumps({"image": "!!"}).encode(), 422, "base64"),
    ("/v1/images/generations", b"{nope", 400, "JSON"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "n": "two"}).encode(), 422, "n: "),
    ("/v1/images/generations", json.dumps(["x"]).encode(), 422, "JSON object"),
    ("/v1/images/edits", json.dumps({"prompt": "x"}).encode(), 415, "multipart/form-data"),
    ("/sdapi/v1/nothing", b"", 404, "no endpoint /sdapi/v1/nothing"),
])
def test_bad_requests_over_http_are_named_and_the_server_goes_on(app, path, body, status, says):
    with serving(app) as port:
        got, _, out = call(port, "POST", path, body)
        answer = json.loads(out)
        detail = answer["detail"] if isinstance(answer["detail"], str) else json.dumps(answer)
        assert got == status and says in detail, (got, out[:300])
        good, _, out = call(port, "POST", TXT2IMG, SMALL)
        assert good == 200 and len(json.loads(out)["images"]) == 1


def test_multipart_is_taken_only_where_files_are_uploaded(app):
    with serving(app) as port:
        multipart = [("Content-Type", "multipart/form-data; boundary=x")]
        status, _, out = call(port, "POST", TXT2IMG, b"--x--\r\n", multipart)
        assert status == 415 and "application/json" in json.loads(out)["detail"]
        status, _, out = call(port, "POST", "/v1/images/edits", b"--x\r\nbroken",
                              [("Content-Type", "multipart/form-data; boundary=x")])
        assert status in (400, 422) and json.loads(out)["detail"], out


def test_a_body_that_stalls_is_cut_off_with_a_408(app):
    with serving(app, timeout=1.0) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST {TXT2IMG} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 1000\r\n\r\n{{\"prompt\": ".encode())  # and then nothing
            response = http.client.HTTPResponse(s, method="POST")
            t = time.monotonic()
            response.begin()
            assert response.status == 408 and "too slowly" in json.loads(response.read())["detail"]
            assert time.monotonic() - t < 5
        assert call(port, "POST", TXT2IMG, SMALL)[0] == 200


def test_a_head_growing_past_64_kb_or_not_http_is_a_400(app):
    with serving(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a head that never ends
            s.sendall(f"GET /sdapi/v1/options HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
            with contextlib.suppress(OSError):  # refused part way: the server stops reading
                for _ in range(10):
                    s.sendall(b"X-Big: " + b"a" * 10_000 + b"\r\n")
                    time.sleep(0.05)
            response = http.client.HTTPResponse(s, method="GET")
            response.begin()
            assert response.status == 400
            assert "not a valid HTTP/1.1 request" in json.loads(response.read())["detail"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"HELLO\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 400")
        assert call(port, "GET", "/sdapi/v1/options")[0] == 200


def test_the_cli_takes_the_connection_flags(monkeypatch):
    import daguerre.server.http as server_http

    made, codes, real = [], [], server_http.make_http_server
    monkeypatch.setattr(server_http, "make_http_server", lambda *a, **k: made.append((real(*a, **k), k)) or made[-1][0])
    argv = ["serve", "--model", "random:tiny", "--port", "0", "--max-body-bytes", "100", "--max-connections", "3",
            "--timeout", "7", "--api-key", "sk-12345678", "--cors-origin", "http://localhost:3000"]
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    for _ in range(1200):
        if made or not thread.is_alive():
            break
        time.sleep(0.05)
    http_server, kwargs = made[0]
    try:
        assert (kwargs["max_body"], kwargs["max_connections"], kwargs["timeout"]) == (100, 3, 7.0)
        port = http_server.server_address[1]
        assert http_server.server_address[0] == "127.0.0.1"  # not --listen: this computer only
        key = ("Authorization", "Bearer sk-12345678")
        status, _, out = call(port, "POST", TXT2IMG, b"{" + b" " * 200 + b"}", [key])
        assert status == 413 and "--max-body-bytes" in json.loads(out)["detail"]
        assert call(port, "GET", "/sdapi/v1/options")[0] == 401
        assert call(port, "GET", "/v1/models", headers=[("Authorization", "Bearer sk-12345678")])[0] == 200
        status, headers, _ = call(port, "GET", "/v1/models", headers=[key, ("Origin", "http://localhost:3000")])
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"  # --cors-origin
    finally:
        http_server.shutdown()
        thread.join(30)
    assert codes == [0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-body-bytes", "0"], "--max-body-bytes must be > 0"),
    (["--timeout", "-1"], "--timeout must be > 0"),
    (["--api-key", "short"], "--api-key: give a key of at least 8 printable characters"),
])
def test_cli_refuses_bad_connection_flags_in_one_line(capsys, argv, message):
    assert main(["serve", "--model", "random:tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"daguerre serve: error: {message}") and err.count("\n") == 1, err


def test_serve_without_the_server_extra_says_what_to_install(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install daguerre` without [server]
    assert main(["serve", "--model", "random:tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daguerre serve: error: daguerre serve needs FastAPI and uvicorn (uvicorn is not "
                          "installed): pip install 'daguerre[server]'") and err.count("\n") == 1, err
