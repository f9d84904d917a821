"""Denoisers: a noise-, velocity- or sample-predicting network wrapped as `denoiser(x, sigma, cond) -> x0`.

This is the one interface every sampler sees. In sigma space (x = x0 + sigma eps, see schedules.py)
the wrapper is the preconditioning of EDM (Karras et al. 2022, Table 1 / eq. 7),
D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with c_in = 1/sqrt(sigma^2 + 1)
turning x back into the DDPM latent x_t the network was trained on, c_noise = the continuous
timestep t(sigma) (k-diffusion's `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`), and c_skip,
c_out set by what the network predicts:
  epsilon       x0 = x - sigma eps                           (c_skip = 1, c_out = -sigma)
  v_prediction  x0 = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v  (c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1);
                Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1-abar) x0)
  sample        x0 = F                                       (c_skip = 0, c_out = 1)
Any plain function with the same signature is a denoiser too (tests use analytic ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import ScheduleConfig
from .schedules import model_sigmas, sigma_to_t

Cond = dict[str, torch.Tensor | None]
DenoiserFn = Callable[..., torch.Tensor]  # (x, sigma, cond) -> x0
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PRECOND_DTYPE = torch.float32  # EDM: preconditioning in float32, only the network call in its own dtype


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """`sigma` (a float, a scalar or a (B,) tensor) as a (B,) float32 tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=PRECOND_DTYPE, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(PRECOND_DTYPE)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, to broadcast over an image batch."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """A network `net(x_in, t, context=None, y=None)` (the U-Net's forward) trained on the discrete
    schedule `schedule`, wrapped as `denoiser(x, sigma, cond) -> x0` (EDM preconditioning, see module
    docstring). `cond` holds "context" (B, T, D) cross-attention tokens, "y" (B,) class labels, "layout"
    (B, objects, tokens) layout tokens and "concat" (B, c, h, w) channels concatenated to the network input
    after the c_in scaling (inpainting, super-resolution and semantic-map models); missing or None values are
    not passed. `net_args` are
    passed to every network call (a U-Net's per-run `cache` of feature reuse: `with_net_args`)."""

    def __init__(self, net: nn.Module | Callable[..., torch.Tensor], schedule: ScheduleConfig,
                 net_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net_args = dict(net_args or {})
        if schedule.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {schedule.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.net = net
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        # float64 on the CPU, deliberately not buffers: they never follow the module to a device
        # without float64 (MPS), and t is computed on the CPU from them.
        self.sigmas = model_sigmas(schedule)  # (T,) ascending
        self.log_sigmas = self.sigmas.log()

    def with_net_args(self, **net_args: Any) -> Denoiser:
        """This denoiser (itself when `net_args` is empty), with `net_args` passed to every network call."""
        return Denoiser(self.net, self.schedule, {**self.net_args, **net_args}) if net_args else self

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's continuous timestep for `sigma` (log-sigma interpolation, float64)."""
        return sigma_to_t(sigma.detach().to("cpu", torch.float64), self.log_sigmas)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for a (B,) float32 sigma, each (B,)."""
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "v_prediction":
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in  # "sample"

    def _net_dtype(self, fallback: torch.dtype) -> torch.dtype:
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                return p.dtype
        return fallback

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        """x0 = c_skip x + c_out net(c_in x [++ concat], c_noise), float32, shaped like x."""
        cond = cond or {}
        x = x.to(PRECOND_DTYPE)
        sigma = batch_sigma(sigma, x)  # (B,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))  # (B, 1, 1, 1)
        c_noise = self.sigma_to_t(sigma).to(device=x.device, dtype=PRECOND_DTYPE)  # (B,)
        x_in = c_in * x
        if cond.get("concat") is not None:
            x_in = torch.cat([x_in, cond["concat"].to(x_in)], dim=1)  # (B, C + c, h, w)
        dtype = self._net_dtype(x.dtype)
        kwargs = dict(self.net_args)
        if cond.get("context") is not None:
            kwargs["context"] = cond["context"].to(dtype)
        if cond.get("y") is not None:
            kwargs["y"] = cond["y"]
        if cond.get("layout") is not None:  # a layout model's layout tokens (models/layout.py)
            kwargs["layout"] = cond["layout"]
        out = self.net(x_in.to(dtype), c_noise, **kwargs).to(PRECOND_DTYPE)
        return c_skip * x + c_out * out

    def predict_eps(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        """The noise estimate eps = (x - x0) / sigma implied by the denoiser (sigma > 0)."""
        x = x.to(PRECOND_DTYPE)
        s = append_dims(batch_sigma(sigma, x), x.ndim)
        return (x - self(x, sigma, cond)) / s
