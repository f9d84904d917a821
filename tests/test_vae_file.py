"""The VAE-only file of `daguerre train vae` (checkpoints/vae_file.py): written and read back bit for bit, read
through the strict loader like every other checkpoint (issue 14: no loader bypasses it)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from daguerre.checkpoints import save_model
from daguerre.checkpoints.vae_file import load_vae, save_vae
from daguerre.components import build_components
from daguerre.config import preset


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_then_load_gives_the_same_autoencoder(tmp_path):
    comps = build_components(preset("tiny"), seed=2)
    save_vae(comps.vae, comps.config, tmp_path / "vae.safetensors")
    vae, config = load_vae(tmp_path / "vae.safetensors")
    assert _same(vae, comps.vae) and config == comps.config
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_the_autoencoder_of_a_whole_checkpoint_loads(tmp_path):
    comps = build_components(preset("tiny"), seed=2)
    save_model(comps, tmp_path / "model.safetensors")
    sd = load_file(tmp_path / "model.safetensors")
    sd["first_stage_model.loss.logvar"] = torch.zeros(())  # CompVis training-loss state: ignored, as on import
    save_file(sd, tmp_path / "sd.safetensors")  # no daguerre_config: the config is read from the shapes
    for name in ("model.safetensors", "sd.safetensors"):
        vae, config = load_vae(tmp_path / name)
        assert _same(vae, comps.vae) and config.vae.latent_channels == comps.config.vae.latent_channels


@pytest.mark.parametrize("damage, named", [
    (lambda sd: sd.update({"first_stage_model.encoder.extra.weight": torch.zeros(2)}), "1 unexpected keys: "
     "first_stage_model.encoder.extra.weight"),
    (lambda sd: sd.pop("first_stage_model.decoder.conv_out.bias"), "1 missing keys: "
     "first_stage_model.decoder.conv_out.bias"),
    (lambda sd: sd.update({"first_stage_model.decoder.conv_out.bias": torch.zeros(7)}), "1 shape mismatches: "
     r"first_stage_model.decoder.conv_out.bias is \(7,\)"),
])
def test_a_file_that_does_not_match_its_config_is_refused_by_name(tmp_path, damage, named):
    comps = build_components(preset("tiny"))
    save_vae(comps.vae, comps.config, tmp_path / "vae.safetensors")
    sd = load_file(tmp_path / "vae.safetensors")
    damage(sd)
    with safe_open(tmp_path / "vae.safetensors", "pt") as f:
        metadata = f.metadata()
    save_file(sd, tmp_path / "bad.safetensors", metadata)
    with pytest.raises(ValueError, match=f"bad.safetensors: the autoencoder weights do not match its config: {named}"):
        load_vae(tmp_path / "bad.safetensors")
