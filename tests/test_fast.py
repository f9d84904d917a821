"""`fast` (issue 15, item 4): a preset of the fewer-network-calls settings that pay (DeepCache and the CFG
cutoff; docs/benchmarks.md, "Fewer network calls"). It fills in the individual settings at `validate`, and
those, not `fast`, are what the PNG parameters record, so `--from-png` replays the image without it."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from daguerre.commands.request_args import add_request_arguments, request_fields
from daguerre.config import preset
from daguerre.pipelines.infotext import settings_from_parameters
from daguerre.pipelines.request import (
    FAST_CUTOFF_FRACTION,
    FAST_DEEPCACHE,
    FAST_DEEPCACHE_FRACTION,
    FAST_TOME,
    GenerationRequest,
    cutoff_between,
)
from daguerre.pipelines.txt2img import txt2img
from daguerre.server.payload import request_from_payload
from test_pipelines import _components

TINY = preset("tiny")


@pytest.fixture(scope="module")
def tiny():
    return _components(preset("tiny"))


def _rows(comps, request):
    """The images of a txt2img run and the batch rows of each U-Net call and of each middle-block call."""
    rows, deep = [], []
    hooks = [comps.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])),
             comps.unet.middle_block.register_forward_pre_hook(lambda m, args: deep.append(args[0].shape[0]))]
    try:
        results = txt2img(comps, request)
    finally:
        for h in hooks:
            h.remove()
    return results, rows, deep


def test_fast_fills_in_the_preset_and_runs_fewer_rows(tiny):
    fields = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 10, "sampler": "Euler", "seed": 3}
    exact = GenerationRequest(**fields).validate(tiny.config)
    fast = GenerationRequest(**fields, fast=True).validate(tiny.config)
    assert (fast.deepcache_interval, fast.deepcache_depth, fast.tome_ratio) == (*FAST_DEEPCACHE, FAST_TOME)
    assert fast.cfg_cutoff_sigma == cutoff_between(fast.sigmas, FAST_CUTOFF_FRACTION) > 0
    assert fast.deepcache_max_sigma == cutoff_between(fast.sigmas, FAST_DEEPCACHE_FRACTION) > 0
    _, exact_rows, exact_deep = _rows(tiny, exact)
    results, rows, deep = _rows(tiny, fast)
    cut = round(FAST_CUTOFF_FRACTION * 10)
    assert rows == [2] * (10 - cut) + [1] * cut and exact_rows == [2] * 10
    assert len(deep) < len(exact_deep) == 10
    assert "fast" not in results[0].parameters.lower()


def test_the_png_records_the_settings_and_replays_without_fast(tiny):
    fast = GenerationRequest(prompt="a red circle", steps=8, sampler="Euler", seed=4, fast=True).validate(tiny.config)
    first = txt2img(tiny, fast)[0]
    read = settings_from_parameters(first.parameters, "png")
    assert "fast" not in read.fields and read.ignored == []
    replay = GenerationRequest(**read.fields).validate(tiny.config)  # a depth at its default is left out
    assert (replay.deepcache_interval, replay.deepcache_depth, replay.tome_ratio, replay.cfg_cutoff_sigma,
            replay.deepcache_max_sigma) == (*FAST_DEEPCACHE, FAST_TOME, fast.cfg_cutoff_sigma, fast.deepcache_max_sigma)
    again = txt2img(tiny, replay)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert again.parameters == first.parameters


def test_an_explicit_setting_wins_over_the_preset():
    valid = GenerationRequest(prompt="a", steps=8, fast=True, deepcache_interval=2, deepcache_depth=2,
                              cfg_cutoff_sigma=0.5, tome_ratio=0.25).validate(TINY)
    assert (valid.deepcache_interval, valid.deepcache_depth, valid.cfg_cutoff_sigma, valid.tome_ratio) == (
        2, 2, 0.5, 0.25)


def test_without_guidance_there_is_no_cutoff_to_fill_in():
    valid = GenerationRequest(prompt="a", steps=8, cfg_scale=1.0, fast=True).validate(TINY)
    assert valid.cfg_cutoff_sigma == 0.0 and valid.deepcache_interval == FAST_DEEPCACHE[0]


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 25, 50])
def test_the_cutoff_falls_between_the_last_guided_step_and_the_first_cut_one(steps):
    sigmas = GenerationRequest(prompt="a", steps=steps).validate(TINY).sigmas
    for fraction in (0.2, 0.3, 0.5):
        sigma = cutoff_between(sigmas, fraction)
        below = int((sigmas[:-1] < sigma).sum())  # the calls of a one-call-per-step sampler it cuts
        expected = min(round(fraction * steps), steps - 1) if steps >= 2 else 0
        assert below == expected, (steps, fraction)
        assert sigma == 0 or not torch.isclose(sigmas.double(), torch.tensor(sigma, dtype=torch.float64)).any()


def test_fast_on_every_surface():
    parser = argparse.ArgumentParser()
    add_request_arguments(parser, "txt2img")
    assert request_fields(parser.parse_args(["a", "--fast"]), "txt2img") == {"prompt": "a", "fast": True}
    assert request_from_payload({"prompt": "a", "fast": True}).fast is True
    assert GenerationRequest(prompt="a", fast=True).validate(TINY).deepcache_interval == FAST_DEEPCACHE[0]
    with pytest.raises(ValueError, match="fast must be true"):
        GenerationRequest(prompt="a", fast="yes").validate(TINY)


def test_eval_takes_the_settings_and_reports_what_ran(tmp_path, capsys):
    import json

    from daguerre.cli import main

    out = tmp_path / "ev"
    code = main(["eval", "--model", "random:tiny", "--dataset", "shapes", "--n", "2", "--steps", "4", "--real", "8",
                 "--no-progress", "--batch", "2", "--fast", "--tome", "0.25", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    ran = json.loads((out / "report.json").read_text())["settings"]["fewer_calls"]
    sigmas = GenerationRequest(prompt="a", steps=4).validate(TINY).sigmas
    assert ran == {"cfg_min_sigma": 0.0, "cfg_cutoff_sigma": cutoff_between(sigmas, FAST_CUTOFF_FRACTION),
                   "deepcache_interval": FAST_DEEPCACHE[0], "deepcache_depth": FAST_DEEPCACHE[1],
                   "deepcache_max_sigma": cutoff_between(sigmas, FAST_DEEPCACHE_FRACTION), "tome_ratio": 0.25}
    assert "fewer network calls: " in stdout
