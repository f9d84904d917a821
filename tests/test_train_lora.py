"""`daguerre train lora` (issue 20 point 4): a LoRA trained on a frozen model through the shared loop, exported in
the kohya format. On a small SD 1.5-architecture model file (tests/lora_oracle.py): the trained LoRA (U-Net
attention + convolutions + text encoder) loaded by daguerre's loader gives the trained model's output, and
diffusers' `load_lora_weights` + `fuse_lora` gives the weights daguerre merges; the base model never changes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from daguerre.checkpoints.single_file import save_model
from daguerre.lora.apply import merge_loras
from daguerre.lora.formats import read_lora
from daguerre.registry import open_model
from daguerre.training.config import load_run_config
from daguerre.training.loop import run
from daguerre.training.lora import LoraStage, lora_targets
from lora_oracle import daguerre_components, reference_models

CAPTIONS = ["a photo of a red sks", "a blue sks on a white background", "a sks", "a small green sks"]


def write_folder(root, n: int = 4, size: int = 16):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(model file, diffusers U-Net, transformers text encoder) of one small SD 1.5-architecture model."""
    unet, text = reference_models("sd15")
    path = tmp_path_factory.mktemp("model") / "small-sd15.safetensors"
    save_model(daguerre_components("sd15", unet, text), path, dtype=torch.float32)
    return path, unet, text


def lora_config(model, data, *overrides):
    return load_run_config(None, "lora", [
        f"train.init_from={model}", "data.kind=folder", f"data.folder.root={data}", "data.size=16",
        "data.holdout=0", "train.steps=3", "train.batch_size=2", "train.lr=0.05", "train.warmup_steps=0",
        "train.ema_decay=0", "train.progress=false", "train.save_dtype=float32", "train.checkpoint_every=0",
        "sample.prompts=['a sks']", "sample.seeds_per_prompt=1", "sample.steps=2", "lora.rank=4", "lora.alpha=2",
        *overrides])


def unet_output(comps, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = comps.tokenizer(["a photo of a red sks", "a sks"])
    with torch.no_grad():
        context = comps.text_encoder(ids, output_pooled=False).hidden
        return comps.unet(x, torch.tensor([10.0, 500.0]), context=context)


@pytest.fixture(scope="module")
def trained(sd15, tmp_path_factory):
    """A LoRA trained 3 steps on U-Net (attention + conv) and text encoder: (stage, file, model file)."""
    model = sd15[0]
    tmp = tmp_path_factory.mktemp("run")
    cfg = lora_config(model, write_folder(tmp / "data"), "lora.text_encoder=true")
    stage = LoraStage(cfg)
    path = run(stage, cfg, tmp / "run")
    return stage, path, model


def test_the_file_is_kohya_and_names_every_adapted_layer(trained):
    stage, path, _ = trained
    lora = read_lora(path)
    assert set(lora.layers) == set(stage.targets)
    unet_keys = [k for k in lora.layers if k.startswith("lora_unet_")]
    assert any("_attentions_" in k and k.endswith("attn2_to_k") for k in unet_keys)  # diffusers names
    assert any("_resnets_" in k and k.endswith("conv1") for k in unet_keys)  # LoCon
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in lora.layers)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        conv = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    assert {"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight",
            "lora_unet_down_blocks_0_resnets_0_conv1.alpha"} <= keys
    assert conv.shape[0] == 4 and conv.shape[2:] == (3, 3)  # kohya LoCon: the kernel in lora_down
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert meta["ss_network_train_unet_only"] == "False"
    assert any(bool(v.tensors["up"].abs().sum() > 0) for v in lora.layers.values())  # trained from up = 0


def test_daguerre_loader_gives_the_trained_models_output(trained):
    stage, path, model = trained
    trained_out = unet_output(stage.components)  # the frozen model with the trained LoRA's hooks
    base, _ = open_model(str(model), dtype=torch.float32)
    base_out = unet_output(base)
    merge_loras(base, [(path, 1.0)])
    merged_out = unet_output(base)
    assert (trained_out - base_out).abs().max() > 1e-3  # the LoRA learned something
    assert torch.allclose(merged_out, trained_out, atol=1e-4, rtol=1e-4)


