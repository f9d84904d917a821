"""daguerre explain (issue 22): each sub-command's numbers against an independent computation, and the command.

noising against diffusers' alphas_cumprod and the closed form; schedules against diffusers' schedulers;
trajectory against `daguerre generate`'s image; autoencoder's PSNR against a numpy PSNR of a direct VAE pass;
samplers against Euler's closed-form product on Gaussian data. The attention sub-command has its own tests
(tests/test_explain_attention*.py).
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch

import daguerre
from daguerre.cli import main
from daguerre.config import ScheduleConfig
from daguerre.diffusion.gaussian import GaussianData
from daguerre.explain import EXPLAINERS, autoencoder, noising, samplers, schedules, trajectory

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return daguerre.load("random:tiny", dtype="fp32")


@pytest.fixture(scope="module")
def shapes():
    return daguerre.load("shapes", dtype="fp32")


def _image(side: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A smooth test image (1, C, side, side) in [-1, 1]: a blob on a gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    centre = torch.rand(2, generator=g) - 0.5
    blob = torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) * 8)
    img = torch.stack([blob * (0.5 + c / 4) - xx * 0.3 * (c - 1) for c in range(channels)])
    return img.clamp(-1, 1)[None]


# --- noising -----------------------------------------------------------------------------------------------

def test_noising_follows_the_models_schedule_in_both_spaces(tiny):
    from diffusers import DDPMScheduler

    comps = tiny.components
    s = comps.config.schedule
    image = _image(32)
    ts = (0, 100, 500, 999)
    result = noising.noise_image(comps, image, ts, seed=1)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=s.beta_schedule, beta_start=s.beta_start,
                        beta_end=s.beta_end).alphas_cumprod.double()[list(ts)]
    torch.testing.assert_close(result.alphas_cumprod, ref, atol=1e-6, rtol=0)
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with one eps for every t: recover it from each column
    a = result.alphas_cumprod.float().reshape(-1, 1, 1, 1)
    eps = (result.pixels - a.sqrt() * image) / (1 - a).sqrt()
    for k in range(1, len(ts)):
        torch.testing.assert_close(eps[k], eps[0], atol=2e-4, rtol=0)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps[0].std()) - 1) < 0.05
    # at t = 0 (abar 0.99915) the noised image is the input up to a 3% noise; the decoded latent is the reconstruction
    assert float((result.pixels[0] - image[0]).abs().max()) < 0.2
    assert float((result.decoded[0] - result.reconstruction[0]).abs().mean()) < 0.05
    assert result.latents.shape == (len(ts), 4, 16, 16) and result.decoded.shape == (len(ts), 3, 32, 32)


def test_noising_ends_in_pure_noise_with_zero_terminal_snr(shapes):
    """The shipped shapes model's schedule ends at abar = 0: at t = 999 nothing of the image is left."""
    comps = shapes.components
    a = noising.noise_image(comps, _image(64, seed=1), (0, 999), seed=5)
    b = noising.noise_image(comps, _image(64, seed=2), (0, 999), seed=5)
    assert float(a.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(a.pixels[-1], b.pixels[-1])
    torch.testing.assert_close(a.decoded[-1], b.decoded[-1], atol=1e-5, rtol=0)
    assert float((a.pixels[0] - b.pixels[0]).abs().max()) > 0.1  # ... while t = 0 still shows each image


def test_noising_refuses_timesteps_out_of_range(tiny):
    with pytest.raises(ValueError, match="1000 is outside"):
        noising.noise_image(tiny.components, _image(32), (0, 1000))
    with pytest.raises(ValueError, match="between 1 and 12"):
        noising.check_timesteps(tuple(range(13)), 1000)


# --- schedules ---------------------------------------------------------------------------------------------

def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    kinds = [dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2"),
             dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)]
    curves = schedules.standard_schedules(1000)
    assert len(curves) == len(kinds)
    for c, kw in zip(curves, kinds, strict=True):
        ref = DDPMScheduler(num_train_timesteps=1000, **kw).alphas_cumprod.double()  # float32 in diffusers
        torch.testing.assert_close(c.alphas_cumprod, ref, atol=1e-6, rtol=0, msg=c.label)
        finite = c.alphas_cumprod > 0
        clear = ref > 1e-3  # where diffusers' float32 alpha-bar still has 3 significant digits
        torch.testing.assert_close(c.snr[clear], (ref / (1 - ref))[clear], rtol=1e-3, atol=0, msg=c.label)
        torch.testing.assert_close(c.sigmas[finite], c.snr[finite].rsqrt(), rtol=1e-12, atol=0)
    assert curves[3].snr[-1] == 0 and math.isinf(curves[3].sigmas[-1])  # zero terminal SNR
    seqs = schedules.sampling_sigmas(20, schedules.model_curves(ScheduleConfig(), "sd").sigmas)
    for kind, flag in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")):
        sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       **{flag: True})
        sched.set_timesteps(20)
        torch.testing.assert_close(seqs[kind], sched.sigmas.double(), rtol=1e-5, atol=1e-6, msg=kind)
    assert all(len(s) == 21 and s[-1] == 0 for s in seqs.values())


