"""LoRAs and embeddings from the command line (daguerre generate, daguerre convert --lora): the prompt's tags and
--lora, the PNG parameters A1111 writes (the tags in the prompt, `Lora hashes`), --from-png applying them again,
and a checkpoint written with a LoRA merged in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from daguerre.checkpoints import load_model, save_model
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.config import preset
from daguerre.lora.apply import merge_loras
from daguerre.lora.syntax import short_hash
from daguerre.pngmeta import parse_parameters, read_png_parameters
from test_lora_formulas import tiny_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model file, LoRA folder with one.safetensors and two.safetensors, embeddings folder)."""
    root = tmp_path_factory.mktemp("lora_cli")
    comps = build_components(preset("tiny"), seed=3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for p in comps.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model = root / "live.safetensors"
    save_model(comps, model)

    class Holder:  # what tiny_lora reads: .components
        components = comps

    (root / "loras").mkdir()
    (root / "loras" / "sub").mkdir()
    save_file(tiny_lora(Holder, 1), str(root / "loras" / "one.safetensors"))
    save_file(tiny_lora(Holder, 2, text=False), str(root / "loras" / "sub" / "two.safetensors"))
    (root / "emb").mkdir()
    vectors = torch.randn(2, comps.config.text_encoder.width) * 2
    save_file({"emb_params": vectors}, str(root / "emb" / "zigzag.safetensors"))
    return str(model), root / "loras", root / "emb"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def generate(capsys, *argv) -> tuple[int, str]:
    code = main(["generate", *argv])
    return code, capsys.readouterr().err


def test_prompt_tags_write_a1111_parameters_and_from_png_applies_them_again(files, tmp_path, capsys):
    model, loras, _ = files
    common = ["--model", model, "--steps", "2", "--seed", "9", "--lora-dir", str(loras)]
    assert generate(capsys, "a red circle <lora:one:0.8>", *common, "--out", str(tmp_path / "a.png"))[0] == 0
    assert generate(capsys, "a red circle", *common, "--out", str(tmp_path / "plain.png"))[0] == 0
    prompt, _, params = parse_parameters(read_png_parameters(tmp_path / "a.png"))
    assert prompt == "a red circle <lora:one:0.8>"
    assert params["Lora hashes"] == f"one: {short_hash(loras / 'one.safetensors')}"
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "plain.png"))
    code, err = generate(capsys, "--from-png", str(tmp_path / "a.png"), "--model", model, "--lora-dir", str(loras),
                         "--out", str(tmp_path / "b.png"))
    assert code == 0 and "does not apply" not in err
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    code, err = generate(capsys, "--from-png", str(tmp_path / "a.png"), "--model", model, "--out",
                         str(tmp_path / "c.png"))
    assert code != 0 and "no LoRA 'one'" in err and "--lora-dir" in err
    other = tmp_path / "other_loras"
    other.mkdir()
    (other / "one.safetensors").write_bytes((loras / "sub" / "two.safetensors").read_bytes())  # another file
    code, err = generate(capsys, "--from-png", str(tmp_path / "a.png"), "--model", model, "--lora-dir", str(other),
                         "--out", str(tmp_path / "d.png"))
    assert code == 0 and "LoRA one" in err and "not the " + short_hash(loras / "one.safetensors") in err


def test_lora_flag_is_written_as_a_tag(files, tmp_path, capsys):
    model, loras, _ = files
    two = loras / "sub" / "two.safetensors"
    assert generate(capsys, "a blue square", "--model", model, "--steps", "2", "--seed", "1", "--lora",
                    f"{two}:0.5", "--out", str(tmp_path / "a.png"))[0] == 0
    prompt, _, params = parse_parameters(read_png_parameters(tmp_path / "a.png"))
    assert prompt == "a blue square <lora:two:0.5>" and params["Lora hashes"].startswith("two: ")
    assert generate(capsys, "--from-png", str(tmp_path / "a.png"), "--model", model, "--lora-dir", str(loras),
                    "--out", str(tmp_path / "b.png"))[0] == 0  # found in a subfolder, by its name
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def test_a_lora_of_another_model_fails_before_sampling(files, tmp_path, capsys):
    model, _, _ = files
    bad = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(8, 2)},
              str(bad))
    code, err = generate(capsys, "x", "--model", model, "--lora", str(bad), "--out", str(tmp_path / "x.png"))
    assert code != 0 and "match no layer" in err and "transformer_blocks_9" in err
    assert not (tmp_path / "x.png").exists()


def test_embeddings_dir_words_change_prompt_and_negative_prompt(files, tmp_path, capsys):
    model, _, emb = files
    common = ["--model", model, "--steps", "2", "--seed", "4"]
    outs = {}
    for name, argv in {"plain": ["a zigzag"], "emb": ["a zigzag", "--embeddings-dir", str(emb)],
                       "neg": ["a circle", "-N", "zigzag", "--embeddings-dir", str(emb)],
                       "negplain": ["a circle", "-N", "zigzag"]}.items():
        assert generate(capsys, *argv, *common, "--out", str(tmp_path / f"{name}.png"))[0] == 0
        outs[name] = pixels(tmp_path / f"{name}.png")
    assert not np.array_equal(outs["plain"], outs["emb"])
    assert not np.array_equal(outs["neg"], outs["negplain"])
    from daguerre.weights.io import file_hash

    params = parse_parameters(read_png_parameters(tmp_path / "neg.png"))[2]
    assert params["TI hashes"] == f"zigzag: {file_hash(emb / 'zigzag.safetensors')[:12]}"  # A1111's key
    assert "TI hashes" not in parse_parameters(read_png_parameters(tmp_path / "negplain.png"))[2]


def test_convert_merges_loras_into_the_written_checkpoint(files, tmp_path, capsys):
    model, loras, _ = files
    out = tmp_path / "merged.safetensors"
    argv = ["convert", model, str(out), "--lora", f"{loras / 'one.safetensors'}:0.8", "--lora",
            f"{loras / 'sub' / 'two.safetensors'}:-0.3"]
    assert main(argv) == 0
    assert "merged LoRA(s) one" in capsys.readouterr().out
    expected = load_model(model)
    merge_loras(expected, [(loras / "one.safetensors", 0.8), (loras / "sub" / "two.safetensors", -0.3)])
    merged = load_model(out)
    for mine, theirs in ((merged.unet, expected.unet), (merged.text_encoder, expected.text_encoder)):
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())
    assert "one (" in merged.config.provenance["merged_loras"]
    original = load_model(model)
    assert not torch.equal(original.unet.state_dict()["input_blocks.1.0.in_layers.2.weight"],
                           merged.unet.state_dict()["input_blocks.1.0.in_layers.2.weight"])
    assert main(["convert", model, str(tmp_path / "bad.safetensors"), "--lora", str(tmp_path / "none.pt")]) != 0