def test_diffusers_load_lora_weights_fuses_the_weights_daguerre_merges(trained, sd15):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from daguerre.checkpoints.unet_keys import unet_state_dict_to_diffusers
    from test_lora_diffusers import diffusers_fused

    _, path, model = trained
    _, unet, text = sd15
    ref_unet, ref_text = diffusers_fused(copy.deepcopy(unet), copy.deepcopy(text), load_file(str(path)), 1.0)
    comps = daguerre_components("sd15", unet, text)
    merge_loras(comps, [(path, 1.0)])
    mine = unet_state_dict_to_diffusers(comps.unet.state_dict(), comps.config.unet)
    changed = [k for k in ref_unet if not torch.equal(ref_unet[k], unet.state_dict()[k])]
    assert len(changed) > 100
    for k in mine:
        assert torch.allclose(mine[k].reshape(ref_unet[k].shape), ref_unet[k], atol=1e-5, rtol=0), k
    text_sd = {k.removeprefix("text_model."): v for k, v in comps.text_encoder.state_dict().items()}
    assert any(not torch.equal(ref_text[k], text.state_dict()[k]) for k in ref_text)
    for k in ref_text:
        assert torch.allclose(text_sd[k], ref_text[k], atol=1e-5, rtol=0), k


def test_the_base_model_is_frozen_and_unchanged(trained):
    stage, _, model = trained
    base, _ = open_model(str(model), dtype=torch.float32)
    for part in ("unet", "text_encoder"):
        mine, ref = getattr(stage.components, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), part
    assert not any(p.requires_grad for p in stage.components.unet.parameters())


def test_layer_kinds_choose_the_adapted_layers(sd15):
    comps, _ = open_model(str(sd15[0]), dtype=torch.float32)
    cfg = load_run_config(None, "lora", [f"train.init_from={sd15[0]}"])
    cfg.lora.unet_layers = ["attention"]
    attention = lora_targets(comps, cfg.lora)
    assert attention and all("attentions" in k for k in attention)
    cfg.lora.unet_layers = ["conv"]
    conv = lora_targets(comps, cfg.lora)
    assert conv and not any("attentions" in k for k in conv) and any("samplers" in k for k in conv)


def test_resume_continues_and_refuses_another_model(sd15, tmp_path):
    data = write_folder(tmp_path / "data")
    cfg = lora_config(sd15[0], data, "train.checkpoint_every=1")
    whole = run(LoraStage(cfg), cfg, tmp_path / "whole")
    run(LoraStage(cfg), cfg, tmp_path / "parts", until=2)
    resumed = run(LoraStage(cfg), cfg, tmp_path / "parts", resume=True)
    a, b = read_lora(whole), read_lora(resumed)
    assert set(a.layers) == set(b.layers)
    for k, layer in a.layers.items():  # the interrupted run ends where the whole one does, bit for bit
        assert all(torch.equal(v, b.layers[k].tensors[r]) for r, v in layer.tensors.items()), k
    other = tmp_path / "other.safetensors"
    comps, _ = open_model(str(sd15[0]), dtype=torch.float32)
    with torch.no_grad():
        comps.unet.out[2].weight.add_(1.0)
    save_model(comps, other, dtype=torch.float32)
    cfg2 = lora_config(other, data, "train.checkpoint_every=1", "train.steps=4")
    with pytest.raises(ValueError, match="another model"):
        run(LoraStage(cfg2), cfg2, tmp_path / "parts", resume=True)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        cfg = load_run_config(None, "lora", [])
        run(LoraStage(cfg), cfg, tmp_path / "none")
    with pytest.raises(ValueError, match="lora.rank"):
        load_run_config(None, "lora", ["train.init_from=x", "lora.rank=0"])
    with pytest.raises(ValueError, match="lora.unet_layers"):
        load_run_config(None, "lora", ["train.init_from=x", "lora.unet_layers=['mlp']"])
    with pytest.raises(ValueError, match=r"\[lora\] section"):
        load_run_config(None, "ldm", ["lora.rank=4"])
    with pytest.raises(FileNotFoundError, match="no such model"):
        cfg = lora_config(tmp_path / "missing.safetensors", tmp_path)
        run(LoraStage(cfg), cfg, tmp_path / "run")
