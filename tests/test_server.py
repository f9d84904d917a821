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
from conftest import serving
from daguerre.cli import main
from daguerre.server.app import ApiError, Server, request_from_payload


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
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 9}, 422, "hires scale must be in"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_prompt": "y"}, 422, "hr_prompt"),
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
    for field, value in [("s_noise", 0.5), ("subseed_strength", 0.3), ("tiling", True), ("hr_sampler_name", "Euler"),
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
    with serving(Server(daguerre.load("random:tiny"), "random:tiny")) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        req = urllib.request.Request(url, json.dumps({"prompt": "x", "steps": 2, "seed": 1}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and len(json.load(r)["images"]) == 1
        bad = urllib.request.Request(url, b'{"steps": -1}', {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 422 and "steps" in json.load(e.value)["detail"]


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
        self.limits = self.pipe.limits
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
    from daguerre.registry import model_file, shipped_models
    from daguerre.weights.io import file_hash

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


# Every field of A1111's request schemas (modules/api/models.py builds them from the init fields of
# modules/processing.py's StableDiffusionProcessingTxt2Img / ...Img2Img, v1.10) at A1111's defaults
A1111_COMMON = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "force_task_id": None, "infotext": None,
}
A1111_TXT2IMG = {
    **A1111_COMMON, "enable_hr": False, "denoising_strength": 0.75, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "",
}
A1111_IMG2IMG = {
    **A1111_COMMON, "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None,
    "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}


def test_every_a1111_field_at_its_default_is_accepted(server):
    small = {"width": 32, "height": 32, "steps": 2, "sampler_name": "Euler a", "seed": 1}
    status, out = _post(server, "/sdapi/v1/txt2img", {**A1111_TXT2IMG, **small})
    assert status == 200 and len(out["images"]) == 1, out
    init = _b64(Image.new("RGB", (32, 32), (200, 30, 30)))
    status, out = _post(server, "/sdapi/v1/img2img", {**A1111_IMG2IMG, **small, "init_images": [init]})
    assert status == 200 and len(out["images"]) == 1, out
    assert out["parameters"]["init_images"] is None  # A1111 sends the inputs back only with include_init_images
    # what clients send besides the defaults: webuiapi's eta=1.0 and image_cfg_scale=1.5, an override
    # naming the loaded model, the txt2img hires fields while enable_hr is off
    extra = {"eta": 1.0, "image_cfg_scale": 1.5, "override_settings": {"sd_model_checkpoint": "random:tiny"},
             "include_init_images": True}
    status, out = _post(server, "/sdapi/v1/img2img", {**A1111_IMG2IMG, **small, **extra, "init_images": [init]})
    assert status == 200 and out["parameters"]["init_images"] == [init], out
    status, out = _post(server, "/sdapi/v1/txt2img", {**small, "hr_scale": 4, "hr_upscaler": "Latent",
                                                      "firstphase_width": 0, "send_images": False})
    assert status == 200 and out["images"] == [] and json.loads(out["info"])["all_seeds"] == [1]


def test_a_field_of_the_other_task_is_named():
    with pytest.raises(ApiError, match="'mask' for txt2img .it is a field of img2img"):
        request_from_payload({"mask": "x"})


def test_eta_and_the_inpaint_area_reach_the_request():
    init = _b64(Image.new("RGB", (48, 40)))
    mask = _b64(Image.new("L", (48, 40), 255))
    r = request_from_payload({"eta": 0.25, "init_images": [init], "mask": mask, "inpaint_full_res": True,
                              "inpaint_full_res_padding": 8}, "img2img")
    assert (r.eta, r.task, r.inpaint_area, r.inpaint_padding) == (0.25, "inpaint", "only masked", 8)
    r = request_from_payload({"init_images": [init], "mask": mask}, "img2img")  # A1111's schema default: True, 0
    assert (r.inpaint_area, r.inpaint_padding, r.inpaint_fill) == ("only masked", 0, "fill")
    r = request_from_payload({"init_images": [init], "mask": mask, "inpaint_full_res": False}, "img2img")
    assert r.inpaint_area == "whole"
    r = request_from_payload({"init_images": [init], "inpaint_full_res": True}, "img2img")  # no mask: img2img
    assert (r.task, r.inpaint_area) == ("img2img", "whole")


def test_infotext_fills_the_fields_the_payload_leaves_out():
    text = "a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 11, Size: 64x32, Eta: 1"
    r = request_from_payload({"infotext": text, "steps": 2, "override_settings": {}})
    assert (r.prompt, r.negative_prompt, r.steps, r.sampler, r.cfg_scale, r.seed) == ("a red circle", "blue", 2,
                                                                                      "Euler", 5.0, 11)
    assert (r.width, r.height, r.eta) == (64, 32, 1.0)
    with pytest.raises(ApiError, match="Face restoration"):
        request_from_payload({"infotext": "x\nSteps: 3, Seed: 1, Face restoration: CodeFormer"})
    # the hires fix is applied from an infotext (pipelines/hires.py), unless the payload sets enable_hr itself
    r = request_from_payload({"infotext": "x\nSteps: 3, Seed: 1, Denoising strength: 0.3, Hires upscale: 2"})
    assert (r.hires_scale, r.hires_strength) == (2.0, 0.3)
    r = request_from_payload({"infotext": "x\nSteps: 3, Seed: 1, Hires upscale: 2", "enable_hr": False})
    assert r.hires_scale == 0


def test_progress_counts_batches_as_a1111_does():
    """The bug: with batch_size 4 it topped out at 25% (total counted 4 x the callbacks); the state had no job_count."""
    paused = Paused(at=3)  # the last of 4 steps of the only batch (4 images at once)
    reports = {}

    def during(server):
        reports["last"] = json.loads(server.handle("GET", "/sdapi/v1/progress?skip_current_image=true")[2])
    _run_paused(paused, {"prompt": "x", "steps": 4, "batch_size": 4}, during)
    assert reports["last"]["progress"] == 1.0 and reports["last"]["eta_relative"] == pytest.approx(0, abs=1e-6)
    paused = Paused(at=1, batch_start=2)  # step 2 of 4 of the second batch of 2
    _run_paused(paused, {"prompt": "x", "steps": 4, "batch_size": 2, "n_iter": 2}, during)
    report = reports["last"]
    state = report["state"]
    assert report["progress"] == 0.75, report
    assert (state["job"], state["job_count"], state["job_no"], state["sampling_step"], state["sampling_steps"]) == (
        "txt2img", 2, 1, 2, 4)
    assert set(state) >= {"skipped", "interrupted", "job_timestamp", "stopping_generation"}
    assert len(state["job_timestamp"]) == 14 and state["job_timestamp"].isdigit()


def test_idle_progress_is_what_webuiapi_waits_for(server):
    report = json.loads(server.handle("GET", "/sdapi/v1/progress")[2])
    assert report["progress"] == 0.0 and report["state"]["job_count"] == 0 and report["current_image"] is None


@pytest.mark.parametrize(("route", "answer"), [
    ("loras", []), ("upscalers", []), ("latent-upscale-modes", []), ("sd-vae", []), ("hypernetworks", []),
    ("face-restorers", []), ("realesrgan-models", []), ("prompt-styles", []), ("script-info", []),
    ("extensions", []), ("embeddings", {"loaded": {}, "skipped": {}}), ("scripts", {"txt2img": [], "img2img": []}),
])
def test_the_lists_of_what_daguerre_lacks_are_empty_in_a1111_shapes(server, route, answer):
    status, _, body = server.handle("GET", f"/sdapi/v1/{route}")
    assert status == 200 and json.loads(body) == answer


def test_memory_and_cmd_flags_are_real(server):
    memory = json.loads(server.handle("GET", "/sdapi/v1/memory")[2])
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    ram = memory["ram"]
    assert ram["total"] == total and 0 < ram["free"] <= total
    assert 50 * 2**20 < ram["used"] < total  # this process's resident set: torch alone is more than 50 MiB
    assert memory["cuda"] == {"error": "unavailable"}  # the model is on the CPU
    flags = json.loads(server.handle("GET", "/sdapi/v1/cmd-flags")[2])
    assert flags["use_cpu"] == ["all"] and flags["no_half"] is True and flags["ckpt"] == "random:tiny"
    for what in ("checkpoints", "vae", "loras"):
        assert server.handle("POST", f"/sdapi/v1/refresh-{what}")[:3:2] == (200, b"null")
    assert server.handle("POST", "/sdapi/v1/skip")[:3:2] == (200, b"null")  # idle: nothing to skip


def test_options_overrides_are_accepted_when_they_change_nothing(server):
    options = json.loads(server.handle("GET", "/sdapi/v1/options")[2])
    assert (options["eta_ancestral"], options["eta_ddim"], options["sd_vae"]) == (1.0, 0.0, "Automatic")
    r = request_from_payload({"override_settings": {"sd_model_checkpoint": "random:tiny", "eta_ddim": 0.0}},
                             settings=server.settings())
    assert r.clip_skip == 1
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 2, "override_settings": {"eta_ddim": 0.5}})
    assert status == 422 and "eta_ddim=0.5" in out["detail"] and "eta" in out["detail"]
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 2, "override_settings": {"sd_model_checkpoint": "x"}})
    assert status == 422 and "one model" in out["detail"]


class _NoWork:
    """A pipeline that fails the test if a request reaches it."""

    def __init__(self):
        self.pipe = daguerre.load("random:tiny")
        self.components, self.model_hash, self.request = self.pipe.components, None, self.pipe.request
        self.limits = self.pipe.limits

    def __call__(self, *args, **kwargs):
        raise AssertionError("the request was run")


def test_requests_over_the_limits_are_refused_before_any_work():
    from daguerre.limits import Limits

    server = Server(_NoWork(), "random:tiny")
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 2, "n_iter": 1000000, "batch_size": 4})
    assert status == 422 and "4000000 images" in out["detail"] and "--max-images" in out["detail"], out
    server = Server(_NoWork(), "random:tiny", limits=Limits(max_images=3, max_steps=10))
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 2, "n_iter": 2, "batch_size": 2})
    assert status == 422 and "4 images" in out["detail"]
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 11})
    assert status == 422 and "11 steps" in out["detail"]


