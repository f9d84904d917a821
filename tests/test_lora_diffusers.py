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
