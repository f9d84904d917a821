"""`GenerationRequest.validate` warns when a run on a zero-terminal-SNR model takes fewer than MIN_LOW_STEPS steps
below LOW_SIGMA (docs/samplers.md, "Zero-terminal-SNR models"), counted on the run's own sigmas, and names the
fewest steps that are enough; it stays quiet for the model's recommended settings and for SD v1 / v2 models."""

from __future__ import annotations

import re
import warnings

import pytest
from PIL import Image

from daguerre.checkpoints.summary import describe
from daguerre.cli import main
from daguerre.components import build_components
from daguerre.config import ModelConfig, preset
from daguerre.pipelines.request import LOW_SIGMA, MIN_LOW_STEPS, GenerationRequest
from daguerre.registry import shipped_models

WARNING = "zero-terminal-SNR model"


def _ztsnr_tiny() -> ModelConfig:
    cfg = preset("tiny")
    cfg.schedule.zero_terminal_snr, cfg.schedule.prediction_type = True, "v_prediction"
    return cfg


@pytest.fixture(scope="module")
def shapes_config() -> ModelConfig:
    return ModelConfig.from_dict(describe(shipped_models()["shapes"], hashes=False)["config"])


def _validate(cfg: ModelConfig, **fields) -> tuple[list[str], object]:
    """(the zero-terminal-SNR warnings `validate` gave, the ValidRequest)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        valid = GenerationRequest(prompt="a red circle", **fields).validate(cfg)
    return [str(w.message) for w in caught if WARNING in str(w.message)], valid


def _below(valid) -> int:
    """Steps of the run that start below LOW_SIGMA, from the ValidRequest's own sigmas."""
    return sum(1 for s in valid.sigmas[:-1].tolist() if s < LOW_SIGMA)


@pytest.mark.parametrize("sampler,schedule,steps,label", [
    ("DPM++ 2M", "Karras", 10, "Karras"), ("Euler", "Exponential", 6, "Exponential"),
    ("DPM2", "Karras", 10, "Karras"),  # one step more, the next-to-last sigma dropped
    ("UniPC", None, 4, "Uniform"),  # a sampler that ignores the schedule type: named by what it runs
    ("DPM++ 2M SDE", None, 8, "Exponential"),  # Automatic
])
def test_few_steps_below_sigma_15_warn_with_the_fewest_that_suffice(sampler, schedule, steps, label):
    cfg = _ztsnr_tiny()
    found, valid = _validate(cfg, sampler=sampler, schedule=schedule, steps=steps)
    assert len(found) == 1 and _below(valid) < MIN_LOW_STEPS
    assert found[0].startswith(f"{sampler} on the {label} schedule at {steps} steps takes {_below(valid)} step(s) "
                               "below sigma 15 on this zero-terminal-SNR model (sigma_max 4096)")
    enough = int(re.search(r"use (\d+) steps or more", found[0]).group(1))
    more, valid = _validate(cfg, sampler=sampler, schedule=schedule, steps=enough)  # enough: no warning ...
    assert more == [] and _below(valid) >= MIN_LOW_STEPS
    fewer, valid = _validate(cfg, sampler=sampler, schedule=schedule, steps=enough - 1)  # ... and the fewest
    assert len(fewer) == 1 and _below(valid) < MIN_LOW_STEPS


def test_karras_at_10_steps_on_shapes_names_the_recommended_schedule(shapes_config):
    found, _ = _validate(shapes_config, sampler="DPM++ 2M", schedule="Karras", steps=10)
    assert len(found) == 1 and "3 step(s)" in found[0]
    recommended = shapes_config.defaults["schedule"]
    assert f"use the model's recommended schedule {recommended} or " in found[0]
    assert _validate(shapes_config, sampler="DPM++ 2M", schedule=recommended, steps=10)[0] == []


def test_no_warning_for_the_recommended_settings_nor_for_sd(shapes_config):
    assert shapes_config.schedule.zero_terminal_snr and shapes_config.defaults
    assert _validate(shapes_config)[0] == []  # the model's own sampler, schedule and steps
    for name in ("sd15", "sd21"):  # sigma_max 14.6: every step is below 15, and no zero terminal SNR
        cfg = preset(name)
        found, valid = _validate(cfg, sampler="DPM++ 2M", schedule="Karras", steps=3, width=64, height=64)
        assert found == [] and _below(valid) == 3
    ldm = preset("tiny")  # CompVis LDM's linear betas: sigma_max 197, but abar_T > 0, so not this warning's case
    ldm.schedule.beta_schedule, ldm.schedule.beta_start, ldm.schedule.beta_end = "linear", 0.0015, 0.0195
    found, valid = _validate(ldm, schedule="Karras", steps=4)
    assert found == [] and float(valid.sigmas[0]) > LOW_SIGMA and _below(valid) < MIN_LOW_STEPS


