"""`eta`, as AUTOMATIC1111 uses it: the noise of each step of an ancestral / SDE sampler (A1111's
`eta_ancestral`, default 1) and of DDIM (`eta_ddim`, default 0); a request's eta overrides either,
other samplers ignore it. Written to the PNG parameters as A1111 writes it ("Eta", "Eta DDIM"), read
back by --from-png, set by --eta."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from PIL import Image

import daguerre
from daguerre.cli import main
from daguerre.diffusion.sampler_names import SAMPLER_NAMES, SAMPLERS
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pngmeta import parse_parameters, read_png_parameters


@pytest.fixture(scope="module")
def pipe():
    return daguerre.load("random:tiny")


def _pixels(results) -> np.ndarray:
    return np.asarray(results[0].image.convert("RGB")).astype(int)


def _run(pipe, sampler: str, eta: float | None):
    return pipe("a red circle", steps=6, seed=3, sampler=sampler, eta=eta)


def test_every_sampler_with_eta_takes_it_and_none_other_does():
    for s in SAMPLER_NAMES:
        param = inspect.signature(SAMPLERS[s.sampler]).parameters.get("eta")
        if s.eta is None:
            assert param is None, f"{s.label} takes eta but its SamplerName says it has none"
        else:
            assert param is not None and param.default == s.eta.default, s.label


def test_euler_a_at_eta_0_is_euler(pipe):
    """Euler ancestral with no fresh noise is Euler's step to sigma_next: the same image."""
    np.testing.assert_allclose(_pixels(_run(pipe, "Euler a", 0.0)), _pixels(_run(pipe, "Euler", None)), atol=1)
    assert np.abs(_pixels(_run(pipe, "Euler a", None)) - _pixels(_run(pipe, "Euler", None))).max() > 10


def test_defaults_are_a1111s(pipe):
    assert np.array_equal(_pixels(_run(pipe, "Euler a", None)), _pixels(_run(pipe, "Euler a", 1.0)))
    assert np.array_equal(_pixels(_run(pipe, "DDIM", None)), _pixels(_run(pipe, "DDIM", 0.0)))


def test_ddim_with_eta_adds_noise(pipe):
    assert np.abs(_pixels(_run(pipe, "DDIM", 0.8)) - _pixels(_run(pipe, "DDIM", 0.0))).max() > 10


def test_a_sampler_without_eta_ignores_it_as_a1111_does(pipe):
    """webuiapi sends eta=1.0 with every request: DPM++ 2M runs as without it, and no Eta is written."""
    results = _run(pipe, "DPM++ 2M", 1.0)
    assert np.array_equal(_pixels(results), _pixels(_run(pipe, "DPM++ 2M", None)))
    assert "Eta" not in parse_parameters(results[0].parameters)[2]


@pytest.mark.parametrize(("sampler", "eta", "written"), [
    ("Euler a", 0.5, {"Eta": "0.5"}), ("Euler a", 1.0, {}), ("DPM++ 2M SDE", 0.0, {"Eta": "0"}),
    ("DDIM", 0.5, {"Eta DDIM": "0.5"}), ("DDIM", 0.0, {}), ("Euler", 0.5, {}),
])
def test_eta_in_the_png_parameters_as_a1111_writes_it(pipe, sampler, eta, written):
    params = parse_parameters(pipe("x", steps=2, seed=1, sampler=sampler, eta=eta)[0].parameters)[2]
    assert {k: v for k, v in params.items() if k.startswith("Eta")} == written
    if written:
        assert settings_from_parameters(pipe("x", steps=2, seed=1, sampler=sampler, eta=eta)[0].parameters
                                        ).fields["eta"] == eta


@pytest.mark.parametrize("eta", [-0.1, float("nan"), "1", True])
def test_a_bad_eta_is_refused_by_name(pipe, eta):
    with pytest.raises(ValueError, match="eta"):
        pipe.request("x", eta=eta)


def test_cli_eta_and_from_png(tmp_path, capsys):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", "random:tiny", "--steps", "3", "--seed", "4", "--sampler", "Euler a"]
    assert main(["generate", "a red circle", "--eta", "0.25", "-o", str(first), *common]) == 0
    assert parse_parameters(read_png_parameters(first))[2]["Eta"] == "0.25"
    assert main(["generate", "--from-png", str(first), "--model", "random:tiny", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))  # eta read back
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    out = tmp_path / "c.png"
    assert main(["img2img", str(image), "x", "--eta", "0.5", "-o", str(out), *common]) == 0
    assert parse_parameters(read_png_parameters(out))[2]["Eta"] == "0.5"
    capsys.readouterr()
