"""`daguerre serve` under load on loopback (issue 21): C concurrent clients x R txt2img requests each on the tiny
model, while one client holds a connection open sending nothing and another sends half a request head.

The server runs in its own process (`daguerre serve --model random:tiny`, default flags but --port), so its
resident set (VmRSS, sampled every 0.1 s from /proc) is its own. Each client keeps one HTTP/1.1 connection
(keep-alive) and sends its requests one after another; a 503 (the queue full: the documented answer, with
Retry-After) is counted and retried after the time it names; anything else that is not a 200 is a failure.
Reported: failures, 503s, p50/p95/max latency of the answered requests (queueing included), requests/s,
the server's RSS after the warm-up, its peak, and at the end; and the latency of GET /sdapi/v1/progress
with the stalled clients connected (it must not wait for them). Bounded: --clients x --requests requests,
--deadline seconds in all.

    python bench/server_load.py                       # 32 clients x 4 requests, 4 steps at 32x32
    python bench/server_load.py --clients 8 --requests 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/sdapi/v1/progress")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start in time")


def client(port: int, requests: int, body: bytes, out: dict, deadline: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    done = 0
    while done < requests and time.monotonic() < deadline:
        t = time.monotonic()
        try:
            conn.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
        except OSError as e:
            out["failures"].append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            done += 1
            continue
        if response.status == 503:
            out["busy"] += 1
            time.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        if response.status != 200:
            out["failures"].append(f"status {response.status}")
        else:
            out["latency"].append(time.monotonic() - t)
        done += 1
    conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    start = time.monotonic()
    deadline = start + args.deadline
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen([sys.executable, "-m", "daguerre", "serve", "--model", "random:tiny", "--port",
                               str(port)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, start + 120)
        body = json.dumps({"prompt": "a red circle", "steps": args.steps, "width": args.size,
                           "height": args.size, "seed": -1}).encode()
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        warm.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
        assert warm.getresponse().read()
        warm.close()
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(rss(server.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(0.3)
        stalled = socket.create_connection(("127.0.0.1", port))  # says nothing
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())  # half a head
        probe = []
        for _ in range(5):
            t = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/sdapi/v1/progress?skip_current_image=true")
            conn.getresponse().read()
            conn.close()
            probe.append(time.monotonic() - t)
        out = {"latency": [], "busy": 0, "failures": []}
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(port, args.requests, body, out, deadline))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        stalled.close()
        half.close()
    finally:
        server.terminate()
        server.wait(30)
    lat = sorted(out["latency"])
    quarter = max(1, len(samples) // 4)
    result = {
        "clients": args.clients, "requests": args.requests, "answered": len(lat), "failures": len(out["failures"]),
        "failure_kinds": sorted(set(out["failures"]))[:5], "busy_503": out["busy"],
        "p50_s": statistics.median(lat) if lat else None,
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None, "max_s": lat[-1] if lat else None,
        "requests_per_s": len(lat) / elapsed, "wall_s": elapsed,
        "progress_probe_max_s": max(probe),
        "rss_start_mb": samples[0] / 2**20, "rss_first_quarter_peak_mb": max(samples[:quarter]) / 2**20,
        "rss_last_quarter_peak_mb": max(samples[-quarter:]) / 2**20, "rss_peak_mb": max(samples) / 2**20,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if not out["failures"] and len(lat) == args.clients * args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
