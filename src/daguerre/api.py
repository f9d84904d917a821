"""The Python API: `daguerre.load(model)` gives a `Pipeline`; calling it generates images.

    import daguerre
    pipe = daguerre.load("random:tiny")             # a file, a diffusers folder, a shipped name, random:PRESET
    results = pipe("a red circle", steps=20, seed=1)
    results[0].image.save("out.png")                 # PIL image; .seed and .parameters (A1111 text) too

A call takes the fields of `GenerationRequest` (the schema the CLI and the server share) as keyword
arguments, or a `GenerationRequest` itself. Every request is checked against the pipeline's `limits`
(`daguerre.limits.DEFAULT_LIMITS` unless `load(..., limits=)` says otherwise; `Limits.unlimited()`
turns them off). Nothing here imports torch until a model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .limits import DEFAULT_LIMITS, Limits
from .pipelines.request import GenerationRequest

if TYPE_CHECKING:
    import torch

    from .components import Components
    from .config import ModelConfig
    from .pipelines.txt2img import GeneratedImage

# dtype names users type -> torch dtype attribute names
DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
# the settings a call takes; a request's `limits` are the pipeline's (`Pipeline.limits`), not a call's
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name != "limits")

Callback = Callable[[dict[str, Any]], None]


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name ("fp32", "bf16", "fp16", "float16", ...); None stays None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def set_compute_dtype(components: Components, dtype: torch.dtype | str | None) -> None:
    """Cast the U-Net and text encoder to the compute dtype; the VAE stays as loaded (float32: it decodes)."""
    dtype = resolve_dtype(dtype)
    if dtype is None:
        return
    for module in (components.unet, components.text_encoder):
        if module is not None:
            module.to(dtype)


def load(path_or_name: str | None = None, *, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, limits: Limits = DEFAULT_LIMITS) -> Pipeline:
    """Open a model (`--model` syntax: path, diffusers folder, shipped name, `random:PRESET`; None = default).

    `dtype` is the compute dtype of the U-Net and text encoder (None: as stored, float32 for random
    models); the VAE decodes in float32. `limits` bound every request (`Pipeline.limits`).
    """
    from .registry import open_model

    components, model_hash = open_model(path_or_name, device=device)
    set_compute_dtype(components, dtype)
    return Pipeline(components, model_hash, limits=limits)


class Pipeline:
    """A loaded model ready to generate: `pipe(prompt, **fields) -> list[GeneratedImage]`.

    `components` holds the networks, `config` the model's `ModelConfig`, `model_hash` the A1111 short
    hash written to the PNG parameters (None for random models and folders), `limits` the bounds every
    request is checked against before any work (a `LimitError` names the value and the limit).
    """

    def __init__(self, components: Components, model_hash: str | None = None, *, limits: Limits = DEFAULT_LIMITS):
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a daguerre.limits.Limits, got {type(limits).__name__}")
        self.components = components
        self.model_hash = model_hash
        self.limits = limits

    @property
    def config(self) -> ModelConfig:
        return self.components.config

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    def request(self, prompt: str | GenerationRequest = "", **fields: Any) -> GenerationRequest:
        """The validated `GenerationRequest` for a prompt (or a request) and keyword fields.

        Keyword fields override those of a given request; `tile=True/False` selects tiled VAE decoding
        (default: automatic for large images, see `daguerre.pipelines.tiling`).
        """
        if "limits" in fields:
            raise ValueError("limits are the pipeline's: daguerre.load(..., limits=...) or set pipe.limits")
        unknown = sorted(set(fields) - set(REQUEST_FIELDS))
        if unknown:
            valid = ", ".join(REQUEST_FIELDS)
            raise ValueError(f"unknown generation setting(s) {', '.join(unknown)}; valid settings: {valid}")
        if isinstance(prompt, GenerationRequest):
            request = dataclasses.replace(prompt, **fields)
        elif isinstance(prompt, str):
            request = GenerationRequest(prompt=prompt, **fields)
        else:
            raise ValueError(f"prompt must be a string or a GenerationRequest, got {type(prompt).__name__}")
        return request.validate(self.config, self.limits)

    def __call__(
        self, prompt: str | GenerationRequest = "", *, callback: Callback | None = None, **fields: Any
    ) -> list[GeneratedImage]:
        """Generate `n` images; image i is made from seed `seed + i` (the same seed gives the same image).

        Fields: negative_prompt, steps, sampler, schedule, cfg_scale, guidance_rescale, seed, width,
        height, n, batch_size, clip_skip, class_label, ... (`GenerationRequest`), and tile. A request
        whose `task` is img2img, inpaint or upscale runs that pipeline. `callback(info)` is called after
        every sampler step with {x, i, sigma, sigma_next, denoised, batch_start}.
        """
        request = self.request(prompt, **fields)
        return self._run(getattr(request, "task", "txt2img"), request, callback)

    def img2img(self, image: Any, prompt: str | GenerationRequest = "", *, callback: Callback | None = None,
                **fields: Any) -> list[GeneratedImage]:
        """Image-to-image (SDEdit, Meng et al. 2022) from a path or PIL image; `strength` in [0, 1]."""
        return self._run("img2img", self.request(prompt, task="img2img", init_image=image, **fields), callback)

    def inpaint(self, image: Any, mask: Any, prompt: str | GenerationRequest = "", *,
                callback: Callback | None = None, **fields: Any) -> list[GeneratedImage]:
        """Inpainting: redraw the white pixels of `mask` (path or PIL image) in `image`."""
        request = self.request(prompt, task="inpaint", init_image=image, mask=mask, **fields)
        return self._run("inpaint", request, callback)

    def upscale(self, image: Any, prompt: str | GenerationRequest = "", *, callback: Callback | None = None,
                **fields: Any) -> list[GeneratedImage]:
        """Upscaling by `upscale_factor` (an SR model, or resize + img2img with a regular model)."""
        return self._run("upscale", self.request(prompt, task="upscale", init_image=image, **fields), callback)

    def _run(self, task: str, request: GenerationRequest, callback: Callback | None) -> list[GeneratedImage]:
        """`daguerre.pipelines.<task>.<task>(components, request, callback=, model_hash=)`."""
        try:
            module = importlib.import_module(f"daguerre.pipelines.{task}")
        except ModuleNotFoundError as e:
            if e.name != f"daguerre.pipelines.{task}":
                raise
            raise NotImplementedError(f"{task} is not available in this version of daguerre") from None
        return getattr(module, task)(self.components, request, callback=callback, model_hash=self.model_hash)

    def __repr__(self) -> str:
        return f"Pipeline(model={self.config.name!r}, device={self.device}, hash={self.model_hash})"


# --- A1111 PNG parameters -> request fields ----------------------------------------------------------

# A1111 `parameters` key -> (GenerationRequest field, converter)
PNG_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Guidance rescale": ("guidance_rescale", float),
    "Eta": ("eta", float),  # A1111 writes one of these two for a sampler that takes eta (sampler_names.Eta)
    "Eta DDIM": ("eta", float),
}
SIZE_KEY = "Size"
MODEL_KEY = "Model"
# keys that describe the image but change nothing when generating it again
INFORMATIONAL_KEYS = frozenset({"Model hash", "Model", "Version", "Size"})


@dataclasses.dataclass
class PngSettings:
    """What a PNG's `parameters` text says about how to make the image again."""

    fields: dict[str, Any]  # GenerationRequest fields
    model: str | None  # the `Model` value, unless it is one a file may not select (`settings_from_parameters`)
    model_hash: str | None  # the `Model hash` value, if any
    ignored: list[str]  # keys daguerre does not apply (hires fix, LoRA, ...), and why a `Model` is not used


