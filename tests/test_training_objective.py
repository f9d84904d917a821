"""The stage-2 objective that `train ldm`, `train lora` and `train embedding` share (training/objective.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from daguerre.config import ModelConfig
from daguerre.training.config import LDMLossConfig
from daguerre.training.latents import LatentSet
from daguerre.training.objective import DiffusionObjective


def latent_set(n: int = 3) -> LatentSet:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 2, 4, 4, 4, generator=g)  # two views (flip cached)
    return LatentSet(mean, torch.rand(n, 2, 4, 4, 4, generator=g) * 0.1, ["a"] * n, None, Path("."))


def test_a_samples_draw_depends_on_its_own_generator_alone_and_eps_is_the_target():
    cfg = ModelConfig()
    lat = latent_set()
    objective = DiffusionObjective(cfg, LDMLossConfig(offset_noise=0.1))
    batch = objective.draw([torch.Generator().manual_seed(s) for s in (1, 2, 3)], lat, np.array([0, 1, 2]),
                           torch.device("cpu"))
    alone = objective.draw([torch.Generator().manual_seed(2)], lat, np.array([1]), torch.device("cpu"))
    assert torch.equal(batch.x_t[1:2], alone.x_t) and torch.equal(batch.t[1:2], alone.t)
    abar = objective.abar_all[batch.t].reshape(-1, 1, 1, 1)
    eps = batch.target  # epsilon prediction: the target is the noise
    z0 = (batch.x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    mean = lat.mean[batch.rows, batch.view]
    scale, shift = cfg.vae.scale_factor, cfg.vae.shift_factor
    assert ((z0 / scale + shift) - mean).abs().max() < 0.6  # a posterior sample near its mean (std <= 0.1)
    assert objective.loss(batch.target, batch).item() == 0.0
    assert objective.loss(batch.target + 1, batch).item() > 0.0
