"""`daguerre info`'s schedule line: whether the model has zero terminal SNR, and the sigmas it spans, on the
shipped zero-terminal-SNR shapes model and on SD v1- and v2-shaped random files (text and --json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import save_file

from daguerre.cli import main
from test_checkpoints import random_components, sd_state_dict, small_config

SD_SIGMA_MAX = 14.6146  # Stable Diffusion's largest sigma (scaled_linear betas 0.00085..0.012, 1000 steps)
ZERO_SNR_SIGMA_MAX = np.sqrt((1 - 2.0**-24) / 2.0**-24)  # abar_T = 0 taken as 2^-24 (diffusers, A1111, ComfyUI)


def _info(capsys, *argv: str) -> tuple[str, dict]:
    """(the schedule line of `daguerre info`, the "schedule" of its --json form)."""
    assert main(["info", *argv, "--no-hash"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("schedule:")]
    assert main(["info", *argv, "--no-hash", "--json"]) == 0
    return lines[0], json.loads(capsys.readouterr().out)["schedule"]


def _scaled_linear_sigmas() -> np.ndarray:
    """SD's discrete sigmas by definition: betas a linspace of sqrt(beta), squared; sigma^2 = (1 - abar) / abar."""
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    return np.sqrt((1 - abar) / abar)


def test_info_names_zero_terminal_snr_of_the_shapes_model(capsys):
    line, schedule = _info(capsys, "shapes")
    assert "zero terminal SNR" in line and "not zero" not in line
    assert "sigma 0.02917..4096;" in line and "Karras and Exponential need more steps" in line
    assert schedule["zero_terminal_snr"] is True
    assert schedule["sigma_max"] == pytest.approx(ZERO_SNR_SIGMA_MAX, rel=1e-6)
    assert schedule["sigma_min"] == pytest.approx(_scaled_linear_sigmas()[0], rel=1e-6)  # the rescale keeps abar_0


@pytest.mark.parametrize("openclip", [False, True], ids=["sd1", "sd2"])
def test_info_on_sd_shaped_file_has_no_zero_terminal_snr(tmp_path, capsys, openclip):
    path = tmp_path / "sd.safetensors"
    save_file(sd_state_dict(random_components(small_config(openclip))), str(path))  # no metadata: SD's schedule
    line, schedule = _info(capsys, str(path))
    assert line.endswith("terminal SNR not zero") and "zero terminal SNR" not in line
    assert "sigma 0.02917..14.61;" in line
    assert schedule["zero_terminal_snr"] is False
    assert schedule["sigma_max"] == pytest.approx(_scaled_linear_sigmas()[-1], rel=1e-9)
    assert schedule["sigma_max"] == pytest.approx(SD_SIGMA_MAX, abs=1e-4)
