"""`daguerre serve`'s jobs (daguerre.server.jobs): one worker, a bounded queue (full: 503 with Retry-After, for the
blocking routes, OpenAI's and the job routes alike), the asynchronous routes (submit, status, result, cancel) and
the queue's counts in /sdapi/v1/progress. Over real sockets on 127.0.0.1, with random:tiny held still at a step."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

import daguerre
from conftest import serving
from daguerre.server.app import Server
from daguerre.server.jobs import Jobs, QueueFull


class Held:
    """random:tiny's pipeline, held at its first sampler step until `release` is set; `runs` counts requests."""

    def __init__(self):
        self.pipe = daguerre.load("random:tiny")
        self.components, self.model_hash, self.request = self.pipe.components, None, self.pipe.request
        self.limits = self.pipe.limits
        self.reached, self.release, self.runs = threading.Event(), threading.Event(), 0

    def __call__(self, request, callback):
        self.runs += 1

        def on_step(info):
            callback(info)
            if info["i"] == 0:
                self.reached.set()
                self.release.wait(60)

        return self.pipe(request, callback=on_step)


def call(base: str, method: str, path: str, payload=None) -> tuple[int, Any, dict]:
    """(status, headers, JSON answer) of one request."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def wait_for(check, seconds=60.0):
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail("timed out")


SMALL = {"prompt": "x", "steps": 2, "seed": 1}


def test_jobs_run_in_order_one_at_a_time_and_a_full_queue_refuses():
    jobs, order, gate = Jobs(size=2), [], threading.Event()

    def work(name):
        def run(cancelled):
            order.append(f"start {name}")
            gate.wait(10)
            order.append(f"end {name}")
            return name
        return run

    first = jobs.submit("a", work("a"))
    wait_for(lambda: first.status == "running")
    second, third = jobs.submit("b", work("b")), jobs.submit("c", work("c"))
    with pytest.raises(QueueFull, match=r"queue is full \(2 jobs waiting") as e:
        jobs.submit("d", work("d"))
    assert e.value.status == 503
    assert jobs.counts() == {"running": 1, "queued": 2, "queue_size": 2}
    assert jobs.get(third.id)[1] == 1  # one job ahead of it in the queue
    jobs.cancel(second.id)
    gate.set()
    assert third.done.wait(10) and second.done.is_set()
    assert order == ["start a", "end a", "start c", "end c"]  # b, cancelled while queued, never ran
    assert (first.status, second.status, third.status) == ("done", "cancelled", "done") and third.result == "c"
    with pytest.raises(ValueError, match="--queue-size must be at least 1"):
        Jobs(0)


def test_submit_status_result_over_http_and_the_queue_in_progress():
    held = Held()
    server = Server(held, "random:tiny", queue_size=1)
    with serving(server) as port:
        base = f"http://127.0.0.1:{port}"
        status, headers, first = call(base, "POST", "/jobs/txt2img", SMALL)
        assert status == 202 and first["status"] in ("queued", "running") and headers["Location"].endswith(first["id"])
        assert held.reached.wait(60)
        status, _, second = call(base, "POST", "/jobs/txt2img", {**SMALL, "seed": 2})
        assert status == 202 and second["status"] == "queued" and second["queued_ahead"] == 0
        progress = call(base, "GET", "/sdapi/v1/progress?skip_current_image=true")[2]
        assert progress["queue"] == {"running": 1, "queued": 1, "queue_size": 1}
        assert progress["state"]["job"] == "txt2img"
        # the queue is full: blocking routes, OpenAI's and the job routes answer 503 with Retry-After
        for path, payload in (("/sdapi/v1/txt2img", SMALL), ("/jobs/txt2img", SMALL),
                              ("/v1/images/generations", {"prompt": "x"})):
            status, headers, out = call(base, "POST", path, payload)
            assert status == 503 and int(headers["Retry-After"]) > 0 and "queue is full" in json.dumps(out), path
        status, _, running = call(base, "GET", f"/jobs/{first['id']}")
        assert running["status"] == "running" and running["progress"]["state"]["sampling_step"] == 1
        assert call(base, "GET", f"/jobs/{second['id']}/result")[0] == 202  # not yet
        held.release.set()
        wait_for(lambda: call(base, "GET", f"/jobs/{second['id']}")[2]["status"] == "done")
        status, _, out = call(base, "GET", f"/jobs/{second['id']}/result")
        assert status == 200 and len(out["images"]) == 1 and json.loads(out["info"])["all_seeds"] == [2]
        listed = call(base, "GET", "/jobs")[2]
        assert [j["id"] for j in listed["jobs"]] == [first["id"], second["id"]] and listed["queued"] == 0
        assert held.runs == 2  # the refused requests ran nothing
        idle = call(base, "GET", "/sdapi/v1/progress")[2]
        assert idle["queue"] == {"running": 0, "queued": 0, "queue_size": 1} and idle["state"]["job_count"] == 0


def test_cancel_a_running_job_keeps_its_images_so_far_and_a_queued_one_never_runs():
    held = Held()
    server = Server(held, "random:tiny")
    with serving(server) as port:
        base = f"http://127.0.0.1:{port}"
        running = call(base, "POST", "/jobs/txt2img", {"prompt": "x", "steps": 50, "seed": 1})[2]
        assert held.reached.wait(60)
        queued = call(base, "POST", "/jobs/txt2img", SMALL)[2]
        assert call(base, "POST", f"/jobs/{queued['id']}/cancel")[2]["status"] == "cancelled"
        assert call(base, "POST", f"/jobs/{running['id']}/cancel")[0] == 200
        held.release.set()
        wait_for(lambda: call(base, "GET", f"/jobs/{running['id']}")[2]["status"] == "cancelled")
        status, _, out = call(base, "GET", f"/jobs/{running['id']}/result")
        info = json.loads(out["info"])
        assert status == 200 and info["interrupted"] and len(out["images"]) == 1  # the x0 estimate at its step
        status, _, out = call(base, "GET", f"/jobs/{queued['id']}/result")
        assert status == 409 and "cancelled before it ran" in out["detail"] and held.runs == 1
        assert call(base, "GET", "/jobs/nope")[0] == 404
        assert call(base, "POST", "/jobs/nope/cancel")[0] == 404


def test_a_bad_job_is_refused_at_submit_and_a_failing_one_reports_its_error(monkeypatch):
    server = Server(daguerre.load("random:tiny"), "random:tiny")
    with serving(server) as port:
        base = f"http://127.0.0.1:{port}"
        status, _, out = call(base, "POST", "/jobs/txt2img", {"prompt": "x", "steps": "many"})
        assert status == 422 and "steps" in out["detail"]
        status, _, out = call(base, "POST", "/jobs/img2img", {"prompt": "x", "init_images": ["%%"]})
        assert status == 422 and "base64" in out["detail"]
        monkeypatch.setattr(server, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        job = call(base, "POST", "/jobs/txt2img", SMALL)[2]
        wait_for(lambda: call(base, "GET", f"/jobs/{job['id']}")[2]["status"] == "failed")
        status, _, out = call(base, "GET", f"/jobs/{job['id']}/result")
        assert status == 500 and "boom" in out["detail"]
        assert "RuntimeError: boom" in call(base, "GET", f"/jobs/{job['id']}")[2]["error"]
        monkeypatch.undo()
        status, _, out = call(base, "POST", "/sdapi/v1/txt2img", SMALL)  # the worker goes on
        assert status == 200 and len(out["images"]) == 1


def test_kept_results_are_bounded_in_count_and_bytes(monkeypatch):
    import daguerre.server.jobs as jobs_module

    monkeypatch.setattr(jobs_module, "KEEP", 3)
    monkeypatch.setattr(jobs_module, "KEEP_BYTES", 250)
    jobs = Jobs()
    done = [jobs.submit("t", lambda cancelled, i=i: {"images": ["x" * 100], "n": i}) for i in range(5)]
    assert done[-1].done.wait(10)
    assert list(jobs.finished) == [j.id for j in done[2:]]  # the last 3 jobs
    with pytest.raises(ValueError, match="no job"):
        jobs.get(done[0].id)
    assert done[2].result is None and done[2].error.status == 410 and "dropped" in str(done[2].error)
    assert done[3].result["n"] == 3 and done[4].result["n"] == 4  # 200 bytes: under the bound
    blocking = jobs.call("t", lambda cancelled: {"images": ["y" * 100]})
    assert blocking["images"] == ["y" * 100] and len(jobs.finished) == 3  # a blocking call's result is not kept


def ws_messages(base: str, path: str, count: int, headers=(), host: str | None = None) -> list[dict]:
    """The first `count` JSON messages of the websocket at `path` (a wsproto client over a plain socket);
    raises ConnectionRefusedError with the status if the server refuses the handshake."""
    import socket

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

    name, (host, port) = host, base.removeprefix("http://").split(":")
    ws, got, text = WSConnection(ConnectionType.CLIENT), [], ""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(ws.send(Request(host=name or f"{host}:{port}", target=path, extra_headers=list(headers))))
        while len(got) < count:
            data = s.recv(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    raise ConnectionRefusedError(event.status_code)
                if isinstance(event, CloseConnection):
                    return got
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        got.append(json.loads(text))
                        text = ""
                assert not isinstance(event, AcceptConnection) or not got
            if not data:
                return got
        s.sendall(ws.send(CloseConnection(code=1000)))
    return got


def test_a_websocket_streams_progress_and_previews_and_passes_the_same_guards():
    from daguerre.server.http import Access

    held = Held()
    server = Server(held, "random:tiny")
    with serving(server) as port:
        base = f"http://127.0.0.1:{port}"
        idle = ws_messages(base, "/ws/progress?interval=0.1", 2)
        assert len(idle) == 2 and idle[0]["state"]["job_count"] == 0 and idle[0]["queue"]["running"] == 0
        call(base, "POST", "/jobs/txt2img", {"prompt": "x", "steps": 5, "seed": 1})
        assert held.reached.wait(60)
        running = ws_messages(base, "/ws/progress?interval=0.1", 2)
        assert running[0]["state"]["job"] == "txt2img" and running[0]["state"]["sampling_step"] == 1
        assert running[0]["current_image"] and running[1]["queue"] == {"running": 1, "queued": 0, "queue_size": 16}
        held.release.set()
        with pytest.raises(ConnectionRefusedError, match="403"):  # a web page of another site
            ws_messages(base, "/ws/progress", 1, [("Origin", "http://evil.example")])
        with pytest.raises(ConnectionRefusedError, match="403"):  # DNS rebinding's Host
            ws_messages(base, "/ws/progress", 1, host="evil.example")
    with serving(server, access=Access.from_flags(api_key="sk-12345678")) as port:
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(ConnectionRefusedError, match="403"):
            ws_messages(base, "/ws/progress", 1)
        assert len(ws_messages(base, "/ws/progress", 1, [("Authorization", "Bearer sk-12345678")])) == 1


def test_a_waiting_client_that_leaves_takes_its_job_out_of_the_queue():
    jobs, gate, gone, ran, out = Jobs(), threading.Event(), threading.Event(), [], []
    first = jobs.submit("a", lambda cancelled: gate.wait(10))
    wait_for(lambda: first.status == "running")
    waiter = threading.Thread(target=lambda: out.append(jobs.call("b", lambda c: ran.append(1), gone.is_set)))
    waiter.start()
    wait_for(lambda: jobs.counts()["queued"] == 1)
    gone.set()  # the client leaves while its job waits
    waiter.join(10)
    assert out == [None] and jobs.counts()["queued"] == 0
    gate.set()
    assert first.done.wait(10) and ran == []  # never ran
