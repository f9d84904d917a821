"""Exponential moving average of the weights, with the warm-up of CompVis `LitEma`.

theta_ema <- d theta_ema + (1 - d) theta after every optimizer step, with d = min(decay, (1 + k) / (10 + k))
at the k-th update (k = 1, 2, ...) when warm-up is on, so the average forgets the random initialisation
quickly (Polyak & Juditsky 1992; the schedule is that of the LDM code base; EDM and DiT keep such an EMA too). The
shadow weights are float32 copies on the parameters' device; samples and the final model use them.
"""

from __future__ import annotations

import torch
from torch import nn

WARMUP_OFFSET = 10.0  # d_k = (1 + k) / (10 + k)


class EMA:
    """Shadow copies of `model`'s parameters (by name), updated with `update(model)`."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def current_decay(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        k = self.num_updates + 1
        return min(self.decay, (1.0 + k) / (WARMUP_OFFSET + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [params[n].detach().float() for n in names]
        torch._foreach_lerp_(shadow, current, 1.0 - d)  # shadow += (1 - d) (param - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the shadow weights into `model` (cast to its parameters' dtype)."""
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + n: t for n, t in self.shadow.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, num_updates: int) -> None:
        missing = [n for n in self.shadow if prefix + n not in tensors]
        if missing:
            raise ValueError(f"the checkpoint lacks EMA weights {prefix}{missing[0]} (and {len(missing) - 1} more)")
        for n, t in self.shadow.items():
            t.copy_(tensors[prefix + n])
        self.num_updates = num_updates
