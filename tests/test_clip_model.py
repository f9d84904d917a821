"""daguerre's CLIP against transformers' `CLIPModel` on identical random weights, at the real ViT-B/32 and
ViT-L/14 configurations, the weights reaching daguerre through its loaders: a transformers folder
(`save_pretrained`) and an OpenCLIP-named file (converted here with this file's own key mapping; the
open_clip package itself cannot be imported: it needs torchvision). Embeddings and logits within 1e-4.
Also the image preprocessing against transformers' `CLIPImageProcessor`."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.checkpoints.clip_file import load_clip, read_clip
from daguerre.config import CLIPConfig, clip_preset
from daguerre.models.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROMPTS = ["a photo of a red circle above a blue square", "a diagram"]


def hf_config(cfg: CLIPConfig):
    """transformers' CLIPConfig of a daguerre CLIPConfig, field by field."""
    t, v = cfg.text_encoder, cfg.vision
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_length,
                         hidden_act=t.activation, layer_norm_eps=t.layer_norm_eps, bos_token_id=t.bos_token_id,
                         eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, projection_dim=t.projection_dim),
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, num_channels=v.channels, image_size=v.image_size,
                           patch_size=v.patch_size, hidden_act=v.activation, layer_norm_eps=v.layer_norm_eps,
                           projection_dim=t.projection_dim),
        projection_dim=t.projection_dim, logit_scale_init_value=cfg.logit_scale_init,
    )


def random_hf_clip(cfg: CLIPConfig, seed: int = 0):
    """A transformers CLIPModel at `cfg` with random weights: built on the meta device (transformers' own
    initialisation takes ~10 s at ViT-L/14), then matrices N(0, 0.02) and the 1-d parameters (LayerNorms,
    biases, class token) random around their usual values, so that every tensor's mapping matters."""
    with torch.device("meta"):
        model = transformers.CLIPModel(hf_config(cfg))
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():  # to_empty left them unset
            if not name.endswith("position_ids"):
                raise AssertionError(f"unexpected transformers buffer {name}: set it here")
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        model.logit_scale.fill_(2.3)
    return model


def to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names for a transformers CLIPModel state dict (the test's own mapping, written out)."""
    out = {"logit_scale": sd["logit_scale"], "text_projection": sd["text_projection.weight"].T.contiguous(),
           "visual.proj": sd["visual_projection.weight"].T.contiguous()}
    top = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    out.update({k: sd[v] for k, v in top.items()})
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for tower, ours in (("", "text_model"), ("visual.", "vision_model")):
        layers = {int(k.split(".")[3]) for k in sd if k.startswith(f"{ours}.encoder.layers.")}
        for i in layers:
            src, dst = f"{ours}.encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
            for a, b in block.items():
                out[f"{dst}{a}.weight"] = sd[f"{src}{b}.weight"]
                out[f"{dst}{a}.bias"] = sd[f"{src}{b}.bias"]
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
    return out


def reference_outputs(hf, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' embeddings (get_image_features / get_text_features) and logits (its forward)."""
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels)
        image = hf.get_image_features(pixel_values=pixels)
        text = hf.get_text_features(input_ids=ids)
    return {"image": getattr(image, "pooler_output", image), "text": getattr(text, "pooler_output", text),
            "logits": out.logits_per_image}


def assert_matches(model, ref: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor) -> None:
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids)
        logits = model.logits(image, text)
    for name, ours in (("image", image), ("text", text), ("logits", logits)):
        err = (ours - ref[name]).abs().max().item()
        assert err <= TOL, f"{name} embeddings differ from transformers by {err:.2e}"


def inputs(cfg: CLIPConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = CLIPTokenizer()(PROMPTS[:batch])
    return pixels, ids


def save_openclip(sd: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_openclip(sd).items()}, str(path))


