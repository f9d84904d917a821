"""CLIP guidance (issue 16): `guidance.clip_guided_denoiser` and its wiring (request fields, the pipelines, the
CLI, the server, the PNG parameters), and `--cfg 0` as the unconditional model. Tiny random models only: a
random CLIP (init_clip_) saved to a file, the random:tiny diffusion model.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import daguerre
from daguerre.checkpoints.clip_file import save_clip
from daguerre.config import CLIPConfig, TextEncoderConfig, VisionConfig, preset
from daguerre.guidance import (
    ClipGuidanceOptions,
    cfg_denoiser,
    clip_guided_denoiser,
    clip_loss,
    make_cutouts,
    recurrent_steps,
    self_recurrent,
    spherical_distance,
)
from daguerre.limits import MAX_CLIP_REPEATS, MAX_CUTOUTS, RECURRENCE_SIGMAS, request_work
from daguerre.models.clip import CLIPModel, init_clip_
from daguerre.pipelines.common import text_embedding
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.request import CLIP_GUIDANCE, CLIP_REPEATS, GenerationRequest
from daguerre.pngmeta import read_png_parameters
from daguerre.server.app import Server

TINY = preset("tiny")
PROMPT = "a red circle"


def _tiny_clip(seed: int = 0) -> CLIPModel:
    cfg = CLIPConfig(name="tiny-clip",
                     text_encoder=TextEncoderConfig(width=32, layers=1, heads=2, mlp_dim=64, projection_dim=16,
                                                    max_length=16),
                     vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64))
    return init_clip_(CLIPModel(cfg), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    save_clip(_tiny_clip(), path)
    return str(path)


@pytest.fixture(scope="module")
def pipe():
    return daguerre.load("random:tiny", dtype="fp32")


def _similarity(clip: CLIPModel, image: Image.Image, prompt: str = PROMPT) -> float:
    """cos(CLIP image embedding of the whole image, the prompt's text embedding)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        emb = clip.encode_image(clip.preprocess(pixels))
    return float(torch.nn.functional.cosine_similarity(emb, text_embedding(clip, prompt)))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image)


# --- the wrapper -------------------------------------------------------------------------------------

