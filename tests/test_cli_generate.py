"""`daguerre generate`: --from-png makes the identical image again, flags override the file, previews
and the GIF are written, grids, --list-samplers, and user errors as one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from daguerre.cli import main
from daguerre.components import build_components
from daguerre.config import preset
from daguerre.diffusion.sampler_names import sampler_table
from daguerre.pngmeta import parse_parameters, read_png_parameters

FAST = ["--steps", "3", "--size", "16x16"]


@pytest.fixture(scope="module")
def live_model(tmp_path_factory) -> str:
    """A tiny checkpoint whose U-Net output layer is not zero, so images depend on prompt and settings.

    (An untrained `random:tiny` U-Net predicts zero noise: its images depend on the seed alone.)
    """
    from daguerre.checkpoints import save_model

    comps = build_components(preset("tiny"), seed=3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for p in comps.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("model") / "live.safetensors"
    save_model(comps, path)
    return str(path)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_from_png_reproduces_the_random_tiny_image(tmp_path, capsys):
    first = tmp_path / "a.png"
    code, out, _ = _run(capsys, "a (red:1.2) cat, colon: text", "-N", 'no "quotes"', "--model", "random:tiny",
                        "--seed", "11", "--sampler", "Euler a", "--cfg", "5.5", "--clip-skip", "2", *FAST,
                        "-o", str(first))
    assert code == 0 and out.strip() == str(first)
    again = tmp_path / "b.png"
    # a file never selects a random: model (random:sd15 would build 860M parameters): --model names it
    code, _, err = _run(capsys, "--from-png", str(first), "--model", "random:tiny", "-o", str(again))
    assert code == 0, err
    assert np.array_equal(_pixels(first), _pixels(again))
    assert read_png_parameters(again) == read_png_parameters(first)


def test_from_png_reproduces_a_live_model_image_and_flags_override(tmp_path, capsys, live_model):
    first = tmp_path / "a.png"
    settings = ["--model", live_model, "--seed", "5", "--sampler", "DPM++ 2M", "--schedule", "Exponential",
                "--cfg", "4", "--steps", "3", "--size", "20x12", "--clip-skip", "2"]
    code, _, err = _run(capsys, "a red cat, (sitting:1.3)", "-N", "blurry", *settings, "-o", str(first))
    assert code == 0, err
    again = tmp_path / "b.png"
    assert _run(capsys, "--from-png", str(first), "--model", live_model, "-o", str(again))[0] == 0
    assert np.array_equal(_pixels(first), _pixels(again))

    # the image depends on the prompt, so the equality above is not an accident of the model
    other = tmp_path / "c.png"
    assert _run(capsys, "--from-png", str(first), "--model", live_model, "a blue dog", "-o", str(other))[0] == 0
    assert not np.array_equal(_pixels(first), _pixels(other))
    prompt, negative, params = parse_parameters(read_png_parameters(other))
    assert (prompt, negative) == ("a blue dog", "blurry")  # the flag overrides, the file supplies the rest
    assert params["Seed"] == "5" and params["Size"] == "20x12" and params["Schedule type"] == "Exponential"
    assert params["Clip skip"] == "2" and params["CFG scale"] == "4"

    # passing a flag equal to its default still overrides the file (explicit flags are detected)
    same_seed = tmp_path / "d.png"
    assert _run(capsys, "--from-png", str(first), "--model", live_model, "--cfg", "7",
                "-o", str(same_seed))[0] == 0
    params = parse_parameters(read_png_parameters(same_seed))[2]
    assert params["CFG scale"] == "7" and params["Steps"] == "3" and params["Seed"] == "5"


def test_from_png_notes_unavailable_model_and_ignored_settings(tmp_path, capsys):
    png = tmp_path / "a1111.png"
    text = ("a cat\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 9, Size: 16x16, Model: v1-5-pruned-emaonly, "
            "Denoising strength: 0.7")
    from daguerre.pngmeta import save_png

    save_png(Image.new("RGB", (16, 16)), png, text)
    code, _, err = _run(capsys, "--from-png", str(png), "--model", "random:tiny", "-o", str(tmp_path / "o.png"))
    assert code == 0
    assert "Denoising strength" in err
    params = parse_parameters(read_png_parameters(tmp_path / "o.png"))[2]
    assert params["Steps"] == "2" and params["Sampler"] == "Euler" and params["Seed"] == "9"


def test_preview_writes_steps_and_gif(tmp_path, capsys, live_model):
    out, prev = tmp_path / "out", tmp_path / "prev"
    code, stdout, err = _run(capsys, "a cat", "--model", live_model, "--seed", "1", "--steps", "4", "--size",
                             "16x16", "--n", "2", "-o", str(out), "--preview", str(prev))
    assert code == 0, err
    steps = sorted(p.name for p in prev.glob("*step_*.png"))
    assert steps == sorted([f"step_{i:03d}.png" for i in range(4)] + [f"image001_step_{i:03d}.png" for i in range(4)])
    with Image.open(prev / "preview.gif") as gif:
        assert gif.n_frames >= 2  # identical consecutive frames are merged by the GIF writer
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB")).astype(int)
    finals = [_pixels(p) for p in sorted(out.glob("0*.png"))]
    assert len(finals) == 2 and (out / f"grid-{sorted(out.glob('0*.png'))[0].stem}.png").exists()
    # the last GIF frame shows the final images side by side (up to the 256-colour palette)
    assert last.shape == (16, 32, 3)
    assert np.abs(last - np.concatenate(finals, axis=1).astype(int)).mean() < 8
    # the per-step previews change as the sampler proceeds
    first, final_step = _pixels(prev / "step_000.png"), _pixels(prev / "step_003.png")
    assert first.shape == (16, 16, 3) and not np.array_equal(first, final_step)


def test_no_grid_and_numbering(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, "--model", "random:tiny", "--seed", "3", *FAST, "--n", "2", "--no-grid", "-o", str(out))[0] == 0
    assert _run(capsys, "--model", "random:tiny", "--seed", "7", *FAST, "-o", str(out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-3.png", "00001-4.png", "00002-7.png"]


def test_list_samplers(capsys):
    code, out, _ = _run(capsys, "--list-samplers")
    assert code == 0 and out.strip() == sampler_table()


@pytest.mark.parametrize("argv,message", [
    (["--from-png", "missing.png"], "no such image"),
    (["--model", "random:tiny", "--sampler", "DPM++ 9M"], "unknown sampler"),
    (["--model", "random:tiny", "--size", "30x30"], "not a positive multiple"),
    (["--model", "random:tiny", "--preview-mode", "full", "--preview", "{file}"], "is a file"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a.replace("{file}", str(blocker)) for a in argv]
    code, _, err = _run(capsys, *argv, *FAST[:2], "-o", str(tmp_path / "o.png"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daguerre generate: error:") and message in lines[0]


# --- preview decoding ----------------------------------------------------------------------------------

class _LinearVAE(torch.nn.Module):
    """A 'VAE' whose decoder is exactly linear per latent cell: pixels = W (z / scale) + b, nearest-upsampled."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        from daguerre.config import VAEConfig

        self.config = VAEConfig(channel_mult=(1, 2, 4), scale_factor=0.5)  # f = 4
        self.proj = torch.nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.proj.weight.copy_(weight[:, :, None, None])
            self.proj.bias.copy_(bias)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.proj(z), scale_factor=4, mode="nearest")


