"""Guidance truncation (issue 15, item 4): below `cfg_min_sigma` every other call of classifier-free guidance
skips its unconditional half and uses the conditional prediction alone (A1111's NGMS, `s_min_uncond`, and its
rule, so its images replay). Off (0) it is plain CFG, bit for bit; in between it runs fewer U-Net batch rows.
The CFG cutoff (`cfg_cutoff_sigma`, diffusers' `SDCFGCutoffCallback`) does the same on EVERY call below its sigma.
The CLI flag, PNG key and payload key are walked with the rest of the field table in
tests/test_request_fields.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daguerre.config import preset
from daguerre.guidance import cfg_denoiser
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.request import GenerationRequest
from daguerre.pipelines.txt2img import txt2img
from daguerre.server.payload import request_from_payload
from test_pipelines import _components

SHAPE = (3, 4, 6, 6)


class Spy:
    """A nonlinear plain-function denoiser that records the batch rows and sigmas of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond=None):
        sig = sigma if torch.is_tensor(sigma) else torch.tensor(sigma)
        self.calls.append((x.shape[0], sig.clone()))
        c = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(x * c) / (1 + sig.reshape(-1, 1, 1, 1)) + 0.1 * c


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * 3
    sigma = torch.tensor([0.3, 1.5, 8.0])
    cond = {"context": torch.randn(3, 7, 8, generator=g) + 1}
    uncond = {"context": torch.randn(3, 7, 8, generator=g)}
    return x, sigma, cond, uncond


def test_threshold_zero_is_plain_cfg_bit_for_bit():
    x, sigma, cond, uncond = _inputs()
    plain, off = Spy(), Spy()
    expected = cfg_denoiser(plain, uncond, 5.0, rescale=0.3)(x, sigma, cond)
    got = cfg_denoiser(off, uncond, 5.0, rescale=0.3, min_sigma=0.0)(x, sigma, cond)
    assert torch.equal(got, expected)
    assert [b for b, _ in off.calls] == [b for b, _ in plain.calls] == [6]


def test_below_the_threshold_a_call_is_the_conditional_prediction_with_half_the_rows():
    x, sigma, cond, uncond = _inputs()
    spy, ref = Spy(), Spy()
    truncated = cfg_denoiser(spy, uncond, 5.0, min_sigma=8.5)  # every sigma below 8.5
    first, got = truncated(x, sigma, cond), truncated(x, sigma, cond)  # call 0 guided, call 1 truncated
    assert torch.equal(first, cfg_denoiser(Spy(), uncond, 5.0)(x, sigma, cond))
    assert torch.equal(got, cfg_denoiser(ref, uncond, 1.0)(x, sigma, cond))
    assert [b for b, _ in spy.calls] == [6, 3]
    # one row at or above the threshold keeps the whole call guided (a batch is never split)
    spy = Spy()
    both = cfg_denoiser(spy, uncond, 5.0, min_sigma=8.0)
    both(x, sigma, cond)
    guided = both(x, sigma, cond)
    assert torch.equal(guided, cfg_denoiser(Spy(), uncond, 5.0)(x, sigma, cond))
    assert [b for b, _ in spy.calls] == [6, 6]
    assert not torch.equal(guided, got)  # the guidance did reach the output


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_a_threshold_that_is_not_a_finite_number_at_least_zero_is_refused(bad):
    with pytest.raises(ValueError, match="minimum sigma"):
        cfg_denoiser(Spy(), {}, 7.0, min_sigma=bad)
    with pytest.raises(ValueError, match="cfg_min_sigma|cfg minimum sigma"):
        GenerationRequest(prompt="a", steps=2, cfg_min_sigma=bad).validate(preset("tiny"))


# --- through the pipeline, on the tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return _components(preset("tiny"))  # a U-Net whose prediction depends on the prompt


def _run(comps, **fields):
    """The images of a txt2img run and the batch rows of each U-Net call."""
    rows = []
    hook = comps.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        fields = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 6, "sampler": "Euler", "seed": 5,
                  "cfg_scale": 6.0, **fields}
        request = GenerationRequest(**fields).validate(comps.config)
        results = txt2img(comps, request)
    finally:
        hook.remove()
    return request, [np.asarray(r.image) for r in results], rows


def test_pipeline_threshold_zero_is_the_exact_path(tiny):
    _, exact, exact_rows = _run(tiny)
    request, off, off_rows = _run(tiny, cfg_min_sigma=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(off, exact, strict=True)) and off_rows == exact_rows == [2] * 6


def test_pipeline_threshold_above_every_sigma_skips_every_other_call(tiny):
    """A1111's rule: below the threshold the odd calls (1, 3, 5, ...) run the conditional half alone."""
    request, truncated, rows = _run(tiny, cfg_min_sigma=1e6)
    assert float(request.sigmas.max()) < 1e6
    assert rows == [2, 1] * 3
    _, guided, _ = _run(tiny)
    _, conditional, _ = _run(tiny, cfg_scale=1.0)
    for other in (guided, conditional):  # neither plain CFG nor no guidance at all
        assert any(not np.array_equal(a, b) for a, b in zip(truncated, other, strict=True))


