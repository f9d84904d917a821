"""The Python API: `daguerre.load(model)` gives a `Pipeline`; calling it generates images.

    import daguerre
    pipe = daguerre.load("random:tiny")             # a file, a diffusers folder, a shipped name, random:PRESET
    results = pipe("a red circle", steps=20, seed=1)
    results[0].image.save("out.png")                 # PIL image; .seed and .parameters (A1111 text) too

The networks compute in the dtype `load(..., dtype=)` names, "auto" by default: bf16 on a CPU with bf16
units or a CUDA GPU (fp16 on GPUs without bf16), fp32 elsewhere and for the smallest models
(`daguerre.precision`; `pipe.dtype` says which).
A call takes the fields of `GenerationRequest` (the schema the CLI and the server share) as keyword
arguments, or a `GenerationRequest` itself. Every request is checked against the pipeline's `limits`
(`daguerre.limits.DEFAULT_LIMITS` unless `load(..., limits=)` says otherwise; `Limits.unlimited()`
turns them off). Nothing here imports torch until a model is loaded.

How the model works, in pictures (docs/explain.md): the functions of `daguerre.explain` take `pipe.components`,
e.g. `daguerre.explain.trajectory.sample_trajectory(pipe.components, pipe.request("a red circle", steps=10))`
(the clean-image estimate at every step), `noising.noise_image`, `autoencoder.reconstruct`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .limits import DEFAULT_LIMITS, Limits
from .pipelines.request import GenerationRequest, ValidRequest
from .precision import AUTO

if TYPE_CHECKING:
    import torch

    from .components import Components
    from .config import ModelConfig
    from .pipelines.txt2img import GeneratedImage

# the settings a call takes; a request's `limits` are the pipeline's (`Pipeline.limits`), not a call's
REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name != "limits")

Callback = Callable[[dict[str, Any]], None]


def set_compute_dtype(components: Components, dtype: torch.dtype | str | None = AUTO) -> torch.dtype:
    """Cast the U-Net, text encoder and VAE to the compute dtype (`daguerre.precision.resolve_dtype`: "auto",
    "fp32", "bf16", "fp16" or a torch dtype; "auto" decided for the networks' device and U-Net size), with
    the convolutions in its memory format; returns the dtype. A no-op for networks already there. Casting
    a model loaded in bf16/fp16 to fp32 does not restore the file's values: open it in the dtype instead."""
    from .precision import is_auto, resolve_dtype
    from .quantize import weight_count
    from .registry import set_memory_format

    if components.adapters is not None:  # merged LoRAs out first: the next run merges them again in the new dtype
        components.adapters.clear(components)
    device = components.device
    size = weight_count(components.unet) if is_auto(dtype) else None
    dtype = resolve_dtype(dtype, device, size)
    for module in (components.unet, components.text_encoder, components.vae):
        if module is not None:
            module.to(dtype)
    set_memory_format(components, dtype, device)
    if components.source is not None:  # released parts are read again in the new dtype
        components.source = dataclasses.replace(components.source, dtype=dtype)
    return dtype


def load(path_or_name: str | None = None, *, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = AUTO, limits: Limits = DEFAULT_LIMITS, quantize: str | None = None,
         compile: bool = False, release_after_use: bool = False, lora_dir: str | None = None,
         embeddings_dir: str | None = None, original_config: str | None = None, base: str | None = None) -> Pipeline:
    """Open a model (`--model` syntax: path, diffusers folder, shipped name, `random:PRESET`; None = default).

    `dtype` is the compute dtype of every network (U-Net, text encoder, VAE): "auto" (the default:
    bfloat16 on a CPU with bf16 units or a GPU, float32 elsewhere and for the small shipped models;
    `daguerre.precision`), "fp32", "bf16", "fp16" or a torch dtype. Weights are converted while they are
    read. A VAE decode that overflows in bf16/fp16 is done again in float32. `limits` bound every request
    (`Pipeline.limits`). `quantize="int8"` keeps the U-Net's and text encoder's layer weights in int8 (half
    the memory; slightly different images, recorded in the PNG as `Weights: int8`); `compile=True` compiles
    the U-Net with torch inductor (`daguerre.compile`: minutes at the first call of each size, more memory).

    `release_after_use=True` holds each network only while a call needs it (what `daguerre generate` does):
    nothing is read at load; each call reads the text encoder, encodes the prompts and frees it, reads the
    U-Net, samples every image and frees it, then reads the VAE decoder and decodes (the VAE encoder only for
    img2img and inpainting). The images are the same; the peak memory is about the U-Net's alone, and every
    call reads the weights from the file again (SD 1.5: seconds per call). Not with `compile`. Any pipeline can
    also free parts itself (`pipe.components.release("unet")`): the next call reads them again.

    LoRAs (docs/lora.md): a call's `loras=["file.safetensors:0.8", ...]` (or (file, weight) pairs) and its
    prompt's `<lora:NAME:WEIGHT>` tags, NAME found in `lora_dir`, are merged into the weights for that call (the
    next call's set replaces them). The textual-inversion embeddings of `embeddings_dir` are used by name in
    prompts and negative prompts.

    `original_config` is a checkpoint file's CompVis inference YAML (what `--config FILE` gives; docs/lora.md,
    "Original configs"), for this model only, as if it were beside the file. `base` is an adapter file's base
    model (a file or a shipped name; default: the shipped model the adapter names; docs/layout.md).
    """
    from .registry import open_model

    components, model_hash = open_model(path_or_name, device=device, dtype=dtype, quantize=quantize,
                                        compile=compile, release_after_use=release_after_use,
                                        original_config=original_config, base=base)
    if lora_dir is not None or embeddings_dir is not None:
        from .lora.apply import attach

        attach(components, lora_dir, embeddings_dir)
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
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the networks (`load(..., dtype=)`)."""
        return next(self.components.unet.parameters()).dtype

    def request(self, prompt: str | GenerationRequest = "", **fields: Any) -> ValidRequest:
        """The `ValidRequest` for a prompt (or a request) and keyword fields, validated against this model
        and `limits`; a `ValidRequest` that already is, given without fields, is returned as it is.

        Keyword fields override those of a given request; `tile=True/False` selects tiled VAE decoding
        (default: automatic for large images, see `daguerre.pipelines.tiling`).
        """
        if "limits" in fields:
            raise ValueError("limits are the pipeline's: daguerre.load(..., limits=...) or set pipe.limits")
        unknown = sorted(set(fields) - set(REQUEST_FIELDS))
        if unknown:
            valid = ", ".join(REQUEST_FIELDS)
            raise ValueError(f"unknown generation setting(s) {', '.join(unknown)}; valid settings: {valid}")
        if isinstance(prompt, ValidRequest) and not fields and prompt.limits == self.limits \
                and prompt.config == self.config:
            return prompt
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
        return self._run(request.task, request, callback)

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

    def _run(self, task: str, request: ValidRequest, callback: Callback | None) -> list[GeneratedImage]:
        """`daguerre.pipelines.<task>.<task>(components, request, callback=, model_hash=)`."""
        try:
            module = importlib.import_module(f"daguerre.pipelines.{task}")
        except ModuleNotFoundError as e:
            if e.name != f"daguerre.pipelines.{task}":
                raise
            raise NotImplementedError(f"{task} is not available in this version of daguerre") from None
        return getattr(module, task)(self.components, request, callback=callback, model_hash=self.model_hash)

    def __repr__(self) -> str:
        return (f"Pipeline(model={self.config.name!r}, device={self.device}, dtype={self.dtype}, "
                f"hash={self.model_hash})")
