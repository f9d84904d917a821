"""LoRAs and embeddings through the A1111 server: /sdapi/v1/loras and /sdapi/v1/embeddings in A1111's shapes, the
prompt's <lora:...> tags found in the server's --lora-dir only (a payload never names a file)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import daguerre
from daguerre.lora.syntax import short_hash
from daguerre.server.app import Server
from test_lora_formulas import tiny_lora


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    (root / "loras").mkdir()
    (root / "emb").mkdir()
    pipe = daguerre.load("random:tiny", dtype="fp32", lora_dir=root / "loras", embeddings_dir=root / "emb")
    save_file(tiny_lora(pipe, 1), str(root / "loras" / "one.safetensors"),
              metadata={"ss_output_name": "one_v2", "ss_tag_frequency": json.dumps({"shapes": {"circle": 3}})})
    save_file(tiny_lora(pipe, 2), str(root / "outside.safetensors"))
    width = pipe.config.text_encoder.width
    save_file({"emb_params": torch.randn(3, width)}, str(root / "emb" / "zigzag.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "step": 500, "sd_checkpoint": "abc",
                "sd_checkpoint_name": "v1-5"}, root / "emb" / "sd1word.pt")
    return Server(pipe, "random:tiny"), root


def get(server, route):
    status, _, body = server.handle("GET", route)
    return status, json.loads(body)


def post(server, route, payload):
    status, _, body = server.handle("POST", route, json.dumps(payload).encode())
    return status, json.loads(body)


def test_loras_and_embeddings_are_listed_as_a1111_lists_them(server):
    server, root = server
    status, loras = get(server, "/sdapi/v1/loras")
    assert status == 200
    assert loras == [{"name": "one", "alias": "one_v2", "path": str(root / "loras" / "one.safetensors"),
                      "metadata": {"ss_output_name": "one_v2", "ss_tag_frequency": {"shapes": {"circle": 3}}}}]
    status, embeddings = get(server, "/sdapi/v1/embeddings")
    assert status == 200
    width = server.pipe.config.text_encoder.width
    assert embeddings == {
        "loaded": {"zigzag": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                              "vectors": 3}},
        "skipped": {"sd1word": {"step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5", "shape": 768,
                                "vectors": 1}}}


def test_prompt_tags_apply_loras_of_the_lora_folder_only(server):
    server, root = server
    payload = {"prompt": "a red circle <lora:one:0.6>", "steps": 2, "seed": 3}
    status, out = post(server, "/sdapi/v1/txt2img", payload)
    assert status == 200, out
    text = json.loads(out["info"])["infotexts"][0]
    assert text.startswith("a red circle <lora:one:0.6>\n")
    assert f'Lora hashes: "one: {short_hash(root / "loras" / "one.safetensors")}"' in text
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB")
    same = server.pipe("a red circle <lora:one:0.6>", steps=2, seed=3)[0].image.convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(same))
    plain = server.pipe("a red circle", steps=2, seed=3)[0].image.convert("RGB")
    assert not np.array_equal(np.asarray(image), np.asarray(plain))
    for prompt, words in (("<lora:outside>", "no LoRA 'outside' in LoRA folder"),
                          (f"<lora:{root}/outside>", "without a path"), ("<lora:../outside>", "without a path")):
        status, out = post(server, "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 1})
        assert status in (400, 404, 422) and words in out["detail"], out
    status, out = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1,
                                                     "loras": [str(root / "outside.safetensors")]})
    assert status in (400, 422) and "unknown field 'loras'" in out["detail"]