def test_vit_b_32_matches_transformers_through_both_loaders(tmp_path):
    cfg = clip_preset("clip-vit-b-32")
    hf = random_hf_clip(cfg)
    pixels, ids = inputs(cfg, 2)
    ref = reference_outputs(hf, pixels, ids)
    hf.save_pretrained(tmp_path / "hf")
    save_openclip(hf.state_dict(), tmp_path / "openclip.safetensors")
    del hf
    gc.collect()
    folder = load_clip(tmp_path / "hf")
    assert_matches(folder, ref, pixels, ids)
    assert folder.clip_config.vision == cfg.vision  # the config read from config.json
    del folder
    # the OpenCLIP file states no config: every field read from the shapes, the activation told
    openclip = load_clip(tmp_path / "openclip.safetensors", activation="quick_gelu")
    assert openclip.clip_config.vision == cfg.vision
    assert_matches(openclip, ref, pixels, ids)


@pytest.mark.slow
def test_vit_l_14_matches_transformers_through_both_loaders(tmp_path):
    """One forward at batch 1 (the 428M-parameter model is slow on a CPU), the files in fp16 (the values
    fp16-exact, the forwards in fp32); the OpenCLIP file's weights and config are shown equal to the
    folder's, which makes the same forward."""
    cfg = clip_preset("clip-vit-l-14")
    hf = random_hf_clip(cfg, seed=3).half()  # files in fp16 (half the disk traffic), exact in fp32
    save_openclip(hf.state_dict(), tmp_path / "openclip.safetensors")
    hf.save_pretrained(tmp_path / "hf")
    hf = hf.float()
    pixels, ids = inputs(cfg, 1)
    ref = reference_outputs(hf, pixels, ids)
    del hf
    gc.collect()
    folder = load_clip(tmp_path / "hf")
    assert folder.clip_config.vision == cfg.vision
    assert_matches(folder, ref, pixels, ids)
    ours = folder.state_dict()
    del folder
    gc.collect()
    weights = read_clip(tmp_path / "openclip.safetensors", activation="quick_gelu")  # as stored: fp16
    assert weights.config.vision == cfg.vision
    t, want = weights.config.text_encoder, cfg.text_encoder
    assert (t.width, t.layers, t.heads, t.mlp_dim, t.projection_dim, t.activation, t.skip_layers) == (
        want.width, want.layers, want.heads, want.mlp_dim, want.projection_dim, want.activation, 0)
    assert set(weights.state_dict) == set(ours)
    for k, v in weights.state_dict.items():
        assert torch.equal(v.float(), ours[k]), k


def test_preprocess_matches_clip_image_processor():
    """`CLIPModel.preprocess` (torch, differentiable: antialiased bicubic on floats) against transformers'
    CLIPImageProcessor (PIL bicubic, rounded to 8 bits) on a 320 x 240 image: the same resize of the shorter
    side to 224 (the longer to int(224 * 320 / 240) = 298, truncated as torchvision's Resize does), centre
    crop and normalisation. What remains is the 8-bit rounding and the two bicubic kernels: measured 0.011
    at most and 0.003 on average in normalised units (under 1/255 in pixels); held to 0.02 and 0.005.
    A 299-pixel resize (rounding instead of truncating) is 0.085 at most, 0.013 on average: caught."""
    from daguerre.models.clip import CLIPModel

    cfg = clip_preset("clip-vit-b-32")
    with torch.device("meta"):
        model = CLIPModel(cfg)
    model.image_mean = torch.tensor(cfg.image_mean).view(1, -1, 1, 1)
    model.image_std = torch.tensor(cfg.image_std).view(1, -1, 1, 1)
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([128 + 100 * np.sin(x / 17.0), 128 + 100 * np.cos(y / 11.0), (x + y) * 255 / 560], -1)
    image = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    processor = transformers.CLIPImageProcessorPil(  # CLIPImageProcessor's backend without torchvision
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std))
    theirs = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = model.preprocess(pixels)
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    diff = (ours - theirs).abs()
    assert diff.max().item() < 0.02 and diff.mean().item() < 0.005, (diff.max().item(), diff.mean().item())
