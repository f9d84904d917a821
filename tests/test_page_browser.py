"""The page of `daguerre serve` in a real browser: Debian's chromium driven by Playwright (never `playwright install`,
which downloads browsers). `make test` installs both (scripts/ensure-browser); a missing browser fails these tests
with what to run instead of skipping them."""

from __future__ import annotations

import re
import time

import pytest

import daguerre
from conftest import serving
from daguerre.server.app import Server


@pytest.fixture
def url():
    with serving(Server(daguerre.load("random:tiny"), "random:tiny")) as port:
        yield f"http://127.0.0.1:{port}/"


def _submit(page, prompt: str, steps: int, seed: int, batch_size: int) -> None:
    """Fill the form of the page's txt2img tab and press Generate."""
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    page.fill("#batch_size", str(batch_size))
    page.click("button[type=submit]")


def test_the_page_generates_with_live_progress(browser, url):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 10")  # /samplers answered
    _submit(page, "a red circle", steps=40, seed=7, batch_size=2)
    seen: set[str] = set()  # the status lines shown while it runs
    deadline = time.monotonic() + 120  # generous: the machine may be busy
    while time.monotonic() < deadline:
        text = page.inner_text("#status")
        seen.add(text)
        if "Steps: 40" in text:
            break
        page.wait_for_timeout(20)
    assert page.locator("#images img").count() == 2
    assert "Seed: 7" in page.inner_text("#status")
    assert page.get_attribute("#images img >> nth=1", "title") == "seed 8"
    totals = {int(m.group(1)) for t in seen if (m := re.search(r"step \d+ of (\d+)", t))}
    assert totals <= {40}, f"progress counted against {totals}, not the 40 steps asked for"  # was 'of 80'
    assert not errors, errors


def test_a_late_progress_answer_does_not_overwrite_the_result(browser, url):
    """Each answer of /sdapi/v1/progress is held back 1.5 s, so polls are still in flight when the images arrive:
    they must not put "step N of M" back over the finished image's parameters."""
    page = browser.new_page()
    page.add_init_script("""(() => {
      const plain = window.fetch.bind(window);
      window.polls = 0;
      window.fetch = async (path, ...rest) => {
        const answer = await plain(path, ...rest);
        if (String(path).includes("/sdapi/v1/progress")) {
          const seen = await answer.clone().json();
          if (seen.state && seen.state.job) window.polls += 1;
          await new Promise((done) => setTimeout(done, 1500));
        }
        return answer;
      };
    })()""")
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 10")
    _submit(page, "a red circle", steps=300, seed=5, batch_size=1)
    page.wait_for_selector("#images img", timeout=120000)
    assert page.evaluate("window.polls") >= 1  # a poll saw the job running, and is answered 1.5 s later
    page.wait_for_timeout(2000)  # every held-back answer has come in
    assert "Seed: 5" in page.inner_text("#status")


def test_the_page_shows_a_refused_request(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.fill("#steps", "5000")  # over the server's limit of 1000 steps
    page.click("button[type=submit]")
    page.wait_for_selector("#status.error")
    assert "5000 steps is over the limit" in page.inner_text("#status")


def test_the_page_shows_the_maps_of_the_last_image(browser, url):
    """The "Attention" panel: GET /daguerre/attention/last drawn as the image and one overlay per content word."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.click("#attention")  # before any image: the server says so
    page.wait_for_selector("#attention_status.error")
    assert "no image made yet" in page.inner_text("#attention_status")
    _submit(page, "a red circle above a blue square", steps=2, seed=3, batch_size=1)
    page.wait_for_selector("#images img", timeout=120000)
    page.click("#attention")
    page.wait_for_selector("#attention_maps figure >> nth=5", timeout=120000)
    captions = page.locator("#attention_maps figcaption").all_inner_texts()
    assert captions == ["the image", "red", "circle", "above", "blue", "square"]
    assert "seed 3" in page.inner_text("#attention_status")
    assert page.evaluate("[...document.querySelectorAll('#attention_maps img')].every(i => i.naturalWidth == 32)")
    assert not errors, errors
