"""The noise-aware CLIP (issue 16; models/noisy_clip.py, guidance.noisy_clip_guided_denoiser, training/noisy_clip.py):
its shapes and sigma conditioning, the guidance step and its direction, the refusal of another model's latents,
scale 0 as the unguided path, the file round trip, `daguerre info`, eval, and a tiny training run. Tiny random
models only (random:tiny saved with a recorded autoencoder, tiny CLIPs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import daguerre
from daguerre.checkpoints.clip_file import describe_clip, load_clip, reads_latents, save_clip
from daguerre.checkpoints.single_file import save_model
from daguerre.config import CLIPConfig, LatentSpaceConfig, TextEncoderConfig, VisionConfig, preset
from daguerre.guidance import noisy_clip_guided_denoiser, spherical_distance
from daguerre.models.clip import CLIPModel, init_clip_
from daguerre.models.noisy_clip import NoisyCLIPModel, check_latent_space, init_noise_embedding_
from daguerre.pipelines.common import text_embedding

PROMPT = "a red circle"
VAE_SHA = "ab" * 32  # the autoencoder the tiny diffusion model "was trained on"
TEXT = TextEncoderConfig(width=32, layers=1, heads=2, mlp_dim=64, projection_dim=16, max_length=40)


def _space(**changes) -> LatentSpaceConfig:
    base = LatentSpaceConfig(model="tiny-latents", vae_sha256=VAE_SHA, scale_factor=1.0, sigma_min=0.03,
                             sigma_max=80.0)
    return dataclasses.replace(base, **changes)


def _noisy_clip(seed: int = 0, **space) -> NoisyCLIPModel:
    cfg = CLIPConfig(name="tiny-noisy-clip", text_encoder=TEXT,
                     vision=VisionConfig(image_size=16, patch_size=2, channels=4, width=32, layers=1, heads=2,
                                         mlp_dim=64),
                     image_mean=(0.0,) * 4, image_std=(1.0,) * 4, image_input="latents", latent_space=_space(**space))
    model = NoisyCLIPModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    init_clip_(model, gen)
    init_noise_embedding_(model, gen)
    with torch.no_grad():  # as a trained model, the tower reads sigma (its initialisation starts blind to it)
        model.noise_embedding.linear_2.weight.normal_(0, 0.2, generator=gen)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def noisy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("noisy") / "tiny-noisy-clip.safetensors"
    save_clip(_noisy_clip(), path)
    return str(path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """random:tiny saved as a file whose provenance names the autoencoder VAE_SHA (as a trained model's does)."""
    pipe = daguerre.load("random:tiny", dtype="fp32")
    pipe.components.config.provenance["vae_sha256"] = VAE_SHA
    pipe.components.config.name = "tiny-latents"
    path = tmp_path_factory.mktemp("model") / "tiny-latents.safetensors"
    save_model(pipe.components, path)
    return str(path)


@pytest.fixture(scope="module")
def pipe(model_file):
    return daguerre.load(model_file, dtype="fp32")


# --- the model -----------------------------------------------------------------------------------------

def test_latents_and_sigma_in_embeddings_out():
    clip = _noisy_clip()
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = clip.encode_latents(x, torch.tensor([0.5, 2.0, 10.0]))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    same = clip.encode_latents(x, 2.0)  # a number is every image's sigma
    assert torch.allclose(same[1], out[1], atol=1e-5)
    assert not torch.allclose(same[0], out[0], atol=1e-3)  # the tower reads the noise level, not only x
    zero = clip.encode_latents(x, 0.0)  # sigma 0 reads as the smallest sigma
    assert torch.allclose(zero, clip.encode_latents(x, 0.03), atol=1e-5)


def test_the_tower_reads_x_over_sqrt_sigma_squared_plus_sigma_data_squared():
    """With the noise embedding silenced, x and sigma enter only as x / sqrt(sigma^2 + 1) (EDM's c_in)."""
    clip = _noisy_clip()
    with torch.no_grad():
        clip.noise_embedding.linear_2.weight.zero_()
        clip.noise_embedding.linear_2.bias.zero_()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    a, b = clip.encode_latents(x * np.sqrt(5.0), 2.0), clip.encode_latents(x * np.sqrt(2.0), 1.0)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, clip.encode_latents(x, 1.0), atol=1e-3)