# --- trajectory --------------------------------------------------------------------------------------------

def test_trajectory_ends_in_the_image_generate_makes(tiny):
    comps = tiny.components
    request = tiny.request(PROMPT, steps=4, sampler="Euler", seed=7, cfg_scale=3.0)
    traj = trajectory.sample_trajectory(comps, request)
    assert traj.noisy.shape == traj.estimates.shape == (4, 3, 32, 32)
    torch.testing.assert_close(traj.sigmas, request.sigmas[:-1].double())
    expected = tiny(PROMPT, steps=4, sampler="Euler", seed=7, cfg_scale=3.0)[0].image
    assert np.array_equal(np.asarray(traj.image), np.asarray(expected))
    # Euler's last step to sigma 0 lands on the x0 estimate: the last estimate is the final image
    last = ((traj.estimates[-1].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(last - np.asarray(expected, dtype=np.float64)).max() <= 1
    # the estimates move: the first one (from pure noise) is far from the last
    assert float((traj.estimates[0] - traj.estimates[-1]).abs().mean()) > 1e-3


def test_trajectory_is_bounded(tiny):
    with pytest.raises(ValueError, match="between 1 and 50"):
        trajectory.sample_trajectory(tiny.components, tiny.request(PROMPT, steps=51))


# --- autoencoder -------------------------------------------------------------------------------------------

def test_autoencoder_psnr_is_the_psnr_of_a_direct_vae_pass(tiny):
    comps = tiny.components
    vae = comps.vae
    image = _image(32, seed=3)
    result = autoencoder.reconstruct(comps, image)
    with torch.no_grad():
        direct = vae.decode(vae.encode(image).mean).clamp(-1, 1)
    a, b = (image.numpy() + 1) / 2, (direct.numpy() + 1) / 2
    expected = 10 * np.log10(1.0 / np.mean((a - b) ** 2, dtype=np.float64))
    assert result.psnr == pytest.approx(expected, abs=1e-3)
    torch.testing.assert_close(result.reconstruction, direct, atol=1e-5, rtol=0)
    f = comps.config.vae.downsample_factor
    assert result.latents.shape == (1, 4, 32 // f, 32 // f) and result.factor == f
    assert result.compression == pytest.approx(3 * f * f / 4)
    torch.testing.assert_close(result.error, ((direct - image).abs() / 2).mean(1)[0])


def test_shipped_autoencoder_reconstructs_a_shapes_picture(shapes):
    """A trained first stage keeps a picture of its world: far above the random one's PSNR."""
    from daguerre.data.shapes import render, sample_scene

    rng = np.random.default_rng(0)
    image = torch.from_numpy(np.asarray(render(sample_scene(rng), 64), dtype=np.float32) / 127.5 - 1)
    result = autoencoder.reconstruct(shapes.components, image.permute(2, 0, 1)[None])
    assert result.psnr > 30 and result.ssim > 0.9


# --- samplers ----------------------------------------------------------------------------------------------

def _euler_error(steps: int, sigma_min: float, sigma_max: float, seed: int) -> float:
    """Euler on Gaussian data in closed form: each step multiplies y = x - mu by 1 + (s' - s) s / (v + s^2)."""
    from daguerre.diffusion.gaussian import karras_sigmas

    data = GaussianData(samplers.DIM, seed=samplers.DATA_SEED)
    g = torch.Generator().manual_seed(seed)
    y = sigma_max * torch.randn(samplers.BATCH, samplers.DIM, generator=g, dtype=torch.float64)
    exact = y * torch.sqrt(data.s**2 + sigma_min**2) / torch.sqrt(data.s**2 + sigma_max**2)
    sig = karras_sigmas(steps + 1, sigma_min, sigma_max).tolist()
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        y = y * (1 + (s_next - s) * s / (data.s**2 + s**2))
    return float((y - exact).abs().max() / exact.abs().max())


def test_samplers_error_is_the_exact_error_and_falls_with_steps():
    lo, hi = 0.0292, 14.6146
    euler = samplers.convergence("euler", (5, 10, 20, 40), lo, hi, seed=2)
    for n, err in zip(euler.steps, euler.errors, strict=True):
        assert err == pytest.approx(_euler_error(n, lo, hi, seed=2), rel=1e-3)
    assert list(euler.errors) == sorted(euler.errors, reverse=True) and euler.calls == euler.steps
    assert euler.order == pytest.approx(1.0, abs=0.2)
    heun = samplers.convergence("heun", (10, 20, 40), lo, hi, seed=2)
    assert heun.order == pytest.approx(2.0, abs=0.2) and heun.calls[-1] > 40  # two calls per step
    assert heun.errors[-1] < euler.errors[-1] / 10
    with pytest.raises(ValueError, match="not a deterministic sampler"):
        samplers.convergence("euler_ancestral", (5,), lo, hi)


# --- the command and the page ------------------------------------------------------------------------------

def _pngs_on_page(page) -> int:
    return len(re.findall(r'<img src="data:image/png;base64,', page.read_text()))


@pytest.mark.parametrize("what,extra,figures", [
    ("schedules", ["--steps", "5"], 2),
    ("samplers", ["--samplers", "euler,heun", "--steps", "4,8"], 1),
    ("noising", ["IMAGE", "--timesteps", "0,500,999"], 1),
    ("autoencoder", ["IMAGE"], 2),
    ("trajectory", [PROMPT, "--steps", "3"], 2),
])
def test_cli_writes_figures_and_one_page(tmp_path, capsys, what, extra, figures):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray(((_image(40)[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(picture)
    out = tmp_path / "out"
    args = ["explain", what, *[str(picture) if a == "IMAGE" else a for a in extra], "--model", "random:tiny",
            "--dtype", "fp32", "--out", str(out)]
    assert main(args) == 0
    assert _pngs_on_page(out / "index.html") == figures
    assert len(list(out.glob("*.png"))) == figures
    assert main(args) == 2  # never replaced unless asked
    assert "already holds an explanation" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main(["explain", "schedules", "--steps", "0", "--model", "random:tiny", "--out", str(out)]) == 2
    assert "--steps 0" in capsys.readouterr().err and not (out / "index.html").exists()
    assert main(["explain", "trajectory", PROMPT, "--steps", "500", "--model", "random:tiny", "--out", str(out)]) == 2
    assert "between 1 and 50" in capsys.readouterr().err
    assert main(["explain", "noising", str(tmp_path / "missing.png"), "--model", "random:tiny", "--out",
                 str(out)]) == 2
    assert "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "nothing"])
    assert "invalid choice: 'nothing'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if `pip install daguerre` without [explain]
    assert main(["explain", "schedules", "--model", "random:tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'daguerre[explain]'" in err and len(err.splitlines()) == 1


def test_every_explainer_has_a_module():
    from pathlib import Path

    folder = Path(noising.__file__).parent
    assert {n for n in EXPLAINERS if n != "attention"} <= {p.stem for p in folder.glob("*.py")}
    for name in ("noising", "schedules", "trajectory", "autoencoder", "samplers"):
        module = sys.modules[f"daguerre.explain.{name}"]
        assert callable(module.add_arguments) and callable(module.run)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A Stable Diffusion v1 single-file checkpoint (CompVis keys, SD conventions) with small random weights."""
    from safetensors.torch import save_file

    from test_checkpoints import random_components, sd_state_dict, small_config

    path = tmp_path_factory.mktemp("sd") / "sd-v1-small.safetensors"
    save_file(sd_state_dict(random_components(small_config())), str(path))
    return path


@pytest.mark.parametrize("what,extra", [
    ("noising", ["IMAGE", "--size", "64", "--timesteps", "0,999"]),
    ("autoencoder", ["IMAGE", "--size", "64"]),
    ("trajectory", [PROMPT, "--size", "64", "--steps", "2"]),
    ("schedules", []),
])
def test_cli_on_a_stable_diffusion_checkpoint(tmp_path, sd_file, what, extra):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray(((_image(48)[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(picture)
    out = tmp_path / "out"
    args = ["explain", what, *[str(picture) if a == "IMAGE" else a for a in extra], "--model", str(sd_file),
            "--dtype", "fp32", "--out", str(out)]
    assert main(args) == 0
    assert _pngs_on_page(out / "index.html") >= 1


def test_trajectory_decodes_like_the_previews(shapes):
    """--decode approx: the previews' linear map (PreviewDecoder); a wrong mode is refused by name."""
    request = shapes.request(PROMPT, steps=3, seed=1)
    traj = trajectory.sample_trajectory(shapes.components, request, decode="approx")
    assert traj.estimates.shape == traj.noisy.shape == (3, 3, 64, 64)
    assert float((traj.estimates[-1] - traj.estimates[-1].mean()).abs().mean()) > 0.01  # a picture, not a flat fill
    with pytest.raises(ValueError, match="--decode 'exact'"):
        trajectory.sample_trajectory(shapes.components, request, decode="exact")


def test_the_command_line_stays_light():
    """`daguerre --help` builds every parser: explain's sub-commands are imported only when one runs."""
    import subprocess

    code = ("import sys; from daguerre.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'matplotlib', 'daguerre.explain.noising') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
