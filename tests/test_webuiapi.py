"""`daguerre serve` driven by `webuiapi`, the most used AUTOMATIC1111 client, unchanged and at its default
arguments, over real HTTP (127.0.0.1, a free port) and a `random:tiny` model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import webuiapi  # a test dependency (pyproject's `test` extra)
from PIL import Image

import daguerre
from conftest import serving
from daguerre.server.app import Server

SMALL = {"width": 32, "height": 32, "steps": 3}  # webuiapi's 512 x 512 at 20 steps, made small


@pytest.fixture(scope="module")
def served():
    server = Server(daguerre.load("random:tiny"), "random:tiny")
    with serving(server) as port:
        yield server, webuiapi.WebUIApi(host="127.0.0.1", port=port)


def test_start_up_calls(served):
    _, api = served
    api.util_wait_for_ready(check_interval=0.1)  # reads state.job_count: a KeyError before
    assert api.util_get_current_model() == "random:tiny"
    assert api.util_get_model_names() == ["random:tiny"]
    api.util_set_model("random:tiny")  # POST /options with the loaded model
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    for call in (api.get_upscalers, api.get_sd_vae, api.get_loras, api.get_hypernetworks, api.get_face_restorers,
                 api.get_realesrgan_models, api.get_prompt_styles, api.get_latent_upscale_modes):
        assert call() == [], call.__name__
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)
    assert api.get_memory()["ram"]["total"] > 0 and api.get_cmd_flags()["api"] is True
    assert api.get_options()["sd_model_checkpoint"] == "random:tiny"
    assert api.refresh_checkpoints() is None
    assert api.get_progress()["state"]["job_count"] == 0


def test_txt2img_at_webuiapis_defaults(served):
    """firstphase_width/height, eta=1.0, the hires fields with enable_hr off: all accepted (a 422 before)."""
    _, api = served
    result = api.txt2img(prompt="a red circle", seed=7, batch_size=2, **SMALL)
    assert len(result.images) == 2 and result.image.size == (32, 32)
    assert result.info["all_seeds"] == [7, 8] and result.info["sampler_name"] == "Euler a"
    text = result.info["infotexts"][0]
    assert "Sampler: Euler a" in text and "Eta" not in text  # eta 1.0 is Euler a's default, as in A1111
    info = api.png_info(result.image)
    assert info.info == text and info.json["parameters"]["Seed"] == "7"
    again = api.txt2img(prompt="a red circle", seed=7, sampler_name="DDIM", eta=0.0, **SMALL)
    assert "Eta" not in again.info["infotexts"][0]
    noisy = api.txt2img(prompt="a red circle", seed=7, sampler_name="DDIM", **SMALL)  # webuiapi's eta=1.0
    assert "Eta DDIM: 1" in noisy.info["infotexts"][0]  # A1111 too runs DDIM at the payload's eta
    assert not np.array_equal(np.asarray(again.image), np.asarray(noisy.image))


def test_img2img_and_inpainting_at_webuiapis_defaults(served):
    """image_cfg_scale=1.5, inpaint_full_res=True (only masked), eta=1.0: all accepted."""
    _, api = served
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    result = api.img2img(images=[image], prompt="x", seed=1, **SMALL)
    assert result.image.size == (32, 32) and result.info["denoising_strength"] == 0.75
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (70, 10, 80, 20))
    result = api.img2img(images=[image], mask_image=mask, prompt="x", seed=1, inpainting_fill=1,
                         inpaint_full_res_padding=4, mask_blur=0, denoising_strength=1.0, **SMALL)
    got = np.asarray(result.image)
    assert result.image.size == image.size  # only masked: the whole image back, a crop redrawn
    assert np.array_equal(got[:, :60], np.asarray(image)[:, :60])
    assert "Inpaint area: Only masked" in result.info["infotexts"][0]
    whole = api.img2img(images=[image], mask_image=mask, prompt="x", seed=1, inpaint_full_res=False, **SMALL)
    assert whole.image.size == (32, 32)


def test_interrupt_and_skip_through_the_client(served):
    server, api = served
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(
        result=api.txt2img(prompt="x", seed=3, n_iter=3, width=32, height=32, steps=400)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while api.get_progress()["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        progress = api.get_progress()
        assert progress["state"]["job_count"] == 3 and 0 < progress["progress"] < 1
        api.skip()  # the first batch ends with its current estimate, the second starts
        while api.get_progress()["state"]["job_no"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.interrupt() == {}
    finally:
        worker.join(60)
    result = answer["result"]
    assert result.info["interrupted"] is True and result.info["all_seeds"] == [3, 4]  # the third never ran
    assert len(result.images) == 2
    api.util_wait_for_ready(check_interval=0.1)
    assert api.get_progress()["state"]["interrupted"] is True