def test_initialisation_starts_blind_to_sigma():
    """What the tower adds to CLIP starts silent: the noise MLP's last layer is zero, so a tower taken from a pixel
    CLIP starts as that CLIP (training/noisy_clip.take_image_tower_)."""
    model = NoisyCLIPModel(_noisy_clip().clip_config)
    init_noise_embedding_(model, torch.Generator().manual_seed(0))
    assert not model.noise_embedding(torch.tensor([0.1, 10.0])).any()
    assert model.vision_model.embeddings.patch_embedding.conv_in.weight.std() > 0


def test_noise_embedding_distinguishes_levels():
    clip = _noisy_clip()
    e = clip.noise_embedding(torch.tensor([0.1, 0.1, 1.0, 10.0]))
    assert torch.equal(e[0], e[1]) and not torch.allclose(e[1], e[2]) and not torch.allclose(e[2], e[3])


def _with_stem(blocks: int, stem_width: int) -> CLIPConfig:
    cfg = _noisy_clip().clip_config
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem_blocks=blocks, stem_width=stem_width))


def test_stem_blocks_start_as_the_one_convolution_stem_then_read_sigma():
    """vision.stem_blocks: residual blocks at the latent resolution whose second convolution starts at zero, so an
    initialised stem with blocks computes what the stem without them does (the same other weights); once trained
    (their convolutions non-zero) they change the embedding and take the noise embedding (its projection gets a
    gradient)."""
    plain = _noisy_clip()
    deep = NoisyCLIPModel(_with_stem(2, 0))
    init_noise_embedding_(deep, torch.Generator().manual_seed(3))
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".patch_embedding.blocks." in k for k in missing)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.5, 3.0])
    assert torch.allclose(deep.encode_latents(x, sigma), plain.encode_latents(x, sigma), atol=1e-6)
    block = deep.vision_model.embeddings.patch_embedding.blocks[1]
    with torch.no_grad():
        block.conv2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    out = deep.encode_latents(x, sigma)
    assert not torch.allclose(out, plain.encode_latents(x, sigma), atol=1e-4)
    out.pow(2).sum().backward()
    assert block.emb_proj.weight.grad.abs().sum() > 0


def test_stem_blocks_round_trip_through_the_file(tmp_path):
    clip = NoisyCLIPModel(_with_stem(2, 16))
    gen = torch.Generator().manual_seed(6)
    init_clip_(clip, gen)
    init_noise_embedding_(clip, gen)
    with torch.no_grad():
        for block in clip.vision_model.embeddings.patch_embedding.blocks:
            block.conv2.weight.normal_(0, 0.1, generator=gen)
    assert clip.vision_model.embeddings.patch_embedding.conv_in.out_channels == 16
    path = tmp_path / "deep.safetensors"
    save_clip(clip, path)
    loaded = load_clip(path)
    assert loaded.clip_config.vision.stem_blocks == 2 and loaded.clip_config == clip.clip_config
    assert "vision_model.embeddings.patch_embedding.blocks.1.conv2.weight" in loaded.state_dict()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded.encode_latents(x, 2.0), clip.encode_latents(x, 2.0))


