"""LoRA merging against diffusers: on small SD 1.5- and SD 2.1-architecture models (tests/lora_oracle.py: the real
configs, narrower) with random LoRAs in the kohya / A1111 and the diffusers / PEFT formats on the U-Net (attention,
feed-forward, projections, ResNet 3x3 convolutions and shortcuts, down/upsamplers: LoCon) and the text encoder,
daguerre's merged weights equal those of diffusers' `load_lora_weights` followed by `fuse_lora`."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from daguerre.checkpoints.unet_keys import unet_state_dict_to_diffusers
from daguerre.lora.apply import merge_loras
from lora_oracle import daguerre_components, reference_models

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TOL = 1e-5
RANK, ALPHA = 4, 2.0


def random_lora(unet, text, fmt: str, seed: int = 5) -> dict[str, torch.Tensor]:
    """A rank-RANK LoRA of every adaptable layer of the reference networks, named as `fmt` ("kohya" / "peft")
    files name them: kohya `lora_unet_<diffusers name>` / `lora_te_text_model_<name>` with lora_down, lora_up and
    alpha; PEFT `unet.<name>` / `text_encoder.text_model.<name>` with lora_A and lora_B."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    layers = [("unet", n, m) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(s in n for s in ("attentions", "resnets",
                                                                                            "samplers"))]
    layers += [("te", n, m) for n, m in text.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    for part, name, module in layers:
        w = module.weight
        kernel = tuple(w.shape[2:])
        down = torch.randn(RANK, w.shape[1], *kernel, generator=gen) * 0.1
        up = torch.randn(w.shape[0], RANK, *((1, 1) if kernel else ()), generator=gen) * 0.1
        if fmt == "kohya":
            base = ("lora_unet_" + name if part == "unet" else "lora_te_text_model_" + name).replace(".", "_")
            sd |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(ALPHA)}
        else:
            base = ("unet." if part == "unet" else "text_encoder.text_model.") + name
            sd |= {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up}
    return sd


def diffusers_fused(unet, text, lora: dict[str, torch.Tensor], scale: float):
    """The (U-Net, text encoder) state dicts of diffusers' load_lora_weights + fuse_lora(lora_scale=scale)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from clip_oracle import hf_clip_tokenizer

    vae = AutoencoderKL(block_out_channels=[32], latent_channels=4, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=hf_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights({k: v.clone() for k, v in lora.items()})
    pipe.fuse_lora(lora_scale=scale)

    def plain(module):
        return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    return plain(pipe.unet), plain(pipe.text_encoder)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def models(request):
    return request.param, *reference_models(request.param)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_merged_weights_equal_diffusers_fuse_lora(models, fmt, tmp_path):
    model, unet, text = models
    comps = daguerre_components(model, unet, text)
    lora = random_lora(unet, text, fmt)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(lora, str(path))
    ref_unet, ref_text = diffusers_fused(copy.deepcopy(unet), copy.deepcopy(text), lora, 0.7)

    merge_loras(comps, [(path, 0.7)])

    mine = unet_state_dict_to_diffusers(comps.unet.state_dict(), comps.config.unet)
    assert set(mine) == set(ref_unet)
    changed = [k for k in mine if not torch.equal(ref_unet[k], unet.state_dict()[k])]
    assert len(changed) > 200  # the LoRA reached attention, feed-forward and convolution layers
    for k in mine:
        assert torch.allclose(mine[k].reshape(ref_unet[k].shape), ref_unet[k], atol=TOL, rtol=0), k
    text_sd = {k.removeprefix("text_model."): v for k, v in comps.text_encoder.state_dict().items()}
    changed = [k for k in ref_text if not torch.equal(ref_text[k], text.state_dict()[k])]
    assert len(changed) == 2 * 6  # q, k, v, out, fc1, fc2 of both layers
    for k in ref_text:
        assert torch.allclose(text_sd[k], ref_text[k], atol=TOL, rtol=0), k


def renamed(lora: dict[str, torch.Tensor], unet, text, comps, style: str) -> dict[str, torch.Tensor]:
    """The kohya LoRA `lora` under another naming of the same layers: kohya keys made from the CompVis names
    (`lora_unet_input_blocks_1_1_...`) and `lora_te1_`; or the older diffusers attention-processor keys
    (`unet.<...>.attn1.processor.to_q_lora.down.weight`, `text_encoder.<...>.q_proj.lora_linear_layer.up.weight`,
    alpha / rank folded into `up`) for the layers they cover and PEFT keys under PEFT's `base_model.model.` wrapper
    for the rest."""
    from daguerre.checkpoints.unet_keys import _key_table

    layers = (torch.nn.Linear, torch.nn.Conv2d)
    dotted = {"lora_unet_" + n.replace(".", "_"): ("unet", n) for n, m in unet.named_modules() if isinstance(m, layers)}
    dotted |= {"lora_te_text_model_" + n.replace(".", "_"): ("text", "text_model." + n)
               for n, m in text.named_modules() if isinstance(m, layers)}
    table = _key_table(comps.config.unet)[0]
    compvis_of = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in table.items()}
    processors = {".to_q": "to_q", ".to_k": "to_k", ".to_v": "to_v", ".to_out.0": "to_out"}
    out = {}
    for key, value in lora.items():
        base, _, suffix = key.partition(".")
        part, name = dotted[base]
        if style == "compvis":
            base = ("lora_unet_" + compvis_of[name] if part == "unet" else "lora_te1_" + name).replace(".", "_")
            out[f"{base}.{suffix}"] = value
            continue
        if suffix == "alpha":
            continue
        role = {"lora_down.weight": "down", "lora_up.weight": "up"}[suffix]
        value = value * (ALPHA / RANK) if role == "up" else value
        proc = next((p for end, p in processors.items() if name.endswith(end) and ".attn" in name), None)
        if part == "text":
            out[f"text_encoder.{name}.lora_linear_layer.{role}.weight"] = value
        elif proc is not None:
            stem = name.rsplit(".to_", 1)[0]
            out[f"unet.{stem}.processor.{proc}_lora.{role}.weight"] = value
        else:
            out[f"base_model.model.unet.{name}.lora_{'A' if role == 'down' else 'B'}.weight"] = value
    return out


@pytest.mark.parametrize("style", ["compvis", "old_diffusers"])
def test_other_namings_of_the_same_lora_merge_the_same(style, tmp_path):
    """kohya keys from CompVis names and `lora_te1_`; the older diffusers attention-processor keys with PEFT's
    wrapper for the rest: the same tensors merge into the same weights as the kohya file."""
    unet, text = reference_models("sd15")
    lora = random_lora(unet, text, "kohya")
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    expected = daguerre_components("sd15", unet, text)
    merge_loras(expected, [(tmp_path / "kohya.safetensors", 0.9)])
    comps = daguerre_components("sd15", unet, text)
    other = renamed(lora, unet, text, comps, style)
    assert not set(other) & set(lora)
    save_file(other, str(tmp_path / f"{style}.safetensors"))
    merge_loras(comps, [(tmp_path / f"{style}.safetensors", 0.9)])
    for mine, theirs in ((comps.unet, expected.unet), (comps.text_encoder, expected.text_encoder)):
        ref = theirs.state_dict()
        for k, v in mine.state_dict().items():
            assert torch.allclose(v, ref[k], atol=1e-6, rtol=0), k
