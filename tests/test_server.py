"""`daguerre serve`: the A1111 web API over a model, through real HTTP and through `Server.handle`."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import daguerre
from daguerre.cli import main
from daguerre.server.app import ApiError, Server, request_from_payload
from daguerre.server.http import make_http_server


@pytest.fixture(scope="module")
def server():
    return Server(daguerre.load("random:tiny"), "random:tiny")


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(server, path, payload):
    status, ctype, body = server.handle("POST", path, json.dumps(payload).encode())
    return status, json.loads(body)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_answers_as_a1111_with_pngs_that_carry_their_parameters(server):
    status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", "negative_prompt": "blue",
                                                      "steps": 3, "seed": 5, "batch_size": 2, "n_iter": 2,
                                                      "sampler_name": "Euler", "scheduler": "Karras",
                                                      "send_images": True, "restore_faces": False})
    assert status == 200, out
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert out["parameters"]["prompt"] == "a red circle"
    image = _image(out["images"][0])
    text = image.info["parameters"]
    assert text == info["infotexts"][0]
    assert text.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler, Schedule type: Karras")
    # the same request through the Python API gives the same pixels
    same = server.pipe("a red circle", negative_prompt="blue", steps=3, seed=5, sampler="Euler", schedule="Karras")
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(same[0].image.convert("RGB")))


def test_seed_minus_one_draws_a_seed_and_reports_it(server):
    status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "seed": -1})
    assert status == 200 and 0 <= json.loads(out["info"])["seed"] < 2**32


def test_img2img_and_inpainting(server):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    base = {"prompt": "x", "steps": 4, "seed": 1, "init_images": [_b64(init)], "denoising_strength": 0.5}
    status, out = _post(server, "/sdapi/v1/img2img", base)
    assert status == 200, out
    assert "Denoising strength: 0.5" in _image(out["images"][0]).info["parameters"]
    status, out = _post(server, "/sdapi/v1/img2img", {**base, "mask": "data:image/png;base64," + _b64(mask),
                                                      "inpainting_fill": 1, "mask_blur": 0})
    assert status == 200, out
    got = np.asarray(_image(out["images"][0]).convert("RGB")).astype(int)
    assert np.abs(got[:, 24:] - [200, 30, 30]).max() < np.abs(got[:, :8] - [200, 30, 30]).max()  # kept vs redrawn


@pytest.mark.parametrize(("path", "payload", "status", "names"), [
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Foo"}, 422, "Foo"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 422, "enable_hr"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "colour": "red"}, 422, "colour"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 0}, 422, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_vae": "x"}}, 422, "sd_vae"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images[0]"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"text").decode()]}, 422, "readable"),
])
def test_bad_requests_get_an_error_that_names_the_value(server, path, payload, status, names):
    got, out = _post(server, path, payload)
    assert got == status and names in out["detail"], out


def test_routes_and_bad_bodies(server):
    assert server.handle("POST", "/sdapi/v1/txt2img", b"{not json")[0] == 400
    assert server.handle("GET", "/sdapi/v1/nothing")[0] == 404
    assert server.handle("GET", "/sdapi/v1/txt2img")[0] == 405
    status, ctype, page = server.handle("GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"/sdapi/v1/txt2img" in page
    names = [s["name"] for s in json.loads(server.handle("GET", "/sdapi/v1/samplers")[2])]
    assert "DPM++ 2M" in names and "Euler a" in names
    labels = [s["label"] for s in json.loads(server.handle("GET", "/sdapi/v1/schedulers")[2])]
    assert labels[0] == "Automatic" and "Karras" in labels
    models = json.loads(server.handle("GET", "/sdapi/v1/sd-models")[2])
    assert models[0]["model_name"] == "random:tiny"
    assert json.loads(server.handle("GET", "/sdapi/v1/progress")[2])["progress"] == 0.0


def test_payload_mapping():
    r = request_from_payload({"prompt": "p", "seed": 3, "batch_size": 2, "n_iter": 3, "sampler_index": "Euler a",
                              "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert (r.seed, r.n, r.batch_size, r.sampler, r.clip_skip) == (3, 6, 2, "Euler a", 2)
    with pytest.raises(ApiError, match="JSON object"):
        request_from_payload([1, 2])
    # a full A1111 default payload: switches off, and the values A1111 reads only under them, are accepted
    r = request_from_payload({"prompt": "p", "enable_hr": False, "hr_scale": 2.0, "denoising_strength": 0.7,
                              "s_noise": 1.0, "s_tmax": None, "subseed": -1, "subseed_strength": 0, "eta": None})
    assert r.strength is None and r.task == "txt2img" and r.eta is None
    for field, value in [("s_noise", 0.5), ("subseed_strength", 0.3), ("tiling", True), ("enable_hr", True),
                         ("firstphase_width", 256), ("styles", ["cinematic"]), ("script_name", "x/y/z plot"),
                         ("alwayson_scripts", {"ControlNet": {"args": []}}), ("refiner_checkpoint", "sdxl_refiner")]:
        with pytest.raises(ApiError, match=f"{field}="):
            request_from_payload({"prompt": "p", field: value})


def test_mask_blur_from_its_x_and_y_parts():
    init = _b64(Image.new("RGB", (32, 32)))
    mask = _b64(Image.new("L", (32, 32), 255))
    base = {"init_images": [init], "mask": mask}
    assert request_from_payload({**base, "mask_blur_x": 2, "mask_blur_y": 2}, "img2img").mask_blur == 2
    assert request_from_payload({**base, "mask_blur": 3, "mask_blur_x": 3, "mask_blur_y": 3}, "img2img").mask_blur == 3
    with pytest.raises(ApiError, match="mask_blur_x / mask_blur_y"):
        request_from_payload({**base, "mask_blur_x": 2, "mask_blur_y": 5}, "img2img")


def test_over_http():
    http = make_http_server(Server(daguerre.load("random:tiny"), "random:tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}/sdapi/v1/txt2img"
        req = urllib.request.Request(url, json.dumps({"prompt": "x", "steps": 2, "seed": 1}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and len(json.load(r)["images"]) == 1
        bad = urllib.request.Request(url, b'{"steps": -1}', {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 422 and "steps" in json.load(e.value)["detail"]
    finally:
        http.shutdown()
        http.server_close()


def test_cli_refuses_a_bad_port_in_one_line(capsys):
    assert main(["serve", "--model", "random:tiny", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "daguerre serve: error: --port must be between 0 and 65535, got 70000"


def test_cli_names_a_port_in_use(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", "random:tiny", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"daguerre serve: error: cannot listen on 127.0.0.1:{port}") and "--port" in err


def test_a_failure_inside_is_a_500_and_the_server_goes_on(server, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server, "pipe", type("P", (), {"request": server.pipe.request, "__call__": broken,
                                                       "components": server.pipe.components, "model_hash": None})())
    status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
    assert status == 500 and out == {"error": "RuntimeError", "detail": "out of memory"}
    assert "RuntimeError: out of memory" in capsys.readouterr().err
    assert server.state["job"] == "" and server.state["job_count"] == 0


class Paused:
    """The real pipeline of random:tiny, held still after sampler step `at` of the batch starting at image
    `batch_start` until `release` is set; `reached` is set when it gets there, and `denoised` holds the
    model's x0 estimate at that step."""

    def __init__(self, at: int, batch_start: int = 0):
        self.pipe = daguerre.load("random:tiny")
        self.components, self.model_hash, self.request = self.pipe.components, None, self.pipe.request
        self.at, self.batch_start, self.reached, self.release = at, batch_start, threading.Event(), threading.Event()
        self.denoised = None

    def __call__(self, request, callback):
        def on_step(info):
            callback(info)
            if (info["batch_start"], info["i"]) == (self.batch_start, self.at):
                self.denoised = info["denoised"].clone()
                self.reached.set()
                self.release.wait(60)
        return self.pipe(request, callback=on_step)