def test_stem_settings_are_checked():
    with pytest.raises(ValueError, match="config key model.vision.stem_width: 12 is not a multiple of 8"):
        NoisyCLIPModel(_with_stem(1, 12))
    with pytest.raises(ValueError, match="config key model.vision.stem_width: 16 without stem_blocks"):
        NoisyCLIPModel(_with_stem(0, 16))
    pixel = CLIPConfig(name="p", text_encoder=TEXT, vision=VisionConfig(image_size=16, patch_size=4, width=32,
                                                                         layers=1, heads=2, mlp_dim=64))
    with pytest.raises(ValueError, match="config key vision.stem_blocks: 2, but .* noise-aware"):
        CLIPConfig.from_dict({**pixel.to_dict(), "vision": {**pixel.to_dict()["vision"], "stem_blocks": 2}})
    with pytest.raises(ValueError, match=r"config key vision.stem_blocks: 17 is out of range \(0..16\)"):
        CLIPConfig.from_dict({**_noisy_clip().clip_config.to_dict(),
                              "vision": {**pixel.to_dict()["vision"], "channels": 4, "stem_blocks": 17}})


@pytest.mark.parametrize(("x", "sigma", "words"), [
    (torch.zeros(2, 3, 16, 16), 1.0, ["(batch, 4, 16, 16)", "(2, 3, 16, 16)"]),
    (torch.zeros(2, 4, 8, 8), 1.0, ["(2, 4, 8, 8)"]),
    (torch.zeros(2, 4, 16, 16), torch.ones(3), ["3 sigmas", "batch of 2"]),
])
def test_wrong_latents_are_named(x, sigma, words):
    with pytest.raises(ValueError) as e:
        _noisy_clip().encode_latents(x, sigma)
    for word in words:
        assert word in str(e.value)


def test_it_reads_no_pixels():
    clip = _noisy_clip()
    for call in (clip.preprocess, clip.encode_image):
        with pytest.raises(ValueError, match="noise-aware"):
            call(torch.zeros(1, 3, 32, 32))


def test_config_needs_its_latent_space():
    cfg = _noisy_clip().clip_config
    with pytest.raises(ValueError, match="latent_space"):
        CLIPConfig.from_dict({**cfg.to_dict(), "latent_space": None})
    with pytest.raises(ValueError, match="latent_space"):
        CLIPConfig.from_dict({**cfg.to_dict(), "image_input": "pixels"})
    with pytest.raises(ValueError, match="sigma"):
        CLIPConfig.from_dict({**cfg.to_dict(), "latent_space": {**dataclasses.asdict(cfg.latent_space),
                                                                "sigma_min": 5.0, "sigma_max": 1.0}})


# --- the file ------------------------------------------------------------------------------------------

def test_save_load_round_trip(noisy_file, tmp_path):
    clip = _noisy_clip()
    loaded = load_clip(noisy_file)
    assert isinstance(loaded, NoisyCLIPModel) and loaded.clip_config == clip.clip_config
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode_latents(x, 3.0), clip.encode_latents(x, 3.0))
    assert reads_latents(noisy_file)
    pixel = tmp_path / "pixel.safetensors"
    save_clip(init_clip_(CLIPModel(CLIPConfig(name="p", text_encoder=TEXT, vision=VisionConfig(
        image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64)))), pixel)
    assert not reads_latents(pixel) and not isinstance(load_clip(pixel), NoisyCLIPModel)
    half = tmp_path / "half.safetensors"
    save_clip(clip, half, dtype=torch.float16)
    again = load_clip(half)
    assert torch.allclose(again.encode_latents(x, 3.0), clip.encode_latents(x, 3.0), atol=5e-2)


def test_info_describes_the_latent_space(noisy_file, capsys):
    from daguerre.cli import main

    info = describe_clip(noisy_file)
    assert info["image_input"] == "latents" and info["latent_space"]["vae_sha256"] == VAE_SHA
    assert info["parameters"]["vision"] > sum(p.numel() for p in _noisy_clip().noise_embedding.parameters())
    assert main(["info", noisy_file]) == 0
    out = capsys.readouterr().out
    assert "noise-aware" in out and "tiny-latents" in out and VAE_SHA[:16] in out


# --- the guidance -----------------------------------------------------------------------------------------

