"""The random-weight Stable Diffusion 1.5 U-Net the benchmarks time, built one way for all of them.

tests/test_unet.py's `random_unet` (the weight randomiser the tests use: uniform, std 1/sqrt(fan_in)) at the
`sd15` preset, drawn in float32 and then cast, so a bf16 copy holds the float32 copy's values rounded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daguerre.config import preset  # noqa: E402
from daguerre.models.unet import UNetModel  # noqa: E402
from test_unet import random_unet  # noqa: E402  (one weight randomiser for tests and benchmarks)


def random_sd15_unet(dtype: torch.dtype = torch.bfloat16, memory_format: torch.memory_format = torch.channels_last,
                     seed: int = 0) -> UNetModel:
    """The SD 1.5 U-Net with random weights (seeded by `seed`), in `dtype` and `memory_format`, in eval mode."""
    return random_unet(preset("sd15").unet, seed).to(dtype).to(memory_format=memory_format)
