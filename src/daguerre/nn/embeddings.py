"""Sinusoidal embeddings of the diffusion time (or noise level) fed to the denoising networks."""

from __future__ import annotations

import math

import torch

DEFAULT_MAX_PERIOD = 10000  # longest wavelength of the sinusoids (Vaswani et al. 2017, section 3.5)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = DEFAULT_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_k), sin(t w_k)] with w_k = max_period^(-k / (dim/2)) (DDPM, Ho et al. 2020).

    The positional encoding of Vaswani et al. (2017, section 3.5) applied to the timestep, cosines first
    as in CompVis LDM `timestep_embedding` (diffusers `flip_sin_to_cos=True, freq_shift=0`). t: (B,)
    integer or fractional timesteps (or a scalar) -> (B, dim) float32 on t's device; an odd `dim` gets
    a zero last column.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))  # (B, dim)
    return emb