def _png_declaring(width: int, height: int) -> str:
    """A tiny PNG whose header declares width x height (its one IDAT holds a few bytes): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(("size", "says"), [((20000, 20000), ["too large", "400000000 pixels"]),  # PIL's guard
                                            ((5000, 4000), ["5000x4000", "--max-input-pixels"])])  # the limit's
def test_a_decompression_bomb_is_refused_before_it_is_decoded(server, size, says):
    for path, payload in [("/sdapi/v1/img2img", {"init_images": [_png_declaring(*size)]}),
                          ("/sdapi/v1/png-info", {"image": _png_declaring(*size)})]:
        status, out = _post(server, path, payload)
        assert status == 422 and all(s in out["detail"] for s in says), out


def test_deeply_nested_json_is_a_400_not_a_500(server):
    for depth in (100000, 200):
        body = b"[" * depth + b"]" * depth
        status, _, raw = server.handle("POST", "/sdapi/v1/txt2img", body)
        assert status == 400 and "nested too deeply" in json.loads(raw)["detail"]
    status, out = _post(server, "/sdapi/v1/txt2img", {"steps": 2, "script_args": [[[["fine"]]]]})
    assert status == 200


def test_raised_server_limits_hold_through_the_pipeline():
    """`Server(limits=)` bounds the pipeline it runs too: a raised limit is not refused by the pipeline's defaults,
    and the caller's pipeline keeps its own."""
    from daguerre.limits import DEFAULT_LIMITS, Limits

    pipe = daguerre.load("random:tiny")
    payload = json.dumps({"prompt": "x", "steps": 1, "batch_size": 1, "n_iter": DEFAULT_LIMITS.max_images + 1,
                          "send_images": False}).encode()
    status, _, body = Server(pipe, "random:tiny").handle("POST", "/sdapi/v1/txt2img", payload)
    assert status == 422 and "over the limit" in json.loads(body)["detail"]
    raised = Limits(max_images=DEFAULT_LIMITS.max_images + 1)
    status, _, body = Server(pipe, "random:tiny", limits=raised).handle("POST", "/sdapi/v1/txt2img", payload)
    assert status == 200, body
    assert len(json.loads(json.loads(body)["info"])["all_seeds"]) == DEFAULT_LIMITS.max_images + 1
    assert pipe.limits == DEFAULT_LIMITS