def _gaussian_denoiser(x, sigma, cond=None):
    """The optimal denoiser of N(0, I) data: x / (1 + sigma^2)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2)


def _loss(clip, x, sigma, target):
    return spherical_distance(clip.encode_latents(x, sigma), target).sum()


def test_scale_zero_returns_the_denoiser_itself():
    assert noisy_clip_guided_denoiser(_gaussian_denoiser, _noisy_clip(), torch.ones(1, 16), scale=0) is \
        _gaussian_denoiser


def test_the_step_is_sigma_squared_times_the_gradient_and_clamped():
    clip = _noisy_clip()
    target = text_embedding(clip, PROMPT)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.5, 2.0])
    x_in = x.clone().requires_grad_()
    grad = torch.autograd.grad(3.0 * _loss(clip, x_in, sigma, target), x_in)[0]
    expected = _gaussian_denoiser(x, sigma) - sigma.view(-1, 1, 1, 1) ** 2 * grad
    guided = noisy_clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=3.0, clamp=1e6)
    assert torch.allclose(guided(x, sigma), expected, atol=1e-5)
    tight = noisy_clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=3.0, clamp=1e-4)
    step = _gaussian_denoiser(x, sigma) - tight(x, sigma)
    rms = step.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.full((2,), 1e-4), rtol=1e-3)  # clamped, direction kept
    assert torch.nn.functional.cosine_similarity(step.flatten(1), (expected - _gaussian_denoiser(x, sigma)).neg()
                                                 .flatten(1)).min() > 0.999
    assert torch.equal(guided(x, 0.0), _gaussian_denoiser(x, 0.0))  # sigma 0: not guided


def test_the_guided_step_brings_the_noisy_latents_closer_to_the_text():
    """Moving x along x0' - x0 (the guidance step) lowers the noisy CLIP's distance to the text, at every level."""
    clip = _noisy_clip(seed=4)
    target = text_embedding(clip, PROMPT)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    guided = noisy_clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=1.0, clamp=1e6)
    for sigma in (0.3, 3.0, 30.0):
        step = guided(x, sigma) - _gaussian_denoiser(x, sigma)
        moved = x + 1e-2 * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert _loss(clip, moved, sigma, target) < _loss(clip, x, sigma, target), sigma


def test_a_mismatched_model_is_refused_in_one_line():
    clip = _noisy_clip()
    model = preset("tiny")
    with pytest.raises(ValueError) as e:  # no recorded autoencoder (random weights)
        check_latent_space(clip.clip_config, model, "random:tiny", (16, 16))
    text = str(e.value)
    assert "noise-aware" in text and "random:tiny" in text and "unknown" in text and "\n" not in text
    model.provenance["vae_sha256"] = "cd" * 32
    with pytest.raises(ValueError, match="another autoencoder"):
        check_latent_space(clip.clip_config, model, "other", (16, 16))
    model.provenance["vae_sha256"] = VAE_SHA
    check_latent_space(clip.clip_config, model, "tiny-latents", (16, 16))
    learnt_on = _noisy_clip(model_sha256="ef" * 32).clip_config  # the CLIP learnt the latents of model file ef..
    model.provenance["vae_sha256"] = "ef" * 32  # a fine-tune that read its autoencoder from that model file
    check_latent_space(learnt_on, model, "fine-tune", (16, 16))
    with pytest.raises(ValueError, match="another autoencoder"):
        check_latent_space(clip.clip_config, model, "fine-tune", (16, 16))  # a CLIP that names no such model
    model.provenance["vae_sha256"] = VAE_SHA
    with pytest.raises(ValueError, match="scales its latents"):
        check_latent_space(clip.clip_config, dataclasses.replace(model, vae=dataclasses.replace(
            model.vae, scale_factor=0.5)), "x", (16, 16))
    with pytest.raises(ValueError, match="generate at 32x32"):
        check_latent_space(clip.clip_config, model, "tiny-latents", (24, 24))


def test_the_pipeline_refuses_another_models_latents(noisy_file):
    plain = daguerre.load("random:tiny", dtype="fp32")
    with pytest.raises(ValueError, match="noise-aware CLIP of model tiny-latents"):
        plain(PROMPT, steps=2, clip_guidance=100, clip_model=noisy_file)


def test_scale_zero_is_the_unguided_image_and_guidance_changes_it(pipe, noisy_file):
    plain = pipe(PROMPT, steps=3, seed=2, cfg_scale=0)
    off = pipe(PROMPT, steps=3, seed=2, cfg_scale=0, clip_guidance=0, clip_model=noisy_file)
    assert np.array_equal(np.asarray(plain[0].image), np.asarray(off[0].image))
    assert plain[0].parameters == off[0].parameters
    guided = pipe(PROMPT, steps=3, seed=2, cfg_scale=0, clip_guidance=500, clip_model=noisy_file)
    assert not np.array_equal(np.asarray(plain[0].image), np.asarray(guided[0].image))
    assert f"CLIP guidance: 500, CLIP model: {noisy_file}" in guided[0].parameters
    with pytest.raises(ValueError, match="generate at 32x32"):
        pipe(PROMPT, steps=2, width=48, height=48, clip_guidance=100, clip_model=noisy_file)


def test_a_seed_gives_the_same_guided_image_in_any_batch(pipe, noisy_file):
    kw = dict(steps=3, sampler="Euler a", clip_guidance=500, clip_model=noisy_file)
    two = pipe(PROMPT, seed=5, n=2, batch_size=2, **kw)
    alone = pipe(PROMPT, seed=6, **kw)
    assert np.abs(np.asarray(two[1].image).astype(int) - np.asarray(alone[0].image).astype(int)).max() <= 1


def test_the_default_guide_of_a_model(monkeypatch, noisy_file):
    from daguerre import registry
    from daguerre.pipelines.request import GenerationRequest

    shapes = preset("tiny")
    shapes.name = "shapes"
    monkeypatch.setattr(registry, "shipped_clips", lambda: {"shapes-clip": noisy_file})
    assert GenerationRequest(prompt=PROMPT, clip_guidance=1).validate(shapes).clip_model == "shapes-clip"
    monkeypatch.setattr(registry, "shipped_clips", lambda: {"shapes-clip": noisy_file,
                                                           "shapes-noisy-clip": noisy_file})
    assert GenerationRequest(prompt=PROMPT, clip_guidance=1).validate(shapes).clip_model == "shapes-noisy-clip"


def test_eval_guides_with_it_and_scores_with_a_pixel_clip(model_file, noisy_file, tmp_path, capsys):
    from daguerre.cli import main

    base = ["eval", "--model", model_file, "--dataset", "shapes", "--prompts", "single", "--n", "2", "--steps",
            "2", "--real", "4", "--no-progress", "--cfg", "0", "--clip", noisy_file, "--out", str(tmp_path / "ev")]
    assert main([*base, "--clip-guidance", "300"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["settings"]["clip_guidance"]["clip_model"] == noisy_file and "clip_score" not in report
    capsys.readouterr()
    assert main([*base[:-1], str(tmp_path / "ev2")]) == 2  # scoring alone: it cannot
    err = capsys.readouterr().err
    assert "noise-aware" in err and len(err.strip().splitlines()) == 1


# --- the shipped shapes-noisy-clip ------------------------------------------------------------------------

SHIPPED_NOISY = "shapes-noisy-clip"


@pytest.fixture(scope="module")
def shipped_noisy():
    from daguerre.registry import open_clip, shipped_clips

    if SHIPPED_NOISY not in shipped_clips():
        pytest.skip("shapes-noisy-clip is not installed (make model-shapes-noisy-clip)")
    return open_clip(SHIPPED_NOISY)


def test_the_shipped_noisy_clip_reads_the_shipped_shapes_models_latents(shipped_noisy):
    """It loads as a noise-aware CLIP of the shipped shapes model, is that model's default guide, and reads
    held-out single objects at low noise (its card: shape and colour right in 91% at sigma 0.25; chance ~1%)."""
    from daguerre.registry import guide_for_model, open_model
    from daguerre.training.noisy_clip import noisy_zero_shot

    assert isinstance(shipped_noisy, NoisyCLIPModel) and guide_for_model("shapes") == SHIPPED_NOISY
    comps, _ = open_model("shapes", dtype="fp32")
    check_latent_space(shipped_noisy.clip_config, comps.config, "shapes", (16, 16))
    accuracy = noisy_zero_shot(shipped_noisy, "shapes", 32)
    assert accuracy["both_sigma_0.25"] >= 0.6 and accuracy["colour_sigma_1"] >= 0.6, accuracy


def test_the_shipped_noisy_clip_guides_the_shipped_model(shipped_noisy):
    """One guided step of the shipped model at --cfg 0 brings the latents closer to the prompt, as the shipped
    CLIP judges them (the direction `daguerre generate --model shapes --cfg 0 --clip-guidance` follows)."""
    pipe = daguerre.load("shapes", dtype="fp32")
    assert pipe.request("a red circle", cfg_scale=0, clip_guidance=500).clip_model == SHIPPED_NOISY
    target = text_embedding(shipped_noisy, "a red circle")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 2.0
    sigma = torch.full((2,), 2.0)
    guided = noisy_clip_guided_denoiser(_gaussian_denoiser, shipped_noisy, target, scale=500)
    step = guided(x, sigma) - _gaussian_denoiser(x, sigma)
    moved = x + 0.05 * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert _loss(shipped_noisy, moved, sigma, target) < _loss(shipped_noisy, x, sigma, target)
    images = pipe("a red circle", cfg_scale=0, clip_guidance=500, steps=2, seed=1)
    plain = pipe("a red circle", cfg_scale=0, steps=2, seed=1, sampler="Euler a")
    assert f"CLIP model: {SHIPPED_NOISY}" in images[0].parameters
    assert not np.array_equal(np.asarray(images[0].image), np.asarray(plain[0].image))


# --- training ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A tiny pixel CLIP whose text tower the noise-aware run takes frozen (and distils from)."""
    cfg = CLIPConfig(name="tiny-text", text_encoder=TEXT, vision=VisionConfig(image_size=32, patch_size=8, width=32,
                                                                             layers=1, heads=2, mlp_dim=64))
    path = tmp_path_factory.mktemp("text") / "tiny-text.safetensors"
    save_clip(init_clip_(CLIPModel(cfg), torch.Generator().manual_seed(7)), path)
    return str(path)


