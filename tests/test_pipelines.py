"""The image pipelines (txt2img, img2img, inpaint, upscale) on tiny random models, CPU.

Oracles: the VAE itself (strength 0 is a VAE round trip; the starting latent is z0 + sigma_0 eps with
eps from the image's own generator), the input pixels (inpainting keeps them outside the mask),
independent re-computations of what enters the U-Net (spy networks), diffusers' DDPM schedule for
the low-res augmentation, and the seed + i rule (an image does not depend on its batch).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from daguerre.components import build_components
from daguerre.conditioning import latent_mask
from daguerre.config import preset
from daguerre.diffusion.denoisers import Denoiser
from daguerre.diffusion.sampler_names import resolve_sampler
from daguerre.diffusion.schedules import img2img_sigmas
from daguerre.pipelines import images as im
from daguerre.pipelines.common import count_steps, encode_images
from daguerre.pipelines.img2img import img2img
from daguerre.pipelines.inpaint import inpaint
from daguerre.pipelines.request import GenerationRequest
from daguerre.pipelines.txt2img import txt2img
from daguerre.pipelines.upscale import upscale

SIZE = 32  # the tiny preset's native size; its model grid is 4 pixels (VAE 2 x U-Net 2)
STEPS = 3
WAKE_STD = 0.05  # std of the weights given to the U-Net's zero-initialised layers (see `_components`)


def _image(w: int = SIZE, h: int = SIZE, seed: int = 0) -> Image.Image:
    """A smooth colour pattern with some noise (a stand-in photo)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 3.0)], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _mask(w: int = SIZE, h: int = SIZE) -> Image.Image:
    arr = np.zeros((h, w), np.uint8)
    arr[8:20, 10:22] = 255
    return Image.fromarray(arr, "L")


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int32)


def _components(cfg):
    """Random networks whose U-Net output depends on its inputs: a fresh U-Net zero-initialises its
    output layers (LDM's `zero_module`), predicting eps = 0 whatever the prompt, so those get small
    random weights here."""
    comps = build_components(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in comps.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * WAKE_STD)
    return comps


@pytest.fixture(scope="module")
def tiny():
    return _components(preset("tiny"))


@pytest.fixture(scope="module")
def tiny_inpaint():
    cfg = preset("tiny")
    cfg.name, cfg.unet.in_channels, cfg.concat = "tiny-inpaint", 9, "inpaint"
    return _components(cfg)


@pytest.fixture(scope="module")
def tiny_sr():
    cfg = preset("tiny")
    cfg.name, cfg.unet.in_channels, cfg.concat, cfg.unet.num_classes = "tiny-sr", 7, "lowres", 1000
    return _components(cfg)


