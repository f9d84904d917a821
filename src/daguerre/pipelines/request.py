"""`GenerationRequest`: every field a user sets for one generation, checked once, at the edge.

The CLI and (later) the HTTP server build this one dataclass; pipelines trust it after `validate`.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig

MAX_SEED = 2**32 - 1


@dataclass
class GenerationRequest:
    """What to generate. `None` sizes mean the model's native size; `seed=None` draws a random seed."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"  # AUTOMATIC1111 or ComfyUI name (docs/samplers.md)
    schedule: str = "Automatic"  # A1111 "Schedule type": Automatic, Karras, Exponential, SGM Uniform, ...
    cfg_scale: float = 7.0  # classifier-free guidance scale; 1 = no guidance
    guidance_rescale: float = 0.0  # Lin et al. 2024 rescale, for zero-terminal-SNR / v models
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1  # number of images
    batch_size: int = 1  # images per network call
    clip_skip: int = 1  # A1111 "Clip skip": 1 = the model's own layer, 2 = one layer earlier, ...
    class_label: int | str | None = None  # class-conditional models
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for pipeline-specific settings

    def validate(self, config: ModelConfig) -> GenerationRequest:
        """Check every field against the model; return a copy with defaults (size, seed) filled in."""
        from ..diffusion.sampler_names import resolve_sampler

        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got n={self.n}, batch_size={self.batch_size}")
        if not (self.cfg_scale >= 0):
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        if not (0.0 <= self.guidance_rescale <= 1.0):
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1 (1 = the model's default layer), got {self.clip_skip}")
        resolve_sampler(self.sampler, self.schedule)  # raises with the list of valid names
        factor = config.vae.downsample_factor * config.unet.downsample_factor
        width = self.width or config.sample_size
        height = self.height or config.sample_size
        for name, value in (("width", width), ("height", height)):
            if value < factor or value % factor:
                raise ValueError(
                    f"{name} {value} is not a positive multiple of {factor}, which this model needs "
                    f"(VAE factor {config.vae.downsample_factor} x U-Net factor {config.unet.downsample_factor}); "
                    f"try {max(factor, round(value / factor) * factor)}"
                )
        seed = self.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED)
        if not (0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (or -1 for random), got {seed}")
        if config.conditioning == "class":
            _class_index(config, self.class_label)
        elif self.class_label is not None:
            raise ValueError(f"class label {self.class_label!r} given, but model {config.name!r} is not class-conditional")
        return dataclasses.replace(self, width=width, height=height, seed=seed)


def _class_index(config: ModelConfig, label: int | str | None) -> int:
    """The class index a label names (an index or a class name), with a clear error otherwise."""
    names = config.class_names or []
    count = config.unet.num_classes or len(names)
    if label is None:
        raise ValueError(f"model {config.name!r} is class-conditional: give a class label (0..{count - 1} or a name)")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        lowered = [n.lower() for n in names]
        if label.lower() not in lowered:
            raise ValueError(f"unknown class {label!r}; classes: {', '.join(names)}")
        return lowered.index(label.lower())
    index = int(label)
    if not (0 <= index < count):
        raise ValueError(f"class label {index} out of range 0..{count - 1}")
    return index

