"""The server's attention maps of its last image (GET /daguerre/attention/last, the page's "Attention" panel):
computed on demand for the last image's request, checked against the server's limits, run in the queue like a
generation, behind the same guards. The page's panel in a real browser: tests/test_page_browser.py."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import daguerre
from conftest import serving
from daguerre.explain import attention
from daguerre.server.app import ATTENTION_ROUTE, Server
from daguerre.server.http import Access


def _get(server: Server, path: str = ATTENTION_ROUTE) -> tuple[int, dict]:
    status, _, body = server.handle("GET", path)
    return int(status), json.loads(body)


def _post(server: Server, route: str, payload: dict) -> tuple[int, dict]:
    status, _, body = server.handle("POST", f"/sdapi/v1/{route}", json.dumps(payload).encode())
    return int(status), json.loads(body)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture
def server():
    return Server(daguerre.load("random:tiny", dtype="fp32"), "random:tiny")


def test_the_maps_are_those_of_the_last_image_and_kept(server, monkeypatch):
    status, out = _get(server)
    assert status == 404 and "no image made yet" in out["detail"]
    status, made = _post(server, "txt2img", {"prompt": "a red circle above a blue square", "steps": 2, "seed": 5,
                                             "batch_size": 2})
    assert status == 200 and json.loads(made["info"])["all_seeds"] == [5, 6]
    status, out = _get(server)
    assert status == 200 and out["seed"] == 6 and out["prompt"] == "a red circle above a blue square"
    assert [w["word"] for w in out["words"]] == ["red", "circle", "above", "blue", "square"]
    last = _png(made["images"][1])
    assert list(_png(out["image"]).getdata()) == list(last.getdata())  # the same image, made again
    assert all(_png(w["overlay"]).size == last.size == (out["width"], out["height"]) for w in out["words"])

    def no_more_work(*_args, **_kwargs):
        raise AssertionError("the maps of the same image are computed again")

    monkeypatch.setattr(attention, "attention_maps", no_more_work)
    assert _get(server) == (200, out)  # kept until the next image


def test_an_img2img_or_hires_last_image_is_refused_by_name(server):
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture, format="PNG")
    init = base64.b64encode(picture.getvalue()).decode()
    assert _post(server, "img2img", {"prompt": "x", "steps": 1, "init_images": [init]})[0] == 200
    status, out = _get(server)
    assert status == 409 and "made by img2img" in out["detail"]
    assert _post(server, "txt2img", {"prompt": "x", "steps": 1, "enable_hr": True, "hr_scale": 2})[0] == 200
    status, out = _get(server)
    assert status == 422 and "hires fix" in out["detail"]


def test_behind_api_auth_the_route_needs_the_credentials(server):
    import socket

    access = Access.from_flags(api_auth="ann:secret")
    with serving(server, access=access) as port:
        def status_of(headers: str) -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(f"GET {ATTENTION_ROUTE} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{headers}"
                          "connection: close\r\n\r\n".encode())
                return int(s.recv(64).split(b" ")[1])

        assert status_of("") == 401
        good = base64.b64encode(b"ann:secret").decode()
        assert status_of(f"authorization: Basic {good}\r\n") == 404  # through the guard: no image made yet


def test_a_client_that_leaves_stops_the_maps_and_nothing_is_kept(server):
    assert _post(server, "txt2img", {"prompt": "a red circle", "steps": 2, "seed": 1})[0] == 200
    status, _, body = server.handle("GET", ATTENTION_ROUTE, b"", lambda: True)  # the client has gone
    assert int(status) == 409 and ("cancelled" in json.loads(body)["detail"]
                                   or "interrupted" in json.loads(body)["detail"])
    assert server._attention is None and server.state["job"] == ""
    status, out = _get(server)
    assert status == 200 and out["seed"] == 1