def test_latent_to_rgb_fit_recovers_a_linear_decoder():
    from daguerre.pipelines.preview import approx_decode, fit_latent_to_rgb

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 4, generator=gen) * 0.1, torch.randn(3, generator=gen) * 0.1
    vae = _LinearVAE(weight, bias)
    w, b, r2 = fit_latent_to_rgb(vae)
    torch.testing.assert_close(w, weight / vae.config.scale_factor, atol=1e-4, rtol=0)  # diffusion-latent space
    torch.testing.assert_close(b, bias, atol=1e-4, rtol=0)
    assert r2 == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(2, 4, 5, 6, generator=gen)
    with torch.no_grad():
        exact = vae.decode(vae.unscale_latents(z))[:, :, ::4, ::4].clamp(-1, 1)
    torch.testing.assert_close(approx_decode(z, w, b), exact, atol=1e-4, rtol=0)


def test_preview_of_an_untrained_vae_falls_back_to_full_decoding(tmp_path):
    from daguerre.pipelines.preview import PreviewWriter, to_pil
    from daguerre.pipelines.tiling import decode_latents

    vae = build_components(preset("tiny")).vae
    writer = PreviewWriter(vae, tmp_path / "p", "approx")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    writer({"i": 0, "denoised": z, "batch_start": 0})
    assert writer.mode == "full"  # a random VAE is far from linear per cell
    with torch.no_grad():
        expected = _array(to_pil(decode_latents(vae, z))[0])
    assert np.array_equal(_pixels(tmp_path / "p" / "step_000.png"), expected)
    assert writer.finish() == tmp_path / "p" / "preview.gif"
    with pytest.raises(ValueError, match="preview mode"):
        PreviewWriter(vae, tmp_path / "q", "fast")
    with pytest.raises(ValueError, match="already holds previews .*--overwrite"):  # never replaced unasked
        PreviewWriter(vae, tmp_path / "p", "approx")
    before = (tmp_path / "p" / "step_000.png").read_bytes()
    PreviewWriter(vae, tmp_path / "p", "approx", overwrite=True)({"i": 0, "denoised": -z, "batch_start": 0})
    assert (tmp_path / "p" / "step_000.png").read_bytes() != before


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


def test_threads_are_automatic_for_small_models_and_settable(tmp_path):
    import torch

    from daguerre.cli import main

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ["generate", "a red circle", "--model", "random:tiny", "--steps", "1", "--seed", "1"]
        assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
        assert torch.get_num_threads() == 1  # a small U-Net: one thread
        assert main([*args, "--threads", "2", "--out", str(tmp_path / "b.png")]) == 0
        assert torch.get_num_threads() == 2
        assert main([*args, "--threads", "-1", "--out", str(tmp_path / "c.png")]) == 2
    finally:
        torch.set_num_threads(before)