def _gaussian_denoiser(x, sigma, cond=None):
    """The optimal denoiser of N(0, I) data: x / (1 + sigma^2)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2)


def _decode(latents):  # a "VAE" whose pixels are the first three latent channels
    return latents[:, :3]


def test_scale_zero_returns_the_denoiser_itself():
    clip = _tiny_clip()
    target = torch.randn(1, 16)
    assert clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=0.0, cutouts=4, decode=_decode) \
        is _gaussian_denoiser


@pytest.mark.parametrize("through", [True, False])
def test_the_guided_x0_is_closer_to_the_text_in_clip_space(through):
    clip = _tiny_clip()
    target = text_embedding(clip, PROMPT)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    options = ClipGuidanceOptions(through_denoiser=through, clamp=10.0)
    guided = clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=50.0, cutouts=3, decode=_decode,
                                  generators=[torch.Generator().manual_seed(i) for i in range(2)], options=options)
    plain, nudged = _gaussian_denoiser(x, 2.0), guided(x, 2.0)
    assert not torch.equal(plain, nudged) and nudged.dtype == torch.float32
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    before = clip_loss(clip, _decode(plain), target, 3, gens)
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    after = clip_loss(clip, _decode(nudged), target, 3, gens)
    assert (after < before).all(), (before, after)


def test_the_step_is_sigma_squared_times_the_gradient_and_clamped():
    clip = _tiny_clip()
    target = text_embedding(clip, PROMPT)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = 0.5

    def step(clamp: float) -> torch.Tensor:
        options = ClipGuidanceOptions(clamp=clamp)
        guided = clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=10.0, cutouts=2, decode=_decode,
                                      generators=[torch.Generator().manual_seed(3)], options=options)
        return _gaussian_denoiser(x, sigma) - guided(x, sigma)

    # the reference: autograd of the loss through the denoiser, times sigma^2
    x_in = x.clone().requires_grad_()
    loss = 10.0 * clip_loss(clip, _decode(_gaussian_denoiser(x_in, sigma)), target, 2,
                            [torch.Generator().manual_seed(3)]).sum()
    expected = sigma**2 * torch.autograd.grad(loss, x_in)[0]
    torch.testing.assert_close(step(1e9), expected)
    clamped = step(1e-4)  # below sigma_data (1) the bound is clamp * sigma
    assert float(clamped.pow(2).mean().sqrt()) == pytest.approx(1e-4 * sigma, rel=1e-3)
    torch.testing.assert_close(clamped / clamped.norm(), expected / expected.norm(), atol=1e-3, rtol=0)
    assert torch.equal(clip_guided_denoiser(_gaussian_denoiser, clip, target, scale=10.0, cutouts=2,
                                            decode=_decode)(x, 0.0), _gaussian_denoiser(x, 0.0))  # sigma 0: not guided


def test_cutouts_come_from_the_generator_whole_image_first():
    clip = _tiny_clip()
    image = torch.rand(3, 32, 24) * 2 - 1
    a = make_cutouts(clip, image, 5, torch.Generator().manual_seed(1))
    b = make_cutouts(clip, image, 5, torch.Generator().manual_seed(1))
    c = make_cutouts(clip, image, 5, torch.Generator().manual_seed(2))
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a[0], clip.preprocess(image[None])[0])
    grey = make_cutouts(clip, image[:1], 2, torch.Generator().manual_seed(1))  # a 1-channel image, RGB CLIP
    assert grey.shape == (2, 3, 16, 16)


def test_spherical_distance_falls_as_the_cosine_rises():
    t = torch.tensor([[1.0, 0.0]])
    angles = torch.linspace(0, 3.0, 7)
    d = spherical_distance(torch.stack([angles.cos(), angles.sin()], 1), t)
    assert d[0] == 0 and (d.diff() > 0).all()
    torch.testing.assert_close(d, angles**2 / 2)  # half the squared angle


# --- cfg 0: the unconditional model --------------------------------------------------------------------

def test_cfg_zero_is_one_call_on_the_unconditional_branch():
    calls = []

    def den(x, sigma, cond):
        calls.append((len(x), cond["context"][0, 0].item()))
        return x * cond["context"][:, :1, :1].reshape(-1, 1, 1, 1)

    x = torch.ones(2, 1, 2, 2)
    cond, uncond = {"context": torch.full((2, 1, 1), 3.0)}, {"context": torch.full((1, 1, 1), 5.0)}
    out = cfg_denoiser(den, uncond, 0.0, cutoff_sigma=10.0, min_sigma=10.0)(x, 1.0, cond)
    assert calls == [(2, 5.0)] and torch.equal(out, x * 5)


def test_cfg_zero_makes_a_text_model_unconditional(pipe):
    calls = []
    hook = pipe.components.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        a = pipe("a red circle", steps=3, seed=4, cfg_scale=0, sampler="Euler")
    finally:
        hook.remove()
    assert calls == [1, 1, 1]  # one network call per step, batch 1
    b = pipe("a blue square", steps=3, seed=4, cfg_scale=0, sampler="Euler")
    c = pipe("", steps=3, seed=4, cfg_scale=1, sampler="Euler")  # the empty prompt, unguided
    assert np.array_equal(_pixels(a[0]), _pixels(b[0])) and np.array_equal(_pixels(a[0]), _pixels(c[0]))
    # the work bound counts one call per step
    kw = dict(width=32, height=32, steps=3, n=1)
    assert pipe.request("x", cfg_scale=0).cfg_scale == 0
    assert request_work(TINY, guided=False, **kw) < request_work(TINY, guided=True, **kw)


# --- the pipelines -------------------------------------------------------------------------------------

def test_scale_zero_is_the_unguided_image_exactly(pipe, clip_file):
    plain = pipe(PROMPT, steps=3, seed=2)
    off = pipe(PROMPT, steps=3, seed=2, clip_guidance=0, clip_model=clip_file, cutouts=5)
    assert np.array_equal(_pixels(plain[0]), _pixels(off[0])) and plain[0].parameters == off[0].parameters
    assert "CLIP" not in off[0].parameters


@pytest.mark.parametrize(("sampler", "cfg"), [("Euler", 0.0), ("DPM++ 2M", 3.0), ("Euler a", 1.0),
                                              ("DPM++ 2M SDE", 3.0)])
def test_guidance_raises_the_clip_similarity_of_the_image(pipe, clip_file, sampler, cfg):
    clip = _tiny_clip()
    kw = dict(steps=4, sampler=sampler, cfg_scale=cfg, n=2, batch_size=2, seed=11)
    plain = pipe(PROMPT, **kw)
    guided = pipe(PROMPT, clip_guidance=2000, clip_model=clip_file, cutouts=2, **kw)
    for p, g in zip(plain, guided, strict=True):
        assert _similarity(clip, g.image) > _similarity(clip, p.image), (sampler, cfg)


@pytest.mark.parametrize("fields", [dict(deepcache_interval=2), dict(fast=True), dict(cfg_min_sigma=5.0),
                                    dict(sampler="Heun")])
def test_guidance_runs_with_the_fewer_calls_settings_and_two_call_samplers(pipe, clip_file, fields):
    kw = dict(steps=4, seed=1, cfg_scale=3, **fields)
    plain = pipe(PROMPT, **kw)
    guided = pipe(PROMPT, clip_guidance=2000, clip_model=clip_file, cutouts=2, **kw)
    assert not np.array_equal(_pixels(plain[0]), _pixels(guided[0]))


def test_a_seed_gives_the_same_guided_image_in_any_batch(pipe, clip_file):
    kw = dict(steps=3, sampler="Euler a", clip_guidance=500, clip_model=clip_file, cutouts=3)
    first = pipe(PROMPT, seed=5, n=2, batch_size=2, **kw)
    again = pipe(PROMPT, seed=5, n=2, batch_size=2, **kw)
    alone = pipe(PROMPT, seed=6, **kw)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, again, strict=True))
    assert np.abs(_pixels(first[1]).astype(int) - _pixels(alone[0]).astype(int)).max() <= 1  # batch of 2 vs 1
    other = pipe(PROMPT, seed=7, **kw)
    assert not np.array_equal(_pixels(alone[0]), _pixels(other[0]))


def test_img2img_is_guided_too(pipe, clip_file):
    image = Image.new("RGB", (32, 32), (90, 120, 200))
    kw = dict(steps=4, seed=3, strength=0.8)
    plain = pipe.img2img(image, PROMPT, **kw)
    guided = pipe.img2img(image, PROMPT, clip_guidance=2000, clip_model=clip_file, cutouts=2, **kw)
    assert not np.array_equal(_pixels(plain[0]), _pixels(guided[0]))
    assert "CLIP guidance: 2000" in guided[0].parameters and "Denoising strength" in guided[0].parameters


def test_an_unconditional_model_is_guided_by_the_prompt(clip_file):
    cfg = preset("tiny")
    cfg.conditioning, cfg.text_encoder, cfg.unet.context_dim = "none", None, None
    from daguerre.api import Pipeline
    from daguerre.components import build_components

    pipe = Pipeline(build_components(cfg, seed=0))
    plain = pipe(PROMPT, steps=3, seed=1)
    guided = pipe(PROMPT, steps=3, seed=1, clip_guidance=2000, clip_model=clip_file, cutouts=2)
    assert not np.array_equal(_pixels(plain[0]), _pixels(guided[0]))


# --- self-recurrence of the guided steps ----------------------------------------------------------------

def _counting(denoiser, seen):
    def call(x, sigma, cond=None):
        seen.append(round(float(torch.as_tensor(sigma).reshape(-1)[0]), 4))
        return denoiser(x, sigma, cond)
    return call


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M"])
def test_one_repeat_or_no_step_in_range_is_the_sampler_itself(name):
    from daguerre.diffusion.noise import generators_for
    from daguerre.diffusion.sampler_names import SAMPLERS, resolve_sampler

    sampler = SAMPLERS[resolve_sampler(name).sampler]
    sigmas = torch.tensor([14.0, 6.0, 3.0, 1.5, 0.7, 0.2, 0.0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.0

    def run(s):
        return s(_gaussian_denoiser, x.clone(), sigmas, generator=generators_for(5, 2))
    assert self_recurrent(sampler, 1, 0.5, 4.0) is sampler
    assert torch.equal(run(self_recurrent(sampler, 4, 20.0, 30.0)), run(sampler))  # no step starts in range


def test_the_steps_in_range_are_taken_repeats_times_in_order():
    from daguerre.diffusion.noise import generators_for
    from daguerre.diffusion.sampler_names import SAMPLERS, resolve_sampler

    sampler = SAMPLERS[resolve_sampler("Euler a").sampler]
    sigmas = torch.tensor([14.0, 6.0, 3.0, 1.5, 0.7, 0.2, 0.0])
    assert recurrent_steps(sigmas, 0.5, 4.0) == [False, False, True, True, True, False]
    seen, steps = [], []
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.0
    self_recurrent(sampler, 3, 0.5, 4.0)(_counting(_gaussian_denoiser, seen), x, sigmas,
                                         callback=lambda info: steps.append(info["i"]), generator=generators_for(1, 1))
    assert seen == [14.0, 6.0, 3.0, 3.0, 3.0, 1.5, 1.5, 1.5, 0.7, 0.7, 0.7, 0.2]
    assert steps == [0, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]  # the run's step index, each repeat reported


def test_recurrence_keeps_the_exact_denoisers_distribution():
    """On N(0, I) data with its exact denoiser, re-noising a step back to its level (variance sigma_i^2 -
    sigma_{i+1}^2) and taking it again leaves the samples' distribution where the sampler leaves it: the final
    variance equals the plain run's (Euler a's own error at 40 steps puts both near 0.86) within the sampling noise
    of 16,384 numbers; too much or too little noise between repeats moves it. The repeats do change the samples."""
    from daguerre.diffusion.noise import generators_for
    from daguerre.diffusion.sampler_names import SAMPLERS, resolve_sampler

    sampler = SAMPLERS[resolve_sampler("Euler a").sampler]
    sigmas = torch.cat([torch.logspace(1.3, -1.5, 40), torch.zeros(1)])
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    plain = sampler(_gaussian_denoiser, x.clone(), sigmas, generator=generators_for(0, 64))
    repeated = self_recurrent(sampler, 6, 0.5, 4.0)(_gaussian_denoiser, x.clone(), sigmas,
                                                   generator=generators_for(0, 64))
    assert 0.8 < float(plain.var()) < 0.92
    assert abs(float(repeated.var()) - float(plain.var())) < 0.02
    assert not torch.allclose(plain, repeated)


def test_repeats_count_in_the_work_bound_and_the_png():
    from daguerre.pipelines.fields import _read_clip

    kw = dict(prompt=PROMPT, steps=10, clip_guidance=1.0, clip_model="c")
    once = GenerationRequest(**kw, clip_repeats=1).validate(TINY)
    repeated = sum(recurrent_steps(once.sigmas, 0.5, 4.0))
    assert repeated >= 1  # the tiny model's 10 steps reach the range
    bound = daguerre.limits.Limits(max_work=request_work(TINY, width=32, height=32, steps=10 + repeated, n=1,
                                                         guided=True, clip_guided=True) * 1.01)
    GenerationRequest(**kw, clip_repeats=2, width=32, height=32).validate(TINY, bound)
    with pytest.raises(daguerre.limits.LimitError, match="clip_repeats 3"):
        GenerationRequest(**kw, clip_repeats=3, width=32, height=32).validate(TINY, bound)
    # the hires fix's second pass repeats its steps in range too, and the bound counts them
    from daguerre.pipelines.hires import second_pass_sigmas

    kw_h = dict(kw, width=32, height=32, hires_scale=1.5, hires_steps=10, hires_strength=0.7)
    once = GenerationRequest(**kw_h, clip_repeats=1).validate(TINY)
    first, second = (sum(recurrent_steps(s, 0.5, 4.0)) for s in (once.sigmas, second_pass_sigmas(once)))
    assert second >= 1
    work = max(request_work(TINY, width=32, height=32, steps=10 + 2 * first, n=1, guided=True, clip_guided=True),
               request_work(TINY, width=48, height=48, steps=10, n=1, guided=True, encodes=True, clip_guided=True))
    bound = daguerre.limits.Limits(max_work=work * 1.01)
    GenerationRequest(**kw_h, clip_repeats=1).validate(TINY, bound)
    with pytest.raises(daguerre.limits.LimitError, match="the hires fix: .* 3"):
        GenerationRequest(**kw_h, clip_repeats=3).validate(TINY, bound)
    assert _read_clip({"CLIP guidance": "500", "Cutouts": "16"}, "x")["clip_repeats"] == 1  # older files: once
    assert _read_clip({"CLIP guidance": "500", "CLIP repeats": "8"}, "x")["clip_repeats"] == 8


def test_progress_counts_the_repeated_steps(pipe, clip_file):
    """The CLI's bar and the server's progress count every step the sampler reports, the repeated ones too: a
    guided run ends at 100%, not past it (the bar once read "116 of 25")."""
    from daguerre.pipelines.common import progress_total
    from daguerre.pipelines.txt2img import txt2img

    kw = dict(steps=10, n=2, batch_size=1, seed=1, clip_guidance=500, clip_model="tiny-clip", cutouts=2)
    request = pipe.request(PROMPT, clip_repeats=3, **kw)
    repeated = sum(recurrent_steps(request.sigmas, *RECURRENCE_SIGMAS))
    reported: list[int] = []
    txt2img(pipe.components, request, clip=_tiny_clip(), callback=lambda info: reported.append(info["i"]))
    assert repeated >= 1 and len(reported) == progress_total(request) == 2 * (10 + 2 * repeated)
    plain = len(reported)
    assert progress_total(pipe.request(PROMPT, clip_repeats=1, **kw)) == 20
    hires = pipe.request(PROMPT, clip_repeats=3, **kw, hires_scale=1.5, hires_steps=10, hires_strength=0.7)
    reported.clear()
    txt2img(pipe.components, hires, clip=_tiny_clip(), callback=lambda info: reported.append(info["i"]))
    assert len(reported) == progress_total(hires) > 2 * (10 + 2 * repeated)  # the second passes repeat too
    assert progress_total(pipe.request(PROMPT, **{**kw, "clip_guidance": 0.0}, clip_repeats=3)) == 20  # unguided
    server = Server(pipe, "tiny", clips=(clip_file,))
    body = {"prompt": PROMPT, "steps": 10, "n_iter": 2, "batch_size": 1, "seed": 1, "clip_guidance": 500,
            "clip_model": clip_file, "cutouts": 2, "clip_repeats": 3}
    status, _, answer = server.handle("POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    assert status == 200, answer
    assert server._live["done"] == server._live["total"] == plain  # the page's bar ends at 100%


# --- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "words"), [
    (dict(clip_guidance=-1.0), ["-1.0", "CLIP guidance"]),
    (dict(clip_guidance=1e9), ["1000000000.0", "CLIP guidance"]),
    (dict(clip_guidance=float("nan")), ["nan"]),
    (dict(clip_guidance=100.0, cutouts=0), ["cutouts", "0"]),
    (dict(clip_guidance=100.0, cutouts=MAX_CUTOUTS + 1), ["cutouts", str(MAX_CUTOUTS + 1)]),
    (dict(clip_guidance="a lot"), ["clip_guidance", "'a lot'"]),
    (dict(clip_guidance=100.0, cutouts=2.5), ["cutouts", "2.5"]),
    (dict(clip_guidance=100.0, clip_repeats=0), ["clip_repeats", "0"]),
    (dict(clip_guidance=100.0, clip_repeats=MAX_CLIP_REPEATS + 1), ["clip_repeats", str(MAX_CLIP_REPEATS + 1)]),
    (dict(clip_guidance=100.0, prompt="  "), ["prompt"]),
    (dict(clip_guidance=100.0), ["'tiny'", "--clip"]),  # random:tiny ships no CLIP
    (dict(clip_guidance=100.0, clip_model=" "), ["clip_model"]),
])
def test_request_validation_names_the_value(fields, words):
    fields = {"prompt": PROMPT, **fields}
    with pytest.raises(ValueError) as e:
        GenerationRequest(**fields).validate(TINY)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_the_shipped_model_is_guided_by_its_shipped_clip_by_default():
    from daguerre.registry import guide_for_model

    shapes = preset("tiny")
    shapes.name = "shapes"
    valid = GenerationRequest(prompt=PROMPT, clip_guidance=CLIP_GUIDANCE).validate(shapes)
    assert valid.clip_model == guide_for_model("shapes") in ("shapes-noisy-clip", "shapes-clip")
    assert GenerationRequest(prompt=PROMPT, clip_guidance=1, clip_model="x").validate(shapes).clip_model == "x"


def test_guidance_counts_in_the_work_bound():
    kw = dict(width=32, height=32, steps=10, n=1, guided=True)
    assert request_work(TINY, clip_guided=True, **kw) > 3 * request_work(TINY, **kw) - 1e-12
    small = daguerre.limits.Limits(max_work=request_work(TINY, **kw) * 1.5)
    GenerationRequest(prompt=PROMPT, steps=10).validate(TINY, small)
    with pytest.raises(daguerre.limits.LimitError):
        GenerationRequest(prompt=PROMPT, steps=10, clip_guidance=1, clip_model="c").validate(TINY, small)


# --- the PNG parameters, the command line, the server ----------------------------------------------------

def test_the_png_parameters_round_trip(pipe, clip_file, tmp_path):
    from daguerre.pipelines.txt2img import txt2img

    request = pipe.request(PROMPT, steps=2, seed=9, clip_guidance=750, cutouts=3, clip_model="tiny-clip")
    result = txt2img(pipe.components, request, clip=_tiny_clip())  # a CLIP in memory, named in the PNG as given
    written = f"CLIP guidance: 750, CLIP model: tiny-clip, Cutouts: 3, CLIP repeats: {CLIP_REPEATS}"
    assert written in result[0].parameters
    read = settings_from_parameters(result[0].parameters)
    assert (read.fields["clip_guidance"], read.fields["clip_model"], read.fields["cutouts"]) == (750.0, "tiny-clip", 3)
    assert not [line for line in read.ignored if "CLIP" in line]
    # a file never names a path to open: such a CLIP model is ignored, with the reason
    text = result[0].parameters.replace("CLIP model: tiny-clip", f"CLIP model: {clip_file}")
    read = settings_from_parameters(text)
    assert "clip_model" not in read.fields and any("CLIP model" in line for line in read.ignored)


def test_generate_cli_guides_and_from_png_makes_the_image_again(clip_file, tmp_path, capsys):
    from daguerre.cli import main

    out = tmp_path / "a.png"
    argv = ["generate", PROMPT, "--model", "random:tiny", "--steps", "2", "--seed", "3", "--out", str(out)]
    assert main([*argv, "--clip-guidance", "--clip", clip_file, "--cutouts", "2"]) == 0
    params = read_png_parameters(out)
    assert f"CLIP guidance: {CLIP_GUIDANCE:g}" in params and "Cutouts: 2" in params
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", "random:tiny", "--clip", clip_file, "--out",
                 str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    missing = str(tmp_path / "missing.safetensors")
    code = main([*argv[:-1], str(tmp_path / "c.png"), "--clip-guidance", "--clip", missing])
    err = capsys.readouterr().err
    assert code == 2 and "missing.safetensors" in err and len(err.strip().splitlines()) == 1


def _b64_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_the_server_takes_the_fields_and_opens_only_its_clips(pipe, clip_file):
    server = Server(pipe, "tiny", clips=(clip_file,))
    body = {"prompt": PROMPT, "steps": 2, "seed": 4, "clip_guidance": 300, "clip_model": clip_file, "cutouts": 2}
    status, _, answer = server.handle("POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    assert status == 200, answer
    info = json.loads(json.loads(answer)["info"])
    assert "CLIP guidance: 300" in info["infotexts"][0]
    direct = pipe(PROMPT, steps=2, seed=4, clip_guidance=300, clip_model=clip_file, cutouts=2)
    assert np.array_equal(np.asarray(_b64_png(json.loads(answer)["images"][0]).convert("RGB")), _pixels(direct[0]))
    refused = Server(pipe, "tiny")  # started without --clip: the payload may not name a file
    status, _, answer = refused.handle("POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    assert status == 422 and clip_file in json.loads(answer)["detail"]
    infotext = {"prompt": PROMPT, "infotext": f"{PROMPT}\nSteps: 2, CLIP guidance: 300, CLIP model: {clip_file}"}
    status, _, answer = refused.handle("POST", "/sdapi/v1/txt2img", json.dumps(infotext).encode())
    assert status == 422 and "CLIP model" in json.loads(answer)["detail"]


def test_eval_takes_the_guidance_flags(clip_file, tmp_path, capsys):
    from daguerre.cli import main

    out = tmp_path / "ev"
    base = ["eval", "--model", "random:tiny", "--dataset", "shapes", "--prompts", "single", "--n", "2", "--steps", "2",
            "--real", "4", "--no-progress", "--cfg", "0", "--clip", clip_file]
    assert main([*base, "--clip-guidance", "300", "--cutouts", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["clip_guidance"] == {"clip_guidance": 300.0, "clip_model": clip_file, "cutouts": 2,
                                                   "clip_repeats": CLIP_REPEATS}
    assert report["settings"]["cfg_scale"] == 0.0 and "clip_score" in report
    plain = tmp_path / "plain"
    assert main([*base, "--out", str(plain)]) == 0
    again = json.loads((plain / "report.json").read_text())
    assert again["settings"]["clip_guidance"] is None
    with Image.open(out / "grid.png") as guided, Image.open(plain / "grid.png") as unguided:
        assert not np.array_equal(np.asarray(guided), np.asarray(unguided))  # same seeds, guided images
