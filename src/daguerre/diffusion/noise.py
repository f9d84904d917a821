"""Reproducible noise: one CPU `torch.Generator` per image, so a seed gives the same image on any
device and in any batch (diffusers' convention; shared/DESIGN.md "Randomness")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def generators_for(seed: int, n: int) -> list[torch.Generator]:
    """CPU generators for `n` images, image i seeded with `seed + i`."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the CPU and moved to `device`.

    With a list of generators, row i of the batch comes from generator i alone, so the noise of an
    image does not depend on the batch it is generated in. With one generator (or None: the global
    RNG) the whole tensor is drawn from it.
    """
    shape = tuple(shape)
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per image")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator]
        out = torch.stack(rows)
    else:
        out = torch.randn(shape, generator=generator, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """`randn` with the shape, device and dtype of `x`."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)
