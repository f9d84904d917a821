"""Original configs (issue 20, point 5): a CompVis inference YAML beside a Stable Diffusion checkpoint (or given with
--config FILE) says what its weights cannot, its head widths; without one, a file whose widths the SD conventions
cannot cut into heads is a clear error that asks for it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import daguerre
from daguerre.checkpoints import detect, load_model
from daguerre.checkpoints.single_file import single_file_state_dict
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.config import TextEncoderConfig, preset
from daguerre.fileio import atomic_save_safetensors

V2_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32 # unused
        model_channels: 32
        num_head_channels: {heads} # need to fix for flash-attn
        use_linear_in_transformer: True
        context_dim: 64
"""
V1_YAML = """model:
  params:
    unet_config:
      params:
        model_channels: 32
        num_heads: {heads}
"""


def write_sd_file(path, unet_changes: dict) -> torch.nn.Module:
    """A tiny model written as a plain SD single file (no daguerre config): its U-Net with `unet_changes`, a
    64-wide text encoder (one CLIP head); returns the components."""
    cfg = preset("tiny")
    text = TextEncoderConfig(width=64, layers=1, heads=1, mlp_dim=64)
    unet = dataclasses.replace(cfg.unet, context_dim=64, norm_groups=32, **unet_changes)  # CompVis: GroupNorm32
    cfg = dataclasses.replace(cfg, unet=unet,
                              text_encoder=text)
    comps = build_components(cfg, seed=1)
    with torch.no_grad():  # no zero layer: every head's output counts
        for p in comps.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    atomic_save_safetensors(single_file_state_dict(comps), path, {})
    return comps


def unet_out(comps) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 64, generator=gen)
    with torch.no_grad():
        return comps.unet(x, torch.tensor([500.0]), context)


def test_sd2_layout_heads_the_convention_cannot_cut_need_the_yaml(tmp_path):
    path = tmp_path / "odd-v2.safetensors"
    original = write_sd_file(path, {"use_linear_proj": True, "num_heads": None, "head_dim": 8,
                                          "channel_mult": (1, 3)})
    with pytest.raises(ValueError, match="cannot be inferred from its weights; put its CompVis inference YAML beside "
                                         "it \\(odd-v2.yaml\\) or give it with --config FILE"):
        load_model(path)
    (tmp_path / "odd-v2.yaml").write_text(V2_YAML.format(heads=8))
    loaded = load_model(path)
    assert (loaded.config.unet.head_dim, loaded.config.unet.num_heads) == (8, None)
    assert loaded.config.schedule.prediction_type == "v_prediction"  # the same YAML's parameterization
    assert torch.allclose(unet_out(loaded), unet_out(original), atol=1e-5)


def test_sd1_layout_heads_come_from_the_yaml(tmp_path):
    """2 heads where SD 1's convention says 8 (which divides the width too: only the YAML can tell)."""
    path = tmp_path / "two-heads.safetensors"
    original = write_sd_file(path, {"num_heads": 2, "head_dim": None})
    guessed = load_model(path)  # without a YAML: the convention, 8 heads
    assert guessed.config.unet.num_heads == 8
    assert not torch.allclose(unet_out(guessed), unet_out(original), atol=1e-3)
    config = tmp_path / "elsewhere.yaml"
    config.write_text(V1_YAML.format(heads=2))
    loaded = load_model(path, original_config=config)  # what --config FILE does
    assert loaded.config.unet.num_heads == 2
    assert torch.allclose(unet_out(loaded), unet_out(original), atol=1e-5)


def test_a_given_config_belongs_to_its_load_alone(tmp_path):
    """Two loads of one file in one process: the YAML given to one is not seen by the other (a table of given
    configs per checkpoint path leaked it into every later load), while the parts a one-shot model releases are
    read again with the YAML it was opened with."""
    path = tmp_path / "two-heads.safetensors"
    original = write_sd_file(path, {"num_heads": 2, "head_dim": None})
    config = tmp_path / "elsewhere.yaml"
    config.write_text(V1_YAML.format(heads=2))
    assert load_model(path, original_config=config).config.unet.num_heads == 2
    assert load_model(path).config.unet.num_heads == 8
    assert detect.prediction_from_yaml(path) is None and detect.config_yaml(path) is None
    one_shot = daguerre.load(str(path), dtype="fp32", release_after_use=True, original_config=str(config))
    plain = daguerre.load(str(path), dtype="fp32")
    assert plain.components.config.unet.num_heads == 8 and one_shot.components.config.unet.num_heads == 2
    one_shot.components.acquire("unet")  # read again from the file: with its YAML, or the config would differ
    assert torch.allclose(unet_out(one_shot.components), unet_out(original), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_model(path, original_config=tmp_path / "missing.yaml")


def test_config_flag_of_convert_and_generate(tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    original = write_sd_file(path, {"use_linear_proj": True, "num_heads": None, "head_dim": 8,
                                    "channel_mult": (1, 3)})
    config = tmp_path / "v2-odd.yaml"
    config.write_text(V2_YAML.format(heads=8))
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(path), str(out)]) != 0
    assert "--config FILE" in capsys.readouterr().err
    assert main(["convert", str(path), str(out), "--config", str(config)]) == 0
    converted = load_model(out)  # a daguerre file carries its config: no YAML needed any more
    assert torch.allclose(unet_out(converted), unet_out(original), atol=1e-5)
    png = tmp_path / "a.png"
    assert main(["generate", "x", "--model", str(path), "--config", str(config), "--steps", "1", "--size", "32",
                 "--out", str(png)]) == 0
    assert png.exists()
    assert main(["generate", "x", "--model", "random:tiny", "--config", str(config), "--out",
                 str(tmp_path / "b.png")]) != 0
    assert "--config goes with a checkpoint file" in capsys.readouterr().err


def test_info_reads_the_config_flag(tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    write_sd_file(path, {"use_linear_proj": True, "num_heads": None, "head_dim": 8, "channel_mult": (1, 3)})
    config = tmp_path / "v2-odd.yaml"
    config.write_text(V2_YAML.format(heads=8))
    assert main(["info", str(path), "--no-hash"]) != 0
    assert "cannot be inferred from its weights" in capsys.readouterr().err
    assert main(["info", str(path), "--no-hash", "--config", str(config)]) == 0
    assert "heads from v2-odd.yaml" in capsys.readouterr().out
