"""CLIPTextEncoder and its key mappings against transformers' CLIPTextModel on identical random weights."""

from __future__ import annotations

import dataclasses
import gc
import json

import pytest
import torch

from daguerre.checkpoints.text_keys import (
    expected_shapes,
    text_config_from_state_dict,
    text_config_from_transformers,
    text_config_to_transformers,
    text_state_dict_from_openclip,
    text_state_dict_from_transformers,
    text_state_dict_to_openclip,
    text_state_dict_to_transformers,
)
from daguerre.config import TextEncoderConfig, preset
from daguerre.models.text_encoder import CLIPTextEncoder
from daguerre.models.tokenizer import CLIPTokenizer

TOL = 1e-4
PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k",
    ", ".join(["an oil painting of a lighthouse in a storm by the sea"] * 8),  # truncated to 77 tokens
]
# the `text_encoder/config.json` of runwayml/stable-diffusion-v1-5 (old transformers token ids 0/2/1)
SD15_HF_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}


def random_state_dict(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every tensor, layer norms included (1 + noise, noise), so any mix-up shows.

    Uniform noise of standard deviation 0.02 (0.1 for layer norms): cheaper to draw than Gaussian noise.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_shapes(cfg).items():
        std = 0.1 if "norm" in key else 0.02
        noise = torch.empty(shape).uniform_(-std * 3**0.5, std * 3**0.5, generator=g)
        sd[key] = noise.add_(1) if "norm" in key and key.endswith("weight") else noise
    return sd


def ours_from(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> CLIPTextEncoder:
    with torch.device("meta"):  # no throw-away initialisation of hundreds of millions of weights
        model = CLIPTextEncoder(cfg)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def hf_from(sd: dict[str, torch.Tensor], config: dict):
    """transformers' model from our exported config and (hub-layout) state dict, sharing the tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf_cfg = CLIPTextConfig(**config)
    with_projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf_cfg)
    if not with_projection:  # transformers 5's CLIPTextModel keys have no `text_model.` prefix
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    embeddings = model.text_model.embeddings if with_projection else model.embeddings
    embeddings.position_ids = torch.arange(hf_cfg.max_position_embeddings)[None]  # a non-persistent buffer
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the real Stable Diffusion configs ----------------------------------------------------------------

@pytest.mark.slow
def test_sd15_matches_transformers():
    cfg = preset("sd15").text_encoder
    sd = text_state_dict_from_transformers(random_state_dict(cfg), cfg)
    ours = ours_from(sd, cfg)
    hf = hf_from(text_state_dict_to_transformers(ours.state_dict(), cfg), text_config_to_transformers(cfg))
    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        out = ours(ids)
        skip2 = ours(ids, skip_layers=1, output_pooled=False)  # A1111 "clip skip 2"
        ref = hf(ids, output_hidden_states=True)
    assert out.hidden.shape == (2, 77, 768) and out.pooled.shape == (2, 768) and skip2.pooled is None
    assert max_diff(out.hidden, ref.last_hidden_state) < TOL
    assert max_diff(out.pooled, ref.pooler_output) < TOL
    assert max_diff(skip2.hidden, hf.final_layer_norm(ref.hidden_states[-2])) < TOL
    assert max_diff(out.hidden, skip2.hidden) > 0.1  # the two layers differ: the comparison above means something
    del ours, hf, sd
    gc.collect()


@pytest.mark.slow
def test_sd21_matches_transformers():
    """OpenCLIP ViT-H: our 24-layer penultimate output against a 23-layer CLIPTextModel (diffusers' SD 2)."""
    cfg = preset("sd21").text_encoder
    sd = text_state_dict_from_openclip(text_state_dict_to_openclip(random_state_dict(cfg, seed=1), cfg), cfg)
    ours = ours_from(sd, cfg)
    ids = CLIPTokenizer(pad_token_id=cfg.pad_token_id)(PROMPTS)
    assert ids[0, -1] == 0 and ids[1, -1] == cfg.eos_token_id  # SD 2 pads with "!"; the long prompt is cut
    with torch.no_grad():
        out = ours(ids, output_pooled=False)  # skip_layers 1 from the config: 23 of 24 layers run
        last = ours(ids, skip_layers=0)
    assert out.hidden.shape == (2, 77, 1024) and out.pooled is None and last.pooled.shape == (2, 1024)

    full = hf_from(text_state_dict_to_transformers(sd, cfg), text_config_to_transformers(cfg))
    with torch.no_grad():
        ref = full(ids, output_hidden_states=True)
        penultimate = full.text_model.final_layer_norm(ref.hidden_states[-2])
    assert max_diff(last.hidden, ref.last_hidden_state) < TOL
    assert max_diff(last.pooled, ref.text_embeds) < TOL  # final layer, projected
    assert max_diff(out.hidden, penultimate) < TOL
    del full, ref
    gc.collect()

    dropped = text_config_to_transformers(cfg, drop_skipped_layers=True)
    assert dropped["num_hidden_layers"] == 23 and dropped["architectures"] == ["CLIPTextModel"]
    short = hf_from(text_state_dict_to_transformers(sd, cfg, drop_skipped_layers=True), dropped)
    with torch.no_grad():
        ref23 = short(ids)
    assert max_diff(out.hidden, ref23.last_hidden_state) < TOL
    assert max_diff(out.hidden, last.hidden) > 0.1
    del ours, short, sd
    gc.collect()


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_config_from_state_dict_and_from_transformers(name):
    cfg = preset(name).text_encoder
    meta = {k: torch.empty(s, device="meta") for k, s in expected_shapes(cfg).items()}
    if name == "sd15":
        assert text_config_from_state_dict(meta, "transformers") == cfg
        assert text_config_from_transformers(SD15_HF_CONFIG) == cfg
    else:
        assert text_config_from_state_dict(text_state_dict_to_openclip(meta, cfg), "openclip") == cfg
    assert text_config_from_transformers(text_config_to_transformers(cfg), skip_layers=cfg.skip_layers) == cfg


# --- tiny configs -------------------------------------------------------------------------------------

TINY = TextEncoderConfig(width=64, layers=3, heads=4, mlp_dim=128, projection_dim=48)


def test_transformers_round_trip_and_folder(tmp_path):
    """Our config.json + hub-layout safetensors load with transformers' from_pretrained and agree with us."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    for cfg in (TINY, dataclasses.replace(TINY, activation="gelu", pad_token_id=0, projection_dim=None)):
        sd = random_state_dict(cfg, seed=2)
        exported = text_state_dict_to_transformers(text_state_dict_from_transformers(sd, cfg), cfg)
        assert exported.keys() == sd.keys() and all(torch.equal(exported[k], sd[k]) for k in sd)
        unprefixed = {k.removeprefix("text_model."): v for k, v in sd.items() if k.startswith("text_model.")}
        if cfg.projection_dim is None:  # transformers 5 saves CLIPTextModel without the prefix, + position_ids
            imported = text_state_dict_from_transformers({**unprefixed, "embeddings.position_ids": None}, cfg)
            assert imported.keys() == sd.keys()
        folder = tmp_path / cfg.activation
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(text_config_to_transformers(cfg)))
        save_file(exported, str(folder / "model.safetensors"))
        from transformers import AutoModel

        hf = (CLIPTextModelWithProjection if cfg.projection_dim else AutoModel).from_pretrained(str(folder)).eval()
        ids = CLIPTokenizer(pad_token_id=cfg.pad_token_id)(PROMPTS)
        with torch.no_grad():
            out, ref = ours_from(sd, cfg)(ids), hf(ids)
        assert max_diff(out.hidden, ref.last_hidden_state) < TOL
        assert max_diff(out.pooled, ref.text_embeds if cfg.projection_dim else ref.pooler_output) < TOL
        assert text_config_from_transformers(json.loads((folder / "config.json").read_text())) == cfg


def test_openclip_round_trip_is_lossless():
    cfg = TINY
    sd = random_state_dict(cfg, seed=3)
    openclip = text_state_dict_to_openclip(sd, cfg)
    assert openclip["text_projection"].shape == (cfg.width, cfg.projection_dim)  # used as x @ P
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * cfg.width, cfg.width)
    x = torch.randn(2, cfg.width, generator=torch.Generator().manual_seed(0))
    projected = torch.nn.functional.linear(x, sd["text_projection.weight"])
    torch.testing.assert_close(x @ openclip["text_projection"], projected, rtol=1e-5, atol=1e-6)  # summation order
    back = text_state_dict_from_openclip({**openclip, "logit_scale": torch.tensor(4.6)}, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = text_state_dict_to_openclip(back, cfg)
    assert again.keys() == openclip.keys() and all(torch.equal(again[k], openclip[k]) for k in openclip)


def test_key_errors_list_offending_keys():
    cfg = TINY
    sd = random_state_dict(cfg)
    with pytest.raises(ValueError, match="missing text_model.encoder.layers.2.mlp.fc1.bias"):
        text_state_dict_from_transformers({k: v for k, v in sd.items() if "layers.2.mlp.fc1.bias" not in k}, cfg)
    with pytest.raises(ValueError, match="unknown vision_model.x"):
        text_state_dict_from_transformers({**sd, "vision_model.x": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="fc2.weight"):
        text_state_dict_from_transformers({**sd, "text_model.encoder.layers.0.mlp.fc2.weight": torch.zeros(3, 3)}, cfg)
    openclip = text_state_dict_to_openclip(sd, cfg)
    with pytest.raises(ValueError, match="transformer.resblocks.0.attn.weird"):
        text_state_dict_from_openclip({**openclip, "transformer.resblocks.0.attn.weird": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="missing text_projection.weight"):
        text_state_dict_from_openclip({k: v for k, v in openclip.items() if k != "text_projection"}, cfg)
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        text_config_from_transformers({**SD15_HF_CONFIG, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="layout 'ldm'"):
        text_config_from_state_dict(sd, "ldm")


def test_skip_layers_pooled_and_checkpointing():
    cfg = dataclasses.replace(TINY, projection_dim=None)
    torch.manual_seed(0)
    model = CLIPTextEncoder(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=4))
    ids = CLIPTokenizer()(["a red cube", "two blue spheres on a table"], max_length=12)
    out = model(ids, skip_layers=1)
    # the reference path written out: layer by layer, final LN on the output of layer (layers - skip)
    x = model.text_model.embeddings(ids)
    states = []
    for layer in model.text_model.encoder.layers:
        x = layer(x)
        states.append(model.text_model.final_layer_norm(x))
    assert torch.allclose(out.hidden, states[-2], atol=1e-6)
    first_end = [row.index(cfg.eos_token_id) for row in ids.tolist()]
    assert torch.allclose(out.pooled, states[-1][torch.arange(2), first_end], atol=1e-6)
    # causal: changing a later token leaves earlier positions alone
    changed = ids.clone()
    changed[:, 3] = 1000
    assert torch.allclose(model(changed).hidden[:, :3], model(ids).hidden[:, :3], atol=1e-6)

    model.train()
    loss = model(ids).hidden.square().mean() + model(ids).pooled.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.gradient_checkpointing = True
    loss_ckpt = model(ids).hidden.square().mean() + model(ids).pooled.sum()
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt, strict=True))

    with pytest.raises(ValueError, match="skip_layers 3"):
        model(ids, skip_layers=3)
    with pytest.raises(ValueError, match="78"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="activation 'relu'"):
        CLIPTextEncoder(dataclasses.replace(cfg, activation="relu"))


def test_pruned_vocabulary_keeps_outputs_and_zeroes_unknown_tokens(tmp_path):
    """Pruning to the tokens of some captions changes nothing for those captions, maps every other id to
    one zero row, survives save/load at a fraction of the size, and expands back exactly for export."""
    from daguerre.checkpoints import load_model, save_model
    from daguerre.checkpoints.diffusers_folder import load_diffusers, save_diffusers
    from daguerre.components import build_components
    from daguerre.models.text_encoder import expand_vocabulary, prune_vocabulary, unknown_token_ids

    comps = build_components(preset("tiny"), seed=0)
    full, tok = comps.text_encoder.eval(), comps.tokenizer
    captions = ["a red circle above a blue square", "a small green star"]
    keep = {i for c in captions for i in tok.encode(c)}
    pruned = prune_vocabulary(full, keep)
    cfg = pruned.config
    assert set(cfg.token_ids) == keep | {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}
    assert pruned.text_model.embeddings.token_embedding.weight.shape[0] == len(keep) + 3  # + bos/eos(=pad) + zero
    with torch.no_grad():
        ids = tok(captions + [""])
        assert torch.equal(pruned(ids).hidden, full(ids).hidden)
        other = tok(["a purple heart"])  # "purple" and "heart" are not kept
        unknown = unknown_token_ids(pruned, other[0].tolist())
        assert {tok.decode([i]) for i in unknown} == {"purple", "heart"}
        zeroed = full.text_model.embeddings.token_embedding.weight.clone()
        zeroed[unknown] = 0
        reference = CLIPTextEncoder(full.config).eval()
        reference.load_state_dict({**full.state_dict(), "text_model.embeddings.token_embedding.weight": zeroed})
        assert torch.allclose(pruned(other).hidden, reference(other).hidden, atol=1e-6)
        expanded = expand_vocabulary(pruned)
        assert expanded.config.token_ids is None
        assert torch.equal(expanded(other).hidden, pruned(other).hidden)
        again = prune_vocabulary(pruned, tok.encode("a red circle"))  # pruning a pruned encoder
        assert set(again.config.token_ids) < set(cfg.token_ids)
        short = tok(["a red circle"])
        assert torch.equal(again(short).hidden, pruned(short).hidden)

    small = dataclasses.replace(comps, config=dataclasses.replace(comps.config, text_encoder=cfg),
                                text_encoder=pruned)
    save_model(small, tmp_path / "pruned.safetensors")
    save_model(comps, tmp_path / "full.safetensors")
    saved = (tmp_path / "full.safetensors").stat().st_size - (tmp_path / "pruned.safetensors").stat().st_size
    assert saved >= (cfg.vocab_size - cfg.embedding_rows) * cfg.width * 4  # float32 rows
    loaded = load_model(tmp_path / "pruned.safetensors")
    assert loaded.config.text_encoder.token_ids == cfg.token_ids
    save_diffusers(small, tmp_path / "diffusers")  # transformers needs a row per id: exported expanded
    exported = load_diffusers(tmp_path / "diffusers")
    assert exported.config.text_encoder.token_ids is None
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder(other).hidden, pruned(other).hidden, atol=1e-6)
        assert torch.allclose(exported.text_encoder(other).hidden, pruned(other).hidden, atol=1e-6)
    with pytest.raises(ValueError, match="token_ids"):
        CLIPTextEncoder(dataclasses.replace(cfg, token_ids=(5, 5)))


def test_unknown_words_are_reported_when_a_prompt_is_encoded(caplog):
    from daguerre.components import build_components
    from daguerre.models.text_encoder import prune_vocabulary
    from daguerre.pipelines.prompts import encode_weighted

    comps = build_components(preset("tiny"), seed=0)
    pruned = prune_vocabulary(comps.text_encoder, comps.tokenizer.encode("a red circle"))
    with caplog.at_level("WARNING", logger="daguerre"), torch.no_grad():
        encode_weighted(pruned, comps.tokenizer, ["a red circle"], skip_layers=0)
        assert not caplog.records
        encode_weighted(pruned, comps.tokenizer, ["a red dragon"], skip_layers=0)
    assert "'dragon'" in caplog.text and "'red'" not in caplog.text


def test_bidirectional_encoder_lets_early_tokens_see_later_ones_and_round_trips(tmp_path):
    """causal = False: the first words' states depend on the words after them (a causal encoder's do not),
    the flag survives save/load, and the diffusers export, whose CLIPTextModel is causal, refuses."""
    from daguerre.checkpoints import load_model, save_model
    from daguerre.checkpoints.diffusers_folder import save_diffusers
    from daguerre.components import build_components

    comps = build_components(preset("tiny"), seed=0)
    causal, tok = comps.text_encoder.eval(), comps.tokenizer
    cfg = dataclasses.replace(causal.config, causal=False)
    both = CLIPTextEncoder(cfg).eval()
    both.load_state_dict(causal.state_dict())
    ids = tok(["a red circle above a blue square", "a red circle below a blue square"])
    first = slice(0, 4)  # <start> a red circle: the same words in both prompts
    with torch.no_grad():
        h_causal, h_both = causal(ids).hidden, both(ids).hidden
    assert torch.equal(h_causal[0, first], h_causal[1, first])
    assert (h_both[0, first] - h_both[1, first]).abs().max() > 1e-4
    model = dataclasses.replace(comps, config=dataclasses.replace(comps.config, text_encoder=cfg), text_encoder=both)
    save_model(model, tmp_path / "both.safetensors")
    loaded = load_model(tmp_path / "both.safetensors")
    assert loaded.config.text_encoder.causal is False
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder(ids).hidden, h_both, atol=1e-6)
    with pytest.raises(ValueError, match="bidirectional"):
        save_diffusers(model, tmp_path / "diffusers")