class Spy(nn.Module):
    """Wraps a U-Net and records every input it gets (x_in with the concatenated channels, and y)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls: list[dict] = []

    def forward(self, x, t, **kwargs):
        self.calls.append({"x": x.detach().clone(), **kwargs})
        return self.net(x, t, **kwargs)


def _req(**kw) -> GenerationRequest:
    base = {"prompt": "a red circle", "steps": STEPS, "seed": 11}
    return GenerationRequest(**{**base, **kw})


def _run(pipeline, comps, callback=None, **kw):
    """`pipeline` (txt2img, img2img, inpaint or upscale) on the validated request `_req(**kw)` of its task."""
    return pipeline(comps, _req(task=pipeline.__name__, **kw).validate(comps.config), callback=callback)


RUNS = {
    "txt2img": lambda c, **kw: _run(txt2img, c, **kw),
    "img2img": lambda c, **kw: _run(img2img, c, init_image=_image(), strength=0.6, **kw),
    "inpaint": lambda c, **kw: _run(inpaint, c, init_image=_image(), mask=_mask(), **kw),
    "upscale": lambda c, **kw: _run(upscale, c, init_image=_image(16, 16), **kw),
}


# --- every pipeline: sizes, seeds, batches ------------------------------------------------------------

@pytest.mark.parametrize("task", list(RUNS))
def test_batch_equals_single_and_seed_reproduces(tiny, task):
    batch = RUNS[task](tiny, n=3, batch_size=2)  # batches [0, 1] and [2]
    assert [r.seed for r in batch] == [11, 12, 13]
    for r in batch:
        assert r.image.size == (SIZE, SIZE) and r.image.mode == "RGB"
    single = RUNS[task](tiny, seed=12)[0]
    # same noise; only the float summation order of batched CPU kernels differs: at most one level
    assert np.abs(_px(single.image) - _px(batch[1].image)).max() <= 1
    assert single.parameters == batch[1].parameters
    assert np.abs(_px(batch[0].image) - _px(batch[1].image)).max() > 0  # seeds differ -> images differ
    other = RUNS[task](tiny, seed=12, prompt="a blue square")[0]
    assert np.abs(_px(other.image) - _px(single.image)).max() > 1  # the prompt reaches the U-Net


# --- img2img -------------------------------------------------------------------------------------------

def test_img2img_strength_zero_is_a_vae_round_trip(tiny):
    steps = []
    out = _run(img2img, tiny, init_image=_image(), strength=0.0, callback=steps.append)[0]
    assert steps == []  # no sampler step at strength 0
    x = im.image_to_tensor(_image())
    with torch.no_grad():
        z = tiny.vae.encode(x).mode()
        ref = tiny.vae.decode(z).clamp(-1, 1)
    ref = ((ref + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(_px(out.image), ref.astype(np.int32))
    assert out.parameters.endswith("Denoising strength: 0")


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_starts_from_the_noised_input(tiny, strength):
    """The first sampler state is z0 + sigma_start eps, eps from the CPU generator seeded `seed`, and the
    schedule is A1111's img2img tail of the sampler's sigmas."""
    infos = []
    req = _req(task="img2img", init_image=_image(), strength=strength, steps=4, sampler="Euler").validate(tiny.config)
    img2img(tiny, req, callback=infos.append)
    full = resolve_sampler("Euler", "Automatic").sigmas(4, Denoiser(tiny.unet, tiny.config.schedule).sigmas)
    tail = img2img_sigmas(full, strength)
    assert len(infos) == len(tail) - 1 == count_steps(req)
    assert float(infos[0]["sigma"]) == pytest.approx(float(tail[0]))
    with torch.no_grad():
        z0 = tiny.vae.encode(im.image_to_tensor(_image())).mode() * tiny.config.vae.scale_factor
    eps = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(11))[None]
    torch.testing.assert_close(infos[0]["x"], z0 + float(tail[0]) * eps, rtol=1e-5, atol=1e-5)


def test_img2img_strength_one_differs_from_zero(tiny):
    zero = _run(img2img, tiny, init_image=_image(), strength=0.0, steps=2)[0]
    one = _run(img2img, tiny, init_image=_image(), strength=1.0, steps=2)[0]
    assert np.abs(_px(zero.image) - _px(one.image)).mean() > 1.0


def test_default_size_is_a_pure_center_crop_to_the_grid(tiny):
    src = _image(37, 34)  # the tiny model's grid is 4: 37x34 -> 36x32, no resampling
    req = _req(init_image=src, task="img2img").validate(tiny.config)
    assert (req.width, req.height) == (36, 32)
    np.testing.assert_array_equal(_px(req.init_image), _px(src)[1:33, 0:36])
    out = _run(img2img, tiny, init_image=src, strength=0.3)[0]
    assert out.image.size == (36, 32)


@pytest.mark.parametrize("mode", ["crop", "fit", "stretch"])
def test_resize_modes_give_the_requested_size(tiny, mode):
    out = _run(img2img, tiny, init_image=_image(40, 24), strength=0.3, width=24, height=32, resize_mode=mode)[0]
    assert out.image.size == (24, 32)


# --- inpainting ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", ["original", "fill", "latent noise", "latent nothing"])
def test_inpaint_keeps_unmasked_pixels_and_known_latents(tiny, fill):
    blur = 2
    infos = []
    req = _req(task="inpaint", init_image=_image(), mask=_mask(), mask_blur=blur, inpaint_fill=fill, strength=1.0)
    out = inpaint(tiny, req.validate(tiny.config), callback=infos.append)[0]
    soft = np.asarray(im.blur_mask(_mask(), blur))
    keep = soft == 0
    assert keep.sum() > SIZE * SIZE // 2
    np.testing.assert_array_equal(_px(out.image)[keep], _px(_image())[keep])  # pixel-identical outside
    assert np.abs(_px(out.image)[soft == 255] - _px(_image())[soft == 255]).mean() > 1.0  # repainted inside
    # latent space: every x0 estimate equals the known latents where the latent mask is 0
    known = encode_images(tiny, im.image_to_tensor(_image()))
    lat = latent_mask(im.mask_to_tensor(im.blur_mask(_mask(), blur)), 2)
    outside = (lat == 0).expand_as(known)
    assert outside.any() and (lat == 1).any()
    for info in infos:
        torch.testing.assert_close(info["denoised"][outside], known[outside], rtol=0, atol=0)
    assert "Mask blur: 2" in out.parameters


def test_inpaint_latent_nothing_starts_from_noise_only_inside(tiny):
    infos = []
    _run(inpaint, tiny, init_image=_image(), mask=_mask(), mask_blur=0, inpaint_fill="latent nothing",
         strength=1.0, sampler="Euler", callback=infos.append)
    lat = latent_mask(im.mask_to_tensor(_mask()), 2)
    sigma0 = float(infos[0]["sigma"])
    eps = torch.randn((4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(11))[None]
    inside = (lat == 1).expand_as(eps)
    torch.testing.assert_close(infos[0]["x"][inside], sigma0 * eps[inside], rtol=1e-5, atol=1e-4)


def test_latent_mask_covers_every_touched_cell():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 3, 4] = 0.3  # one pixel of cell (1, 2)
    lat = latent_mask(mask, 2)
    assert lat.shape == (1, 1, 4, 4)
    assert lat[0, 0, 1, 2] == pytest.approx(0.3) and lat.sum() == pytest.approx(0.3)


def test_inpainting_model_gets_mask_and_masked_image_latent(tiny_inpaint):
    spy = Spy(tiny_inpaint.unet)
    comps = dataclasses.replace(tiny_inpaint, unet=spy)
    out = _run(inpaint, comps, init_image=_image(), mask=_mask(), mask_blur=0, steps=2)[0]
    assert out.image.size == (SIZE, SIZE)
    x = im.image_to_tensor(_image())
    binary = (im.mask_to_tensor(_mask()) >= 0.5).float()
    with torch.no_grad():  # SD convention: image * (mask < 0.5), encoded by the VAE, posterior mode
        masked_latent = tiny_inpaint.vae.encode(x * (1 - binary)).mode() * tiny_inpaint.config.vae.scale_factor
    cell_mask = binary.reshape(1, 1, SIZE // 2, 2, SIZE // 2, 2).amax(dim=(3, 5))  # any repainted pixel in the cell
    assert spy.calls
    for call in spy.calls:
        x_in = call["x"]
        assert x_in.shape == (2, 9, SIZE // 2, SIZE // 2)  # cond and uncond in one batch (CFG)
        for row in x_in:  # [noisy latent 4, mask 1, masked-image latent 4], the same for both branches
            torch.testing.assert_close(row[4:5], cell_mask[0])
            torch.testing.assert_close(row[5:9], masked_latent[0], rtol=1e-5, atol=1e-5)


def test_inpainting_model_in_txt2img_sees_everything_masked(tiny_inpaint):
    spy = Spy(tiny_inpaint.unet)
    _run(txt2img, dataclasses.replace(tiny_inpaint, unet=spy), steps=1, cfg_scale=1.0)
    with torch.no_grad():
        gray = tiny_inpaint.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).mode() * tiny_inpaint.config.vae.scale_factor
    x_in = spy.calls[0]["x"]
    assert torch.all(x_in[:, 4] == 1)
    torch.testing.assert_close(x_in[:, 5:9], gray, rtol=1e-5, atol=1e-5)


# --- upscaling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0, 300])
def test_sr_model_gets_the_augmented_lowres_image(tiny_sr, level):
    from diffusers import DDPMScheduler

    spy = Spy(tiny_sr.unet)
    low = _image(16, 16)
    out = _run(upscale, dataclasses.replace(tiny_sr, unet=spy), init_image=low, noise_level=level, steps=2)[0]
    assert out.image.size == (32, 32)
    assert f"Noise level: {level}" in out.parameters and "Upscale: 2" in out.parameters
    # the x4-upscaler augmentation schedule (diffusers' low_res_scheduler config) as the oracle
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
    abar = float(sched.alphas_cumprod[level])
    gen = torch.Generator().manual_seed(11)
    torch.randn((4, 16, 16), generator=gen)  # the image's starting noise comes first
    eps = torch.randn((3, 16, 16), generator=gen)
    lr = im.image_to_tensor(low)[0]  # 16x16 is already the 32x32 output's latent grid (f = 2)
    expected = lr if level == 0 else abar**0.5 * lr + (1 - abar) ** 0.5 * eps
    for call in spy.calls:
        assert call["x"].shape[1] == 7
        torch.testing.assert_close(call["x"][:, 4:7], expected.expand(2, -1, -1, -1), rtol=1e-5, atol=1e-5)
        assert call["y"].tolist() == [level, level]


def test_sr_lowres_is_resampled_to_the_latent_grid(tiny_sr):
    spy = Spy(tiny_sr.unet)
    _run(upscale, dataclasses.replace(tiny_sr, unet=spy), init_image=_image(16, 16), upscale_factor=4, steps=1,
         noise_level=0, cfg_scale=1.0)
    x_in = spy.calls[0]["x"]
    assert x_in.shape == (1, 7, 32, 32)  # 64x64 output -> 32x32 latent grid
    ref = torch.nn.functional.interpolate(im.image_to_tensor(_image(16, 16)), size=(32, 32), mode="bicubic")
    torch.testing.assert_close(x_in[:, 4:7], ref.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_regular_model_upscale_is_resize_plus_img2img(tiny):
    out = _run(upscale, tiny, init_image=_image(16, 12), upscale_factor=2.5)[0]
    assert out.image.size == (40, 28)  # 40x30 snapped down to the 4-pixel grid
    assert "Hires upscaler: Lanczos" in out.parameters and "Denoising strength: 0.4" in out.parameters


# --- conditioning kinds --------------------------------------------------------------------------------

def test_class_conditional_and_unconditional_models_run_through_every_pipeline():
    cfg = preset("tiny")
    cfg.conditioning, cfg.text_encoder, cfg.unet.context_dim = "class", None, None
    cfg.unet.num_classes, cfg.class_names = 3, ["circle", "square", "none"]
    comps = _components(cfg)
    spy = Spy(comps.unet)
    comps = dataclasses.replace(comps, unet=spy)
    a = _run(img2img, comps, prompt="", init_image=_image(), class_label="square", steps=2, strength=1.0)[0]
    assert "Class: square" in a.parameters
    for call in spy.calls:  # cond = the class, uncond = the last ("no class") label, in one batch
        assert call["y"].tolist() == [1, 2] and "context" not in call
    spy.calls.clear()
    _run(upscale, comps, prompt="", init_image=_image(16, 16), class_label=0, steps=2, cfg_scale=1.0)
    assert all(call["y"].tolist() == [0] for call in spy.calls)
    cfg = dataclasses.replace(cfg, conditioning="none", class_names=None)
    cfg.unet = dataclasses.replace(cfg.unet, num_classes=None)
    plain = _components(cfg)
    assert _run(inpaint, plain, prompt="", init_image=_image(), mask=_mask(), steps=2)[0].image.size == (SIZE, SIZE)


# --- bad input -----------------------------------------------------------------------------------------

def _validate(comps, **kw):
    return _req(**kw).validate(comps.config)


def test_bad_inputs_give_clear_errors(tiny, tiny_sr, tmp_path):
    with pytest.raises(ValueError, match="strength must be in"):
        _validate(tiny, task="img2img", init_image=_image(), strength=1.5)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        _validate(tiny, task="img2img", init_image=tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png is not a readable image"):
        _validate(tiny, task="img2img", init_image=tmp_path / "bad.png")
    with pytest.raises(ValueError, match="needs an input image"):
        _validate(tiny, task="img2img")
    with pytest.raises(ValueError, match="mask"):
        _validate(tiny, task="inpaint", init_image=_image())
    with pytest.raises(ValueError, match="is 16x16 but the image is 32x32"):
        _validate(tiny, task="inpaint", init_image=_image(), mask=_mask(16, 16))
    with pytest.raises(ValueError, match="mode 'CMYK'"):
        _validate(tiny, task="inpaint", init_image=_image(), mask=_image().convert("CMYK"))
    with pytest.raises(ValueError, match="entirely black"):
        _validate(tiny, task="inpaint", init_image=_image(), mask=Image.new("L", (SIZE, SIZE)))
    with pytest.raises(ValueError, match="not a multiple of 4.*resize mode"):
        _validate(tiny, task="img2img", init_image=_image(33, 32), resize_mode="none")
    with pytest.raises(ValueError, match="unknown resize mode"):
        _validate(tiny, task="img2img", init_image=_image(), resize_mode="squash")
    with pytest.raises(ValueError, match="unknown masked-content"):
        _validate(tiny, task="inpaint", init_image=_image(), mask=_mask(), inpaint_fill="blur")
    with pytest.raises(ValueError, match="upscale factor"):
        _validate(tiny, task="upscale", init_image=_image(), upscale_factor=0.5)
    with pytest.raises(ValueError, match="noise level"):
        _validate(tiny_sr, task="upscale", init_image=_image(16, 16), noise_level=5000)
    with pytest.raises(ValueError, match="super-resolution model.*daguerre upscale"):
        _validate(tiny_sr, task="img2img", init_image=_image())
    with pytest.raises(ValueError, match="super-resolution model"):
        _run(txt2img, tiny_sr)
    with pytest.raises(ValueError, match="unknown task"):
        _validate(tiny, task="outpaint")


# --- images.py -----------------------------------------------------------------------------------------

def test_image_helpers(tmp_path):
    src = _image(40, 20)
    assert im.resize_image(src, 40, 20, "none") is src
    for mode in ("crop", "fit", "stretch"):
        assert im.resize_image(src, 24, 24, mode).size == (24, 24)
    fit = _px(im.resize_image(src, 40, 40, "fit"))
    np.testing.assert_array_equal(fit[0], fit[9])  # padded rows repeat the edge row
    crop = im.resize_image(_image(48, 32), 24, 16, "crop")  # same aspect: a plain downscale
    np.testing.assert_array_equal(_px(crop), _px(_image(48, 32).resize((24, 16), im.IMAGE_RESAMPLE)))
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    rgba.putpixel((1, 1), (255, 255, 255, 255))
    m = im.load_mask(rgba)  # transparent = keep
    assert m.mode == "L" and m.getpixel((1, 1)) == 255 and m.getpixel((0, 0)) == 0
    filled = im.fill_masked(_image(), _mask())
    keep = np.asarray(_mask()) == 0
    np.testing.assert_array_equal(_px(filled)[keep], _px(_image())[keep])
    grid = im.make_grid([_image(8, 8)] * 5)
    assert grid.size == (24, 16)
    assert im.make_grid([_image(8, 8)] * 3, cols=1).size == (8, 24)
    path = tmp_path / "x.png"
    _image().save(path)
    assert im.load_image(path, "L").mode == "L"
    t = im.image_to_tensor(_image())
    assert t.shape == (1, 3, SIZE, SIZE) and -1 <= t.min() and t.max() <= 1


def test_unset_sampling_settings_come_from_the_model_then_the_global_defaults(tiny):
    from daguerre.pipelines.request import DEFAULT_SETTINGS

    plain = GenerationRequest(prompt="a red circle", seed=1).validate(tiny.config)
    assert {k: getattr(plain, k) for k in DEFAULT_SETTINGS} == DEFAULT_SETTINGS
    config = dataclasses.replace(tiny.config, defaults={"steps": 2, "cfg_scale": 4.0, "sampler": "Euler"})
    resolved = GenerationRequest(prompt="a red circle", seed=1, sampler="Heun").validate(config)
    assert (resolved.steps, resolved.cfg_scale, resolved.sampler, resolved.schedule) == (2, 4.0, "Heun", "Automatic")
    comps = dataclasses.replace(tiny, config=config)
    out = txt2img(comps, GenerationRequest(prompt="a red circle", seed=1).validate(comps.config))
    assert "Steps: 2, Sampler: Euler" in out[0].parameters and "CFG scale: 4," in out[0].parameters
    with pytest.raises(ValueError, match="steps"):
        GenerationRequest(prompt="x", seed=1).validate(dataclasses.replace(config, defaults={"steps": 0}))
