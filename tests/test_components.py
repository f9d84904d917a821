"""The one `build_components` (issue 14): fresh networks from a config, or strictly loaded state dicts."""

from __future__ import annotations

import pytest
import torch

from daguerre.components import build_components, state_dicts
from daguerre.config import preset


def test_loading_the_state_dicts_of_fresh_networks_gives_the_same_networks():
    fresh = build_components(preset("tiny"), seed=5)
    loaded = build_components(fresh.config, state_dicts(fresh))
    for a, b in zip(state_dicts(fresh), state_dicts(loaded), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded.tokenizer) is type(fresh.tokenizer)
    key = "input_blocks.0.0.weight"  # and the seed is what makes them
    other = build_components(preset("tiny"), seed=6)
    assert not torch.equal(fresh.unet.state_dict()[key], other.unet.state_dict()[key])


def test_fresh_networks_take_the_dtype():
    comps = build_components(preset("tiny"), dtype=torch.bfloat16)
    for module in (comps.unet, comps.vae, comps.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not module.training


def test_loading_is_strict():
    fresh = build_components(preset("tiny"))
    unet, vae, text = state_dicts(fresh)
    del vae[next(iter(vae))]
    with pytest.raises(ValueError, match="autoencoder weights do not match its config: 1 missing keys: first_stage"):
        build_components(fresh.config, (unet, vae, text), prefixes=("model.diffusion_model.", "first_stage_model.", ""))
    with pytest.raises(ValueError, match="holds no text-encoder weights"):
        build_components(fresh.config, (unet, state_dicts(fresh)[1], None))