def _run_sets(model_file: str, text_file: str) -> list[str]:
    return ["train.progress=false", "data.size=32", "data.shapes.n=48", "data.holdout=0", "train.batch_size=8",
            "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0",
            "train.eval_every=0", "train.lr=3e-3", "train.warmup_steps=0", "train.ema_decay=0.5",
            "sample.zero_shot_images=8", "model.image_input=latents", f"model.latent_space.model={model_file}",
            "model.vision.patch_size=4", "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
            "model.vision.mlp_dim=64", f"loss.text_tower={text_file}", "loss.distill=1.0",
            "loss.subset_negatives=true", 'loss.swap_words=[["circle", "square", "star"]]']


def test_training_a_noise_aware_clip_resumes_bit_for_bit_and_exports(model_file, text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    from daguerre.cli import main
    from daguerre.training.clip import train_clip
    from daguerre.training.config import load_run_config

    cfg = load_run_config(None, "clip", _run_sets(model_file, text_file))
    whole = train_clip(cfg, tmp_path / "whole")
    paused = tmp_path / "paused"
    train_clip(cfg, paused, until=2)
    train_clip(cfg, paused, resume=True)
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004" / "state.safetensors"))
    b = load_file(str(paused / "checkpoints" / "step_00000004" / "state.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.", "optim.")))

    # with the frozen tower, each image's hard negatives were drawn and embedded once, and kept beside the latents
    from safetensors import safe_open

    (negatives,) = (tmp_path / "whole" / "latents").rglob("negatives_*.safetensors")
    with safe_open(str(negatives), framework="pt") as f:
        texts, rows = json.loads(f.metadata()["texts"]), f.get_slice("embeds").get_shape()[0]
    assert len(texts) == 48 and sum(map(len, texts)) == rows > 48

    clip = load_clip(whole)
    c = clip.clip_config
    assert isinstance(clip, NoisyCLIPModel) and clip.latent_shape == (4, 16, 16)
    assert c.latent_space.vae_sha256 == VAE_SHA and c.latent_space.model == model_file
    from daguerre.diffusion.schedules import model_sigmas

    sigmas = model_sigmas(preset("tiny").schedule)  # the model's own sigma table
    assert (c.latent_space.sigma_min, c.latent_space.sigma_max) == pytest.approx((float(sigmas[0]),
                                                                                  float(sigmas[-1])))
    text = load_clip(text_file)  # the text tower is the frozen one, exactly (in the file's float16)
    own, frozen = clip.state_dict(), text.state_dict()
    assert all(torch.equal(own[k], frozen[k].half().float()) for k in frozen
               if k.startswith(("text_model.", "text_projection.")))
    assert not torch.equal(own["vision_model.embeddings.patch_embedding.proj.weight"], build_untrained_patch(c))
    zero_shot = c.provenance["zero_shot"]
    assert {"both_sigma_1", "shape_sigma_16", "both_mean"} <= set(zero_shot)
    assert c.provenance["text_tower"]["clip"] == text_file
    capsys.readouterr()
    assert main(["train", "zero-shot", str(whole), "--n", "4"]) == 0  # at each noise level, on its model's latents
    printed = capsys.readouterr().out
    assert "shapes both_sigma_1: " in printed and "shapes shape_sigma_16: " in printed
    out = tmp_path / "exported.safetensors"
    assert main(["train", "export", str(tmp_path / "whole"), "--step", "4", "--out", str(out)]) == 0
    exported, final = load_file(str(out)), load_file(str(whole))
    assert set(exported) == set(final) and all(torch.equal(exported[k], final[k]) for k in final)