def _run_paused(paused: Paused, payload: dict, during) -> tuple[int, dict]:
    """POST `payload` to txt2img on a server over `paused`; call `during(server)` while it is held; release it."""
    server, answer = Server(paused, "random:tiny"), {}
    body = json.dumps(payload).encode()
    worker = threading.Thread(target=lambda: answer.update(out=server.handle("POST", "/sdapi/v1/txt2img", body)))
    worker.start()
    try:
        assert paused.reached.wait(60)
        during(server)
    finally:
        paused.release.set()
        worker.join(60)
    status, _, raw = answer["out"]
    return status, json.loads(raw)


def test_progress_reports_the_step_and_a_live_preview_while_a_request_runs():
    paused = Paused(at=1)  # after its second step
    reached, release = paused.reached, paused.release
    server = Server(paused, "random:tiny")
    worker = threading.Thread(target=server.handle, args=("POST", "/sdapi/v1/txt2img",
                                                          json.dumps({"prompt": "x", "steps": 4}).encode()))
    worker.start()
    try:
        assert reached.wait(60)
        report = json.loads(server.handle("GET", "/sdapi/v1/progress")[2])
        assert report["progress"] == 0.5 and report["state"]["sampling_step"] == 2 and report["eta_relative"] >= 0
        preview = _image(report["current_image"])
        assert preview.size == (32, 32)  # the model's image size
        skipped = json.loads(server.handle("GET", "/sdapi/v1/progress?skip_current_image=true")[2])
        assert skipped["current_image"] is None and skipped["progress"] == 0.5
    finally:
        release.set()
        worker.join(60)
    idle = json.loads(server.handle("GET", "/sdapi/v1/progress")[2])
    assert idle["progress"] == 0.0 and idle["current_image"] is None