def test_pipeline_runs_fewer_unet_rows_below_the_threshold(tiny):
    plain, exact, exact_rows = _run(tiny)
    threshold = float(plain.sigmas[2])  # Euler calls the U-Net once at each of sigmas[0..5]
    request, images, rows = _run(tiny, cfg_min_sigma=threshold)
    expected = [1 if float(s) < threshold and i % 2 else 2 for i, s in enumerate(request.sigmas[:-1])]
    assert rows == expected and sum(rows) < sum(exact_rows) and expected.count(1) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(images, exact, strict=True))
    assert "NGMS: " in txt2img(tiny, request)[0].parameters


# --- the surfaces ------------------------------------------------------------------------------------------

def test_the_a1111_payload_and_the_png_text_carry_the_threshold(tiny):
    request = request_from_payload({"prompt": "a", "s_min_uncond": 2.5, "steps": 2})
    assert request.cfg_min_sigma == 2.5
    assert request_from_payload({"prompt": "a", "s_min_uncond": None}).cfg_min_sigma == 0.0  # A1111's default
    valid = request.validate(tiny.config)
    params = settings_from_parameters(txt2img(tiny, valid)[0].parameters, "png")
    assert math.isclose(params.fields["cfg_min_sigma"], 2.5)
    plain = settings_from_parameters(txt2img(tiny, GenerationRequest(prompt="a", steps=2).validate(tiny.config))[0]
                                     .parameters, "png")
    assert "cfg_min_sigma" not in plain.fields  # off: not written, as A1111 leaves NGMS out at 0


# --- the CFG cutoff: every call below the sigma ------------------------------------------------------------

def test_cutoff_zero_is_plain_cfg_bit_for_bit():
    x, sigma, cond, uncond = _inputs()
    plain, off = Spy(), Spy()
    expected = [cfg_denoiser(plain, uncond, 5.0, rescale=0.3)(x, sigma, cond) for _ in range(3)]
    cut = cfg_denoiser(off, uncond, 5.0, rescale=0.3, cutoff_sigma=0.0)
    assert all(torch.equal(cut(x, sigma, cond), e) for e in expected)
    assert [b for b, _ in off.calls] == [b for b, _ in plain.calls] == [6, 6, 6]


def test_below_the_cutoff_every_call_is_the_conditional_half_alone():
    x, sigma, cond, uncond = _inputs()
    spy, ref = Spy(), Spy()
    cut = cfg_denoiser(spy, uncond, 5.0, cutoff_sigma=8.5)  # every sigma below 8.5
    for _ in range(3):
        assert torch.equal(cut(x, sigma, cond), ref(x, sigma, cond))
    assert [b for b, _ in spy.calls] == [3, 3, 3]
    spy = Spy()
    assert torch.equal(cfg_denoiser(spy, uncond, 5.0, cutoff_sigma=8.0)(x, sigma, cond),  # one row at 8.0
                       cfg_denoiser(Spy(), uncond, 5.0)(x, sigma, cond))
    assert [b for b, _ in spy.calls] == [6]


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_a_cutoff_that_is_not_a_finite_number_at_least_zero_is_refused(bad):
    with pytest.raises(ValueError, match="cutoff sigma"):
        cfg_denoiser(Spy(), {}, 7.0, cutoff_sigma=bad)
    with pytest.raises(ValueError, match="cfg_cutoff_sigma|CFG cutoff sigma"):
        GenerationRequest(prompt="a", steps=2, cfg_cutoff_sigma=bad).validate(preset("tiny"))


def test_pipeline_cutoff_zero_is_the_exact_path(tiny):
    _, exact, exact_rows = _run(tiny)
    _, off, off_rows = _run(tiny, cfg_cutoff_sigma=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(off, exact, strict=True)) and off_rows == exact_rows == [2] * 6


def test_pipeline_below_the_cutoff_runs_one_batch_half_per_call(tiny):
    plain, exact, _ = _run(tiny)
    threshold = float(plain.sigmas[2])  # Euler calls the U-Net once at each of sigmas[0..5]
    request, images, rows = _run(tiny, cfg_cutoff_sigma=threshold)
    assert rows == [2, 2, 2, 1, 1, 1]  # sigmas[3..5] lie below sigmas[2]
    assert any(not np.array_equal(a, b) for a, b in zip(images, exact, strict=True))
    # guidance did run on the first calls: not the images of no guidance at all
    _, conditional, _ = _run(tiny, cfg_scale=1.0)
    assert any(not np.array_equal(a, b) for a, b in zip(images, conditional, strict=True))
    params = settings_from_parameters(txt2img(tiny, request)[0].parameters, "png")
    assert params.fields["cfg_cutoff_sigma"] == threshold  # written in full, read back exactly


def test_the_a1111_payload_carries_the_cutoff():
    assert request_from_payload({"prompt": "a", "cfg_cutoff_sigma": 1.25}).cfg_cutoff_sigma == 1.25
    assert request_from_payload({"prompt": "a"}).cfg_cutoff_sigma == 0.0