def test_img2img_tail_that_starts_below_sigma_15_does_not_warn():
    """A low denoising strength is short of steps by choice: only a run through the high sigmas is counted."""
    cfg, image = _ztsnr_tiny(), Image.new("RGB", (32, 32), "red")
    found, valid = _validate(cfg, task="img2img", init_image=image, strength=0.2, schedule="Uniform", steps=10)
    assert found == [] and float(valid.sigmas[0]) < LOW_SIGMA and valid.sampler_steps == 3
    found, valid = _validate(cfg, task="img2img", init_image=image, strength=1.0, schedule="Karras", steps=10)
    assert len(found) == 1 and float(valid.sigmas[0]) > LOW_SIGMA


def test_generate_prints_the_warning_as_one_line(tmp_path, capsys):
    from daguerre.checkpoints import save_model

    path = tmp_path / "ztsnr.safetensors"
    save_model(build_components(_ztsnr_tiny(), seed=0), path)
    argv = ["generate", "x", "--model", str(path), "--sampler", "Euler", "--schedule", "Karras", "--size", "16x16"]
    assert main([*argv, "--steps", "10", "-o", str(tmp_path / "a.png")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(lines) == 1 and lines[0].startswith("daguerre generate: warning: Euler on the Karras schedule at "
                                                   "10 steps takes 3 step(s) below sigma 15")
    enough = re.search(r"use (\d+) steps or more", lines[0]).group(1)
    assert main([*argv, "--steps", enough, "-o", str(tmp_path / "b.png")]) == 0
    assert WARNING not in capsys.readouterr().err


def _searched_steps(cfg: ModelConfig, sampler: str, schedule: str, steps: int,
                    strength: float | None) -> int | None:
    """The oracle: the step-by-step search the warning made before (the first step count above `steps`, up to
    num_train_timesteps - 1, whose run takes MIN_LOW_STEPS steps below LOW_SIGMA), on the run's own sigmas."""
    from daguerre.diffusion.sampler_names import resolve_sampler
    from daguerre.diffusion.schedules import img2img_sigmas, model_sigmas

    choice, discrete = resolve_sampler(sampler, schedule), model_sigmas(cfg.schedule)

    def below(n: int) -> int:
        sigmas = choice.sigmas(n, discrete)
        sigmas = sigmas if strength is None else img2img_sigmas(sigmas, strength)
        return sum(1 for s in sigmas[:-1].tolist() if s < LOW_SIGMA)

    last = cfg.schedule.num_train_timesteps - 1
    return next((n for n in range(steps + 1, last + 1) if below(n) >= MIN_LOW_STEPS), None)


def test_the_fewest_steps_named_are_those_a_step_by_step_search_finds(shapes_config):
    """The warning finds its step count by galloping and bisection; on every schedule (each way a sampler turns
    one into sigmas), for txt2img and img2img tails, on models of 1000 and of few timesteps, it names what the
    one-by-one search names, and says nothing of steps where that search finds none."""
    from daguerre.diffusion.sampler_names import AUTOMATIC, SAMPLER_NAMES, SCHEDULES, resolve_sampler

    few_timesteps = _ztsnr_tiny()
    few_timesteps.schedule.num_train_timesteps = 12  # Karras needs 14 steps: found by neither
    image = Image.new("RGB", (32, 32), "red")
    runs = [(_ztsnr_tiny(), None), (_ztsnr_tiny(), 0.6), (shapes_config, None), (few_timesteps, None)]
    kinds, named, none = set(), 0, 0
    for sampler in SAMPLER_NAMES:
        for schedule in (AUTOMATIC, *(s.label for s in SCHEDULES)):  # not None: the model's recommended one
            choice = resolve_sampler(sampler.label, schedule)
            kind = (choice.schedule, choice.spacing, choice.discard_penultimate)
            if kind in kinds:
                continue
            kinds.add(kind)
            for cfg, strength in runs:
                image_fields = {} if strength is None else {"task": "img2img", "init_image": image,
                                                            "strength": strength}
                for steps in (n for n in (1, 2, 3, 5, 8, 11, 13, 21, 34) if n < cfg.schedule.num_train_timesteps):
                    found, _ = _validate(cfg, sampler=sampler.label, schedule=schedule, steps=steps,
                                         **image_fields)
                    if not found:
                        continue
                    said = re.search(r"use (?:.* or )?(\d+) steps or more", found[0])
                    expected = _searched_steps(cfg, sampler.label, schedule, steps, strength)
                    assert (int(said.group(1)) if said else None) == expected, (kind, strength, steps, found[0])
                    named, none = named + (expected is not None), none + (expected is None)
    assert len(kinds) >= 10 and named >= 100 and none >= 10  # the comparison covered both answers