def test_sd_models_names_the_checkpoint_file_and_its_sha256():
    from daguerre.checkpoints.io import file_hash
    from daguerre.registry import model_file, shipped_models

    server = Server(daguerre.load("fashion"), "fashion", **model_file("fashion"))
    (entry,) = json.loads(server.handle("GET", "/sdapi/v1/sd-models")[2])
    path = shipped_models()["fashion"]
    assert entry["filename"] == str(path) and entry["sha256"] == file_hash(path)
    assert entry["hash"] == entry["sha256"][:10] and entry["title"] == f"fashion [{entry['hash']}]"


def test_interrupt_answers_with_the_image_of_the_current_x0_estimate():
    from daguerre.pipelines.common import latents_to_images

    paused = Paused(at=1)
    status, out = _run_paused(paused, {"prompt": "x", "steps": 4, "seed": 3},
                              lambda server: server.handle("POST", "/sdapi/v1/interrupt"))
    info = json.loads(out["info"])
    assert status == 200 and info["interrupted"] is True and len(out["images"]) == 1, info
    # the image is the decoded x0 estimate of the step it stopped at, as A1111 decodes its last latent
    expected = latents_to_images(paused.components, paused.denoised)[0]
    assert np.array_equal(np.asarray(_image(out["images"][0]).convert("RGB")), np.asarray(expected.convert("RGB")))
    assert info["all_seeds"] == [3] and "Steps: 4" in info["infotexts"][0]
    full = paused.pipe("x", steps=4, seed=3)[0].image  # not the finished image
    assert not np.array_equal(np.asarray(full.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_interrupt_keeps_finished_batches_and_the_next_request_runs_whole():
    paused = Paused(at=0, batch_start=1)  # in the second of three batches
    server_seen = {}

    def during(server):
        server.handle("POST", "/sdapi/v1/interrupt")
        server_seen["server"] = server
    status, out = _run_paused(paused, {"prompt": "x", "steps": 3, "seed": 5, "n_iter": 3}, during)
    info = json.loads(out["info"])
    assert status == 200 and info["interrupted"] and info["all_seeds"] == [5, 6], info  # batch 3 never ran
    server = server_seen["server"]
    state = json.loads(server.handle("GET", "/sdapi/v1/progress")[2])["state"]
    assert state["job"] == "" and state["job_count"] == 0 and state["interrupted"] is True
    status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})  # the next request runs whole
    assert status == 200 and len(out["images"]) == 1 and not json.loads(out["info"])["interrupted"]