def settings_from_parameters(text: str, source: str = "parameters") -> PngSettings:
    """Read the A1111 `parameters` text (`pngmeta.parse_parameters`) into GenerationRequest fields.

    Prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, size, clip skip, guidance
    rescale and eta are read; a value that does not parse is a ValueError naming `source` and the key.
    The `Model` is a name (A1111 writes the checkpoint's name): a file never builds a `random:` model
    (random:sd15 allocates 860M untrained parameters) nor names a path to open, so such a `Model` is
    listed in `ignored` with the reason and `model` is None: the caller's own choice of model stands.
    """
    from .pngmeta import parse_parameters

    prompt, negative, params = parse_parameters(text)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for key, (name, convert) in PNG_KEYS.items():
        if key in params:
            try:
                fields[name] = convert(params[key])
            except ValueError:
                kind = "whole number" if convert is int else "number"
                raise ValueError(f"{source}: {key} {params[key]!r} is not a {kind}") from None
    if SIZE_KEY in params:
        width, sep, height = params[SIZE_KEY].lower().partition("x")
        width, height = width.strip(), height.strip()
        if not (sep and _ascii_digits(width) and _ascii_digits(height)):  # int() reads "²" and "٣" too
            raise ValueError(f"{source}: Size {params[SIZE_KEY]!r} is not WIDTHxHEIGHT")
        fields["width"], fields["height"] = int(width), int(height)
    ignored = [k for k in params if k not in PNG_KEYS and k not in INFORMATIONAL_KEYS]
    model = params.get(MODEL_KEY)
    why = _unusable_model(model) if model is not None else None
    if why:
        ignored.append(f"Model {model!r} ({why}; choose a model with --model)")
        model = None
    return PngSettings(fields, model, params.get("Model hash"), ignored)


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 10  # 10 digits: far over any limit already


def _unusable_model(name: str) -> str | None:
    """Why settings read from a file may not select the model `name`, or None when they may."""
    from .registry import RANDOM_PREFIX

    if name.startswith(RANDOM_PREFIX):
        return "a file never selects a random: model: untrained, and up to 860M parameters to build"
    if any(c in name for c in "/\\") or name.startswith(("~", ".")):
        return "a file never selects a path"
    return None
