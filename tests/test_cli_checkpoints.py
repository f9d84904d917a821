"""`daguerre info` and `daguerre convert` through `daguerre.cli.main`: outputs, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from daguerre.checkpoints import load_model, read_state_dict, save_model
from daguerre.cli import main
from daguerre.config import preset
from test_checkpoints import assert_same_weights, random_components, sd_state_dict, small_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    comps = random_components(preset("tiny"))
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    save_model(comps, path)
    return comps, path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_text_and_json(tiny_model, capsys):
    comps, path = tiny_model
    code, out, err = run(capsys, "info", path)
    assert code == 0 and err == ""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"sha256:          {digest}" in out
    assert f"model hash:      {digest[:10]} (AUTOMATIC1111)" in out
    assert "preset:          tiny" in out and "daguerre checkpoint" in out
    assert "prediction type: epsilon" in out

    code, out, _ = run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert code == 0 and info["preset"] == "tiny" and info["short_hash"] == digest[:10]
    assert info["file_size"] == path.stat().st_size
    for part in ("unet", "vae", "text_encoder"):
        assert info["parameters"][part] == sum(p.numel() for p in getattr(comps, part).parameters())
    assert info["stored_dtypes"] == {"float32": len(read_state_dict(path)[0])}
    assert info["unet"]["channels"] == [32, 64] and info["vae"]["downsample_factor"] == 2
    assert info["text_encoder"]["layers"] == 2 and info["text_encoder"]["skip_layers"] == 0


def test_info_on_sd_file_reports_variant_ema_and_ignored_keys(tmp_path, capsys):
    comps = random_components(small_config())
    ema = {f"model_ema.{('diffusion_model.' + k).replace('.', '')}": v for k, v in comps.unet.state_dict().items()}
    path = tmp_path / "sd-v1-full.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd_state_dict(comps, **ema).items()}, str(path))
    code, out, _ = run(capsys, "info", path, "--json", "--no-hash")
    info = json.loads(out)
    assert code == 0 and info["sha256"] is None
    assert info["variant"].startswith("SD v1.x") or "OpenAI CLIP" in info["variant"]
    assert info["has_ema"] and info["ignored_keys"] > len(ema)  # EMA copies, schedule buffers, position_ids
    assert set(info["stored_dtypes"]) == {"float16", "int64"}
    assert info["prediction_type"] == "epsilon" and info["prediction_type_from"] == "SD v1 default"


def test_convert_single_to_diffusers_and_back(tiny_model, tmp_path, capsys):
    comps, path = tiny_model
    folder = tmp_path / "pipe"
    code, out, err = run(capsys, "convert", path, folder)
    assert code == 0 and err == "" and f"wrote {folder}" in out and "diffusers folder" in out
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    code, out, _ = run(capsys, "info", folder, "--json")
    assert code == 0 and json.loads(out)["format"] == "diffusers folder"

    back = tmp_path / "back.safetensors"
    code, out, _ = run(capsys, "convert", folder, back, "--dtype", "fp16")
    assert code == 0 and "float16" in out
    assert {v.dtype for v in read_state_dict(back)[0].values()} == {torch.float16}
    assert_same_weights(comps, load_model(back), dtype=torch.float16)

    again = tmp_path / "again.safetensors"
    code, _, _ = run(capsys, "convert", back, again)  # default dtype: what the source is stored in
    assert code == 0 and {v.dtype for v in read_state_dict(again)[0].values()} == {torch.float16}


def test_convert_sets_prediction_type(tiny_model, tmp_path, capsys):
    _, path = tiny_model
    out_file = tmp_path / "v.safetensors"
    code, _, _ = run(capsys, "convert", path, out_file, "--prediction-type", "v_prediction")
    assert code == 0 and load_model(out_file).config.schedule.prediction_type == "v_prediction"


def test_one_line_errors(tiny_model, tmp_path, capsys):
    _, path = tiny_model
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(1000))
    cases = [
        (("info", tmp_path / "missing.safetensors"), "no such model file"),
        (("info", bad), "not a checkpoint"),
        (("convert", bad, tmp_path / "x.safetensors"), "not a checkpoint"),
        (("convert", tmp_path / "missing.ckpt", tmp_path / "y.safetensors"), "no such model file"),
        (("convert", path, path), "same path"),
        (("convert", path, bad), "exists"),
        (("convert", path, tmp_path / "z.safetensors", "--to", "diffusers"), "is a folder"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"daguerre {argv[0]}: error:"), err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "z.safetensors").exists()


def test_info_on_hostile_files_is_one_line(tiny_model, tmp_path, capsys):
    """`daguerre info` as a user sees it: a FIFO (which would block), /dev/zero, 100 000-deep JSON in the
    metadata, a diffusers folder asking for 100 000-pixel images or with a shard index pointing out of
    its folder: one line naming the file, exit 2, quickly."""
    import subprocess
    import sys

    from daguerre.checkpoints import save_diffusers

    comps, path = tiny_model
    sd, meta = read_state_dict(path)
    deep = tmp_path / "deep.safetensors"
    save_file(sd, str(deep), metadata={**meta, "daguerre_config": "[" * 100_000 + "]" * 100_000})
    folder = tmp_path / "pipe"
    save_diffusers(comps, folder)
    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "sample_size": 100_000}))
    sharded = tmp_path / "sharded"
    save_diffusers(comps, sharded)
    (sharded / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (sharded / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"encoder.conv_in.weight": "../unet/diffusion_pytorch_model.safetensors"}}))
    cases = [(deep, r"deep.safetensors: the daguerre_config metadata: JSON nested too deeply"),
             (folder, "unet/config.json: sample_size 100000"),
             (sharded, "index.json: the weight_map names the shard '../unet/diffusion_pytorch_model.safetensors'")]
    if os.path.exists("/dev/zero"):
        cases.append(("/dev/zero", "/dev/zero is a character device, not a regular file"))
    for model, message in cases:
        code, out, err = run(capsys, "info", model)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "daguerre", "info", str(fifo)], capture_output=True, text=True,
                          timeout=120, env=env)  # in a process of its own: a regression hangs that, not the suite
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pipe.safetensors is a named pipe (FIFO), not a regular file" in lines[0]