def test_skip_ends_the_current_batch_and_goes_on_with_the_next():
    paused = Paused(at=0)
    status, out = _run_paused(paused, {"prompt": "x", "steps": 3, "seed": 5, "n_iter": 2},
                              lambda server: server.handle("POST", "/sdapi/v1/skip"))
    info = json.loads(out["info"])
    assert status == 200 and not info["interrupted"] and info["all_seeds"] == [5, 6]
    whole = paused.pipe("x", steps=3, seed=5, n=2)
    got = [np.asarray(_image(b).convert("RGB")) for b in out["images"]]
    assert not np.array_equal(got[0], np.asarray(whole[0].image.convert("RGB")))  # the skipped batch: partial
    assert np.array_equal(got[1], np.asarray(whole[1].image.convert("RGB")))  # the next one: whole


def test_interrupt_stops_within_one_unet_block(server):
    """An interrupt that arrives in the middle of a U-Net forward stops it before the next block."""
    unet, ran = server.pipe.components.unet, []
    hooks = [unet.input_blocks[1].register_forward_pre_hook(lambda *_: server.interrupt()),  # mid-step
             unet.output_blocks[0].register_forward_pre_hook(lambda *_: ran.append(1))]
    try:
        status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 50})
    finally:
        for h in hooks:
            h.remove()
    assert status == 200 and json.loads(out["info"])["interrupted"] and out["images"] == []
    assert ran == []  # the first forward never reached the output blocks
    assert len(unet._forward_pre_hooks) == 0 and len(unet.input_blocks[1]._forward_pre_hooks) == 0  # removed


def test_a_departed_client_stops_its_request(server, monkeypatch):
    import daguerre.server.app as app

    monkeypatch.setattr(app, "CANCEL_POLL", 0.0)  # ask at every check
    unet, calls = server.pipe.components.unet, []
    hook = unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        body = json.dumps({"prompt": "x", "steps": 100, "cfg_scale": 1}).encode()
        status, _, raw = server.handle("POST", "/sdapi/v1/txt2img", body, cancelled=lambda: len(calls) >= 3)
    finally:
        hook.remove()
    assert status == 200 and json.loads(json.loads(raw)["info"])["interrupted"]
    assert len(calls) == 3  # stopped in the third U-Net call, at its first block, not after 100 steps
    gone = server.handle("POST", "/sdapi/v1/txt2img", body, cancelled=lambda: True)  # gone before it began
    assert json.loads(json.loads(gone[2])["info"])["interrupted"] and len(calls) == 3


def test_options_name_the_loaded_model_and_refuse_another(server):
    options = json.loads(server.handle("GET", "/sdapi/v1/options")[2])
    assert options["sd_model_checkpoint"] == "random:tiny"
    assert _post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "random:tiny"}) == (200, {})
    status, out = _post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "sd15.safetensors"})
    assert status == 422 and "one model" in out["detail"] and "--model" in out["detail"]
    status, out = _post(server, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})
    assert status == 422 and "override_settings" in out["detail"]


def test_png_info_reads_back_the_parameters_of_a_generated_image(server):
    status, out = _post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", "negative_prompt": "blue",
                                                      "steps": 2, "seed": 9})
    status, info = _post(server, "/sdapi/v1/png-info", {"image": out["images"][0]})
    assert status == 200 and info["info"] == json.loads(out["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "a red circle" and info["parameters"]["Negative prompt"] == "blue"
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Steps"] == "2"
    plain = _post(server, "/sdapi/v1/png-info", {"image": _b64(Image.new("RGB", (4, 4)))})[1]
    assert plain["info"] == "" and plain["parameters"] == {}
    assert _post(server, "/sdapi/v1/png-info", {})[0] == 422