def build_untrained_patch(cfg: CLIPConfig) -> torch.Tensor:
    from daguerre.training.clip import build_clip

    return build_clip(cfg, 0).vision_model.embeddings.patch_embedding.proj.weight.detach().half().float()


@pytest.mark.parametrize(("sets", "match"), [
    (["model.image_input=latents"], "config key model.latent_space"),
    (["loss.distill=1.0"], "config key loss.distill"),
    (["data.kind=fashion_mnist", "loss.subset_negatives=true"], "config key loss.subset_negatives"),
])
def test_config_errors_name_the_key(sets, match):
    from daguerre.training.config import load_run_config

    with pytest.raises(ValueError, match=match):
        load_run_config(None, "clip", sets)


def test_a_model_without_a_recorded_autoencoder_is_refused(text_file, tmp_path):
    from daguerre.training.clip import train_clip
    from daguerre.training.config import load_run_config

    sets = [s for s in _run_sets("random:tiny", text_file) if not s.startswith("model.latent_space")]
    cfg = load_run_config(None, "clip", [*sets, "model.latent_space.model=random:tiny"])
    with pytest.raises(ValueError, match="config key model.latent_space.model: model 'random:tiny'"):
        train_clip(cfg, tmp_path / "run")


@pytest.mark.parametrize("stem", [[], ["model.vision.stem_blocks=1", "model.vision.stem_width=16"]])
def test_init_image_tower_takes_the_transformer_and_fits_the_stem(model_file, text_file, tmp_path, monkeypatch,
                                                                  stem):
    """loss.init_image_tower: the transformer and projection are the text_tower CLIP's (the same 4 x 4 token grid
    here), the stem is fitted to its patch tokens (its error falls from a fresh stem's), the temperature is the
    config's; with a learning rate of 0 the file holds exactly that start. The same with stem blocks."""
    from daguerre.training import noisy_clip
    from daguerre.training.clip import train_clip
    from daguerre.training.config import load_run_config

    errors = []
    fit = noisy_clip.fit_stem_
    monkeypatch.setattr(noisy_clip, "STEM_FIT_STEPS", 60)
    monkeypatch.setattr("daguerre.training.clip.fit_stem_", lambda *a: errors.append(fit(*a)) or errors[-1])
    sets = [*_run_sets(model_file, text_file), "loss.init_image_tower=true", "train.steps=1", "train.lr=0",
            "train.min_lr=0", "loss.distill=0", *stem]
    clip = load_clip(train_clip(load_run_config(None, "clip", sets), tmp_path / "run"))
    assert len(clip.vision_model.embeddings.patch_embedding.blocks) == (1 if stem else 0)
    text = load_clip(text_file)
    own, source = clip.state_dict(), text.state_dict()
    taken = [k for k in source if k.startswith(("vision_model.encoder.", "visual_projection."))]
    assert taken and all(torch.equal(own[k], source[k].half().float()) for k in taken)
    assert float(clip.logit_scale) == pytest.approx(clip.clip_config.logit_scale_init, abs=1e-2)
    assert len(errors) == 1 and errors[0] < 0.9  # a fresh stem's relative error is about 1 or more


