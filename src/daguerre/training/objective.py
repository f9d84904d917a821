"""The stage-2 diffusion objective that every U-Net training stage shares (LDM eq. 2).

`DiffusionObjective.draw` turns a micro-batch of cached latents into the network's input and what it must
learn: per sample, from the sample's own generator (`dist.sample_generator`) and always in the same order, a
timestep t (uniform or biased, `losses.draw_timestep`), noise eps (plus offset noise), a posterior sample
z = mean + std eps' (or the mode), the caption-dropout draw and, with flips cached, the view. With
z0 = (z - shift) * scale and x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, the target is eps, v or x0 and the
weights are min-SNR-gamma's (`losses`); `loss` is their weighted MSE; `total` adds token grounding's terms when
`loss.grounding_weight` is on (`grounding`, TokenCompose). `ldm.LDMStage` (the whole U-Net) and
`lora.AdapterStage` (LoRAs and embeddings on a frozen one) differ only in the network call between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..diffusion.schedules import alphas_cumprod, betas_from_config, q_sample
from . import losses
from .config import LDMLossConfig
from .latents import LatentSet


@dataclass(frozen=True)
class NoisedBatch:
    """One micro-batch of the diffusion objective: x_t and t are the network's input, target and weights its loss."""

    rows: torch.Tensor  # (B,) int64 rows of the latent set
    t: torch.Tensor  # (B,) int64 training timesteps
    x_t: torch.Tensor  # (B, C, h, w) on the device
    target: torch.Tensor  # (B, C, h, w) on the device: eps, v or x0
    weights: torch.Tensor  # (B,) on the device: min-SNR-gamma
    drop: torch.Tensor  # (B,) U[0, 1) draws that decide caption / label dropout
    view: torch.Tensor  # (B,) int64 cached view (0, or 1 = flipped)


def draw_noise(gens: list[torch.Generator], n_steps: int, shape: tuple[int, ...], views: int, offset: float,
               sample_posterior: bool, t_cdf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample random draws, each sample from its own generator, always in the same order."""
    ts, noise, post, drop, view = [], [], [], [], []
    for g in gens:
        ts.append(losses.draw_timestep(g, n_steps, t_cdf))
        eps = torch.randn(shape, generator=g)
        if offset > 0:  # offset noise: a per-channel constant shift (Guttenberg 2023)
            eps = eps + offset * torch.randn((shape[0], 1, 1), generator=g)
        noise.append(eps)
        post.append(torch.randn(shape, generator=g) if sample_posterior else torch.zeros(shape))
        drop.append(torch.rand(1, generator=g))
        view.append(torch.randint(0, views, (1,), generator=g) if views > 1 else torch.zeros(1, dtype=torch.long))
    return {"t": torch.cat(ts), "noise": torch.stack(noise), "post": torch.stack(post), "drop": torch.cat(drop),
            "view": torch.cat(view)}


class DiffusionObjective:
    """E_t,eps w(t) ||target - net(x_t, t, c)||^2 on a model's schedule and latent scaling, under `[loss]`."""

    def __init__(self, model_cfg: ModelConfig, lc: LDMLossConfig) -> None:
        schedule = model_cfg.schedule
        self.prediction_type, self.n_steps = schedule.prediction_type, schedule.num_train_timesteps
        self.scale, self.shift = model_cfg.vae.scale_factor, model_cfg.vae.shift_factor
        self.lc = lc
        self.abar_all = alphas_cumprod(betas_from_config(schedule)).float()  # (T,)
        self.t_cdf = losses.timestep_cdf(lc.timestep_bias, self.n_steps, lc.timestep_bias_multiplier,
                                         lc.timestep_bias_portion, lc.timestep_bias_begin, lc.timestep_bias_end)

    def draw(self, gens: list[torch.Generator], lat: LatentSet, idx: np.ndarray,
             device: torch.device) -> NoisedBatch:
        """The noised latents of rows `idx`, one generator per sample (consumed in a fixed order)."""
        lc = self.lc
        r = draw_noise(gens, self.n_steps, tuple(lat.mean.shape[2:]), lat.mean.shape[1], lc.offset_noise,
                       lc.latents == "sample", self.t_cdf)
        rows = torch.from_numpy(idx)
        mean, std = lat.mean[rows, r["view"]], lat.std[rows, r["view"]]  # (B, C, h, w)
        z0 = ((mean + std * r["post"]) - self.shift) * self.scale
        abar = self.abar_all[r["t"]]  # (B,)
        x_t = q_sample(z0, abar, r["noise"]).to(device)  # sqrt(abar) z0 + sqrt(1 - abar) eps
        target = losses.diffusion_target(self.prediction_type, z0, r["noise"], abar).to(device)
        weights = losses.min_snr_weights(abar, lc.min_snr_gamma, self.prediction_type).to(device)
        return NoisedBatch(rows, r["t"], x_t, target, weights, r["drop"], r["view"])

    def loss(self, pred: torch.Tensor, batch: NoisedBatch, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The min-SNR-weighted MSE of the network's output, in float32; `pixel_weights` (B, 1, H, W) weigh its
        positions (a GLIGEN run's `loss.box_weight`), None: uniform."""
        return losses.weighted_mse(pred, batch.target, batch.weights, pixel_weights)

    def total(self, loss: torch.Tensor, token: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """The diffusion loss plus grounding_weight (L_token + grounding_pixel_weight L_pixel) (`grounding`)."""
        lc = self.lc
        return loss + lc.grounding_weight * (token + lc.grounding_pixel_weight * pixel)
