"""The A1111 / ComfyUI name table: every name resolves, to the sampler and schedule A1111 / ComfyUI mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daguerre.config import ScheduleConfig
from daguerre.diffusion import samplers, samplers_sde
from daguerre.diffusion.sampler_names import SAMPLERS, list_samplers, list_schedules, resolve_sampler
from daguerre.diffusion.schedules import get_sigmas, model_sigmas

SD_SIGMAS = model_sigmas(ScheduleConfig())  # (1000,) Stable Diffusion's discrete sigmas, ascending

# A1111 name -> (daguerre sampler, get_sigmas kind of "Automatic"); written from A1111's
# sd_samplers_kdiffusion.samplers_k_diffusion (option 'scheduler') and sd_samplers_timesteps.
A1111 = {
    "Euler a": ("euler_ancestral", "normal"),
    "Euler": ("euler", "normal"),
    "LMS": ("lms", "normal"),
    "Heun": ("heun", "normal"),
    "DPM2": ("dpm2", "karras"),
    "DPM2 a": ("dpm2_ancestral", "karras"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "karras"),
    "DPM++ 2M": ("dpmpp_2m", "karras"),
    "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
    "DDIM": ("ddim", "default"),
    "PLMS": ("plms", "default"),
    "UniPC": ("unipc", "normal"),
    "LCM": ("lcm", "normal"),
    "DDPM": ("ddpm", "default"),
}
COMFYUI = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM", "ddpm": "DDPM", "plms": "PLMS",
}
SCHEDULES = {  # A1111 label -> get_sigmas kind
    "Uniform": "normal", "Karras": "karras", "Exponential": "exponential", "SGM Uniform": "sgm_uniform",
    "Simple": "simple", "Normal": "normal", "DDIM": "default",
}
COMFYUI_SCHEDULES = {"normal": "normal", "karras": "karras", "exponential": "exponential",
                     "sgm_uniform": "sgm_uniform", "simple": "simple", "ddim_uniform": "default"}


@pytest.mark.parametrize("name", list(A1111))
def test_a1111_names_and_automatic_schedule(name):
    choice = resolve_sampler(name)
    assert (choice.sampler, choice.schedule) == A1111[name]
    assert choice.sampler in SAMPLERS
    assert choice.a1111_name == name
    assert resolve_sampler(name, "Automatic") == choice == resolve_sampler(name, "")


def test_list_samplers_is_the_a1111_table():
    assert list_samplers() == list(A1111)
    assert set(list_schedules()) == {"Automatic", *SCHEDULES}
    assert {resolve_sampler(n).sampler for n in list_samplers()} == set(SAMPLERS)  # every sampler has a name


def test_the_one_registry_holds_every_sampler_function():
    """Issue 14: `diffusion.samplers.SAMPLERS` once silently lacked the 7 stochastic samplers."""
    written = {f for module in (samplers, samplers_sde) for name, f in vars(module).items()
               if name.startswith("sample_") and callable(f)}
    assert len(SAMPLERS) == len(written) == 15
    assert set(SAMPLERS.values()) == written
    assert not hasattr(samplers, "SAMPLERS") and not hasattr(samplers_sde, "SAMPLERS")  # no second table


@pytest.mark.parametrize("name", list(COMFYUI))
def test_comfyui_sampler_names(name):
    choice = resolve_sampler(name)
    assert choice.sampler == A1111[COMFYUI[name]][0]
    assert choice.a1111_name == COMFYUI[name]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "DPM++ 2M SDE"])
@pytest.mark.parametrize("schedule", list(SCHEDULES) + list(COMFYUI_SCHEDULES))
def test_schedule_names_separate_and_combined(sampler, schedule):
    kind = SCHEDULES.get(schedule) or COMFYUI_SCHEDULES[schedule]
    separate = resolve_sampler(sampler, schedule)
    assert (separate.sampler, separate.schedule) == (A1111[sampler][0], kind)
    combined = resolve_sampler(f"{sampler} {schedule}")  # A1111 before 1.9: "DPM++ 2M Karras"
    assert combined == separate
    assert resolve_sampler(f"{sampler} {schedule}", "Automatic") == separate


@pytest.mark.parametrize(
    "name, sampler, kind",
    [
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("Euler a Karras", "euler_ancestral", "karras"),
        ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
        ("LMS Karras", "lms", "karras"),
        ("DPM2 a Karras", "dpm2_ancestral", "karras"),
        ("dpm++ 2m karras", "dpmpp_2m", "karras"),
        ("DPMPP_2M_KARRAS", "dpmpp_2m", "karras"),
        ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde", "exponential"),
        ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
        ("k_euler_a", "euler_ancestral", "normal"),
        ("EULER A", "euler_ancestral", "normal"),
        ("euler-ancestral", "euler_ancestral", "normal"),
        ("  DPM++2M  ", "dpmpp_2m", "karras"),
        ("Euler a SGM Uniform", "euler_ancestral", "sgm_uniform"),
        ("ddim ddim_uniform", "ddim", "default"),
    ],
)
def test_combined_and_loose_spellings(name, sampler, kind):
    choice = resolve_sampler(name)
    assert (choice.sampler, choice.schedule) == (sampler, kind)


@pytest.mark.parametrize("name", list(A1111))
@pytest.mark.parametrize("schedule", [None, "Karras", "SGM Uniform"])
def test_png_parameters_round_trip(name, schedule):
    """What is written to the PNG ("Sampler", "Schedule type") resolves back to the same choice."""
    choice = resolve_sampler(name, schedule)
    assert resolve_sampler(choice.a1111_name, choice.a1111_schedule) == choice


def test_automatic_is_written_as_the_schedule_used():
    assert resolve_sampler("DPM++ 2M").a1111_schedule == "Karras"
    assert resolve_sampler("Euler a").a1111_schedule == "Uniform"
    assert resolve_sampler("DDIM").a1111_schedule == "Automatic"  # A1111 ignores the schedule type for DDIM


@pytest.mark.parametrize(
    "name, schedule, fragment",
    [
        ("DPM++ 2N", None, "Did you mean 'DPM++ 2M'"),
        ("eulr a", None, "Did you mean 'Euler a'"),
        ("Heunn", None, "Did you mean 'Heun'"),
        ("Euler", "Karas", "Did you mean 'Karras'"),
        ("not a sampler at all", None, "Valid samplers: Euler a, Euler"),
        ("Euler", "Polyexponential", "Valid schedule types: Automatic"),
        ("DPM++ 2M Karras", "Exponential", "already names the schedule 'Karras'"),
        ("", None, "no sampler named"),
    ],
)
def test_unknown_names_raise_with_suggestions(name, schedule, fragment):
    with pytest.raises(ValueError) as err:
        resolve_sampler(name, schedule)
    assert fragment in str(err.value)


def test_uniform_is_kdiffusion_get_sigmas():
    """A1111 "Uniform" = k-diffusion DiscreteSchedule.get_sigmas: t = linspace(T-1, 0, n), log-sigma interpolation."""
    n = 7
    t = np.linspace(len(SD_SIGMAS) - 1, 0, n)
    expected = np.append(np.exp(np.interp(t, np.arange(len(SD_SIGMAS)), SD_SIGMAS.log().numpy())), 0.0)
    sigmas = resolve_sampler("Euler").sigmas(n, SD_SIGMAS)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-12)


def test_ddim_schedule_is_a1111_timesteps():
    """A1111's DDIM/PLMS timesteps: range(0, T, T // n) + 1 (SD's steps_offset 1), sigma at those t, then 0."""
    n = 20
    t = torch.arange(0, 1000, 1000 // n) + 1
    expected = torch.cat([SD_SIGMAS[t].flip(0), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(resolve_sampler("DDIM").sigmas(n, SD_SIGMAS), expected, rtol=1e-12, atol=0)


def test_dpm2_discards_the_penultimate_sigma():
    """A1111 gives DPM2 / DPM2 a one more step and drops the next-to-last sigma: n steps, no tiny last step."""
    sigmas = resolve_sampler("DPM2").sigmas(10, SD_SIGMAS)
    full = get_sigmas("karras", 11, SD_SIGMAS)
    assert len(sigmas) == 11
    torch.testing.assert_close(sigmas, torch.cat([full[:-2], full[-1:]]))
    assert len(resolve_sampler("DPM2", "Exponential").sigmas(10, SD_SIGMAS)) == 11
    assert len(resolve_sampler("Euler").sigmas(10, SD_SIGMAS)) == 11


@pytest.mark.parametrize(
    "name, split",
    [("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("dpmpp_2m_sde_gpu", ("DPM++ 2M SDE", None)),
     ("k_lms_ka", ("LMS", "Karras")), ("Euler a SGM Uniform", ("Euler a", "SGM Uniform")), ("euler", ("Euler", None)),
     ("DPM++ 9M", None), ("", None), (7, None)],
)
def test_split_sampler_name(name, split):
    from daguerre.diffusion.sampler_names import split_sampler_name

    assert split_sampler_name(name) == split


# --- a model's recommended settings and the user's names (GenerationRequest.settings) ---------------------

@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, ("DPM++ 2M", "Uniform")),  # the model's pair
        ({"sampler": "DPM++ 2M Karras"}, ("DPM++ 2M Karras", "Karras")),  # the name's schedule, not the model's
        ({"sampler": "Euler a SGM Uniform"}, ("Euler a SGM Uniform", "SGM Uniform")),
        ({"sampler": "Euler"}, ("Euler", "Uniform")),  # no schedule in the name: the model's
        ({"schedule": "Exponential"}, ("DPM++ 2M", "Exponential")),
        ({"sampler": "DPM++ 2M Karras", "schedule": "Karras"}, ("DPM++ 2M Karras", "Karras")),
        ({"sampler": "DPM++ 2M Karras", "schedule": "Automatic"}, ("DPM++ 2M Karras", "Automatic")),
    ],
)
def test_a_schedule_in_the_sampler_name_wins_over_the_models_default(given, expected):
    from daguerre.config import preset
    from daguerre.pipelines.request import GenerationRequest

    config = preset("tiny")
    config.defaults = {"steps": 3, "sampler": "DPM++ 2M", "schedule": "Uniform", "cfg_scale": 4.0}
    settings = GenerationRequest(**given).settings(config)
    assert (settings["sampler"], settings["schedule"]) == expected
    resolve_sampler(settings["sampler"], settings["schedule"])  # no conflict
    if "sampler" in given:
        assert resolve_sampler(settings["sampler"], settings["schedule"]) == resolve_sampler(given["sampler"])


def test_a_user_schedule_wins_over_one_inside_the_models_sampler_name():
    from daguerre.config import preset
    from daguerre.pipelines.request import GenerationRequest

    config = preset("tiny")
    config.defaults = {"sampler": "DPM++ 2M Karras"}
    settings = GenerationRequest(schedule="Exponential").settings(config)
    assert (settings["sampler"], settings["schedule"]) == ("DPM++ 2M", "Exponential")
    assert GenerationRequest().settings(config)["schedule"] == "Karras"
    with pytest.raises(ValueError, match="already names the schedule 'Karras'"):  # both the user's: a conflict
        GenerationRequest(sampler="DPM++ 2M Karras", schedule="Exponential").validate(config)


def test_combined_sampler_name_runs_on_the_shipped_shapes_model():
    """The shipped `shapes` model recommends a schedule ("Uniform"); a sampler name with its own schedule is
    what the user asked for, over the Python API as on the command line."""
    import daguerre

    pipe = daguerre.load("shapes")
    assert pipe.config.defaults.get("schedule") not in (None, "Karras")  # else this test proves nothing
    request = pipe.request("a red circle", sampler="DPM++ 2M Karras", steps=2, seed=1)
    assert (request.sampler, request.schedule) == ("DPM++ 2M Karras", "Karras")
    image = pipe("a red circle", sampler="DPM++ 2M Karras", steps=2, seed=1)[0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in image.parameters
    same = pipe("a red circle", sampler="DPM++ 2M", schedule="Karras", steps=2, seed=1)[0]
    assert np.array_equal(np.asarray(image.image), np.asarray(same.image))