def test_init_image_tower_needs_the_same_tower(noisy_file):
    from daguerre.training.noisy_clip import take_image_tower_

    other = CLIPModel(CLIPConfig(name="wide", text_encoder=TEXT, vision=VisionConfig(
        image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_dim=64)))
    with pytest.raises(ValueError, match="config key loss.init_image_tower: vision_model"):
        take_image_tower_(load_clip(noisy_file), other)


def test_the_server_guides_with_a_served_noise_aware_clip_and_refuses_a_mismatch(pipe, noisy_file):
    from daguerre.server.app import Server

    body = {"prompt": PROMPT, "steps": 2, "seed": 4, "cfg_scale": 0, "clip_guidance": 300, "clip_model": noisy_file}
    status, _, answer = Server(pipe, "tiny-latents", clips=(noisy_file,)).handle(
        "POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    assert status == 200, answer
    assert "CLIP guidance: 300" in json.loads(json.loads(answer)["info"])["infotexts"][0]
    other = Server(daguerre.load("random:tiny", dtype="fp32"), "tiny", clips=(noisy_file,))
    status, _, answer = other.handle("POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    assert status == 422 and "noise-aware" in json.loads(answer)["detail"]


def test_a_guided_request_without_a_sampler_takes_the_ancestral_one():
    from daguerre.pipelines.request import GUIDED_SAMPLER, GenerationRequest

    shapes = preset("tiny")
    shapes.defaults = {"sampler": "DPM++ 2M", "schedule": "Uniform", "steps": 25, "cfg_scale": 4.0}
    guided = GenerationRequest(prompt=PROMPT, clip_guidance=500, clip_model="c").validate(shapes)
    assert guided.sampler == GUIDED_SAMPLER == "Euler a" and guided.schedule == "Uniform" and guided.steps == 25
    named = GenerationRequest(prompt=PROMPT, clip_guidance=500, clip_model="c", sampler="Heun").validate(shapes)
    assert named.sampler == "Heun"
    assert GenerationRequest(prompt=PROMPT).validate(shapes).sampler == "DPM++ 2M"
    assert GenerationRequest(prompt=PROMPT, clip_guidance=0).validate(shapes).sampler == "DPM++ 2M"
