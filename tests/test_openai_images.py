"""`daguerre serve`'s OpenAI Images API (daguerre.server.openai_images) driven by the official `openai` Python
client over real sockets on 127.0.0.1: images.generate and images.edit at their default arguments, daguerre's
own settings as extra body fields, OpenAI's mask convention, --api-key, and bad requests named."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import daguerre
from conftest import serving
from daguerre.limits import Limits
from daguerre.server.app import Server
from daguerre.server.http import Access

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    return Server(daguerre.load("random:tiny"), "random:tiny", limits=Limits(max_images=4, max_steps=50))


@pytest.fixture(scope="module")
def url(server):
    with serving(server) as port:
        yield f"http://127.0.0.1:{port}"


def client(base: str, key: str = "any value", **kwargs):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120, **kwargs)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_at_default_arguments_gives_one_png_of_the_models_size_with_its_parameters(url, server):
    out = client(url).images.generate(prompt="a red circle")
    assert len(out.data) == 1 and out.data[0].url is None
    image = _decoded(out.data[0].b64_json)
    native = server.pipe("a red circle", steps=1)[0].image.size  # the Python API's default size
    assert image.format == "PNG" and image.size == native and out.size == "{}x{}".format(*native)
    assert image.info["parameters"].startswith("a red circle\n")


def test_generate_takes_daguerres_settings_as_extra_fields_and_any_model_name(url, server):
    extra = {"seed": 7, "steps": 3, "sampler": "Euler", "cfg_scale": 5.0, "negative_prompt": "blue"}
    out = client(url).images.generate(prompt="a red circle", model="dall-e-2", n=2, size="32x48",
                                      response_format="b64_json", quality="standard", user="u1", extra_body=extra)
    images = [_decoded(d.b64_json) for d in out.data]
    assert len(images) == 2 and all(i.size == (32, 48) for i in images)
    text = images[0].info["parameters"]
    assert "Steps: 3, Sampler: Euler" in text and "CFG scale: 5" in text and "Seed: 7" in text
    assert "Negative prompt: blue" in text and "Seed: 8" in images[1].info["parameters"]
    same = server.pipe("a red circle", negative_prompt="blue", steps=3, seed=7, sampler="Euler", cfg_scale=5.0,
                       width=32, height=48)  # the Python API, the same request: the same pixels
    assert np.array_equal(np.asarray(images[0].convert("RGB")), np.asarray(same[0].image.convert("RGB")))


def _half_transparent(alpha_left: int) -> Image.Image:
    """A 32x32 red picture whose left half has alpha `alpha_left` (the right half is opaque)."""
    image = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    image.paste((200, 30, 30, alpha_left), (0, 0, 16, 32))
    return image


def _distance(image: Image.Image, box: tuple[int, int, int, int]) -> float:
    """Mean distance of `image`'s pixels in `box` (x0, x1 columns; y0, y1 rows) from the picture's red."""
    x0, x1, y0, y1 = box
    return float(np.abs(np.asarray(image.convert("RGB")).astype(int)[y0:y1, x0:x1] - [200, 30, 30]).mean())


def test_edit_at_default_arguments_repaints_the_images_transparent_pixels(url):
    out = client(url).images.edit(image=("picture.png", _png(_half_transparent(0)), "image/png"),
                                  prompt="a blue square", extra_body={"steps": 4, "seed": 1})
    got = _decoded(out.data[0].b64_json)
    assert got.size == (32, 32) and "Denoising strength: 1" in got.info["parameters"]
    assert _distance(got, (24, 32, 0, 32)) < 1 < _distance(got, (0, 8, 0, 32))  # kept, repainted


def test_edit_with_a_mask_repaints_the_masks_transparent_pixels(url):
    mask = _half_transparent(0).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # the right half transparent
    out = client(url).images.edit(image=("picture.png", _png(_half_transparent(255).convert("RGB")), "image/png"),
                                  mask=("mask.png", _png(mask), "image/png"), prompt="x", n=2,
                                  extra_body={"steps": 4, "seed": 1})
    for d in out.data:
        got = _decoded(d.b64_json)
        assert _distance(got, (0, 8, 0, 32)) < 1 < _distance(got, (24, 32, 0, 32))


def test_models_list_names_the_loaded_model(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["random:tiny"]
    assert client(url).models.retrieve("dall-e-3").id == "random:tiny"


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"response_format": "url"}, "response_format 'url' is not served"),
    ({"size": "big"}, "size 'big' is not WIDTHxHEIGHT"),
    ({"size": "100000x100000"}, "--max-pixels"),
    ({"n": 5}, "5 images is over the limit of 4"),
    ({"extra_body": {"steps": 51}}, "51 steps is over the limit of 50"),
    ({"extra_body": {"n": "two"}}, "n: Input should be a valid integer"),
    ({"extra_body": {"stepz": 3}}, "unknown field 'stepz'"),
    ({"extra_body": {"sampler": "nope"}}, "nope"),
    ({"style": "natural"}, "style='natural' is not something daguerre can do"),
    ({"extra_body": {"background": "transparent"}}, "background='transparent'"),
])
def test_bad_generations_are_a_422_naming_the_field_and_the_server_goes_on(url, kwargs, says):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client(url).images.generate(prompt="x", **kwargs)
    assert says in e.value.body["message"], e.value.body
    assert len(client(url).images.generate(prompt="x", extra_body={"steps": 1}).data) == 1


@pytest.mark.parametrize(("image", "mask", "says"), [
    (_png(_half_transparent(255)), None, "image has no fully transparent pixels"),
    (_png(_half_transparent(255).convert("RGB")), None, "image has no alpha channel"),
    (b"not an image", None, "image:"),
    (_png(_half_transparent(0)), _png(Image.new("RGBA", (16, 16))), "mask is 16x16 but image is 32x32"),
])
def test_bad_edits_are_a_422_naming_the_problem(url, image, mask, says):
    files = {"mask": ("mask.png", mask, "image/png")} if mask is not None else {}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client(url).images.edit(image=("picture.png", image, "image/png"), prompt="x", **files)
    assert says in e.value.body["message"], e.value.body


def test_api_key_is_asked_for_as_a_bearer_token_on_every_route(server):
    with serving(server, access=Access.from_flags(api_key="sk-right-key-123")) as port:
        base = f"http://127.0.0.1:{port}"
        for call in (lambda c: c.images.generate(prompt="x", extra_body={"steps": 1}), lambda c: c.models.list()):
            with pytest.raises(openai.AuthenticationError):
                call(client(base, "sk-wrong-key-123"))
        assert len(client(base, "sk-right-key-123").images.generate(prompt="x", extra_body={"steps": 1}).data) == 1
        import urllib.error
        import urllib.request

        for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/options"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{base}{path}", timeout=30)
            assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
            request = urllib.request.Request(f"{base}{path}", headers={"Authorization": "Bearer sk-right-key-123"})
            assert urllib.request.urlopen(request, timeout=30).status == 200


def test_api_key_flag_is_checked():
    for bad in ("short", "has a space in it", ""):
        with pytest.raises(ValueError, match="--api-key: give a key of at least 8 printable characters"):
            Access.from_flags(api_key=bad)
    both = Access.from_flags(api_auth="ann:secret", api_key="sk-12345678")
    assert both.authorized("Bearer sk-12345678")
    assert both.authorized("Basic " + base64.b64encode(b"ann:secret").decode())
    assert not both.authorized("Bearer sk-1234567") and not both.authorized("Basic sk-12345678")


def test_openapi_describes_every_route_and_the_openai_bodies(url, server):
    import urllib.request

    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as r:
        spec = json.loads(r.read())
    paths = spec["paths"]
    for method, path in server.routes:
        assert method.lower() in paths[path], (method, path)
    for path, method in (("/v1/images/generations", "post"), ("/v1/images/edits", "post"), ("/v1/models", "get"),
                         ("/", "get")):
        assert method in paths[path]
    body = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "n", "size", "response_format", "seed", "steps", "cfg_scale"} <= set(body["properties"])
    assert body["required"] == ["prompt"]
    upload = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["image"]["format"] == "binary" and "mask" in upload["properties"]
    txt2img = paths["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "steps", "sampler_name", "enable_hr"} <= set(txt2img["properties"])
    with urllib.request.urlopen(f"{url}/docs", timeout=30) as r:
        assert b"openapi.json" in r.read()
