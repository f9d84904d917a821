"""The page of `daguerre serve` (server/page.html) in Debian's chromium driven by Playwright: the loaded model
shown, inpainting with a mask drawn in the browser, the gallery, PNG info from a file, the interrupt button,
and phone width. The screenshots it takes are docs/images/server-page*.png (written when DAGUERRE_SCREENSHOTS
is set, so that a test run does not rewrite the docs)."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import daguerre
from conftest import serving
from daguerre.server.app import Server

SHOTS = Path(__file__).parent.parent / "docs" / "images"


@pytest.fixture(scope="module")
def url():
    with serving(Server(daguerre.load("random:tiny"), "random:tiny")) as port:
        yield f"http://127.0.0.1:{port}/"


def _shot(page, name: str) -> None:
    if os.environ.get("DAGUERRE_SCREENSHOTS"):
        page.screenshot(path=str(SHOTS / name), full_page=True)


def _picture(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def _distance(image: Image.Image, x0: int, x1: int) -> float:
    return float(np.abs(np.asarray(image.convert("RGB")).astype(int)[:, x0:x1] - [200, 30, 30]).mean())


def test_inpainting_with_a_mask_drawn_in_the_browser(browser, url, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.includes('random:tiny')")
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#init_image", str(_picture(tmp_path)))
    page.wait_for_function("document.getElementById('mask_canvas').width == 32")
    box = page.locator("#mask_canvas").bounding_box()
    page.fill("#brush", "6")
    for fraction in (0.05, 0.15, 0.25, 0.35):  # vertical strokes over the left half (the canvas shows 32 px)
        x = box["x"] + fraction * box["width"]
        page.mouse.move(x, box["y"] + 1)
        page.mouse.down()
        for i in range(1, 21):
            page.mouse.move(x, box["y"] + box["height"] * i / 20)
        page.mouse.up()
    page.fill("#steps", "3")
    page.fill("#batch_size", "1")
    page.fill("#seed", "5")
    page.fill("#denoising_strength", "1")
    _shot(page, "server-page-mask.png")
    page.click("button[type=submit]")
    page.wait_for_selector("#images img", timeout=120000)
    assert "Denoising strength: 1" in page.inner_text("#status") and "Mask blur" in page.inner_text("#status")
    src = page.get_attribute("#images img", "src")
    got = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert got.size == (32, 32) and _distance(got, 26, 32) < 1 < _distance(got, 0, 8)  # kept, repainted
    assert page.locator("#gallery img").count() == 1
    page.click("#gallery img")
    assert "Seed: 5" in page.inner_text("#info")
    _shot(page, "server-page-inpaint.png")
    # the PNG info of the image it made, read back from a file
    made = tmp_path / "made.png"
    made.write_bytes(base64.b64decode(src.split(",", 1)[1]))
    page.set_input_files("#pnginfo_file", str(made))
    page.wait_for_function("document.getElementById('pnginfo_text').textContent.includes('Steps: 3')")
    assert not errors, errors


def test_stop_interrupts_and_the_page_fits_a_phone(browser, url):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#scheduler option').length > 3")  # /schedulers answered
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    page.fill("#steps", "1000")
    page.fill("#batch_size", "1")
    page.click("button[type=submit]")
    deadline = time.monotonic() + 60
    while "step" not in page.inner_text("#status") and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert page.get_attribute("#preview", "src"), "no live preview while it ran"
    _shot(page, "server-page-phone.png")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent.includes('stopped early')",
                           timeout=60000)
    assert page.locator("#images img").count() == 1
    context.close()
