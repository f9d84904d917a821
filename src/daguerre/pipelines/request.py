"""`GenerationRequest`: every field a user sets for one generation, checked once, at the edge.

The CLI and the HTTP server build this one dataclass; pipelines trust it after `validate`.
`task` names the pipeline (txt2img, img2img, inpaint, upscale); the image fields only matter for
the tasks that take images, and `validate` loads those images (a path becomes a PIL image in the
returned copy), so a missing or unreadable file fails before any model work.

`validate` refuses, with a ValueError naming the field and value: a value of the wrong type, a NaN
or infinite number (they make an all-black image), a size of 0 or less, and anything over the
request's `Limits` (daguerre.limits: pixels, images, steps, estimated work, input image pixels,
prompt length; prompt brackets nested too deep, pipelines.prompts). `check_finite` is the matching
check after sampling: NaN or infinite latents or pixels are a `NonFiniteError`, never an image.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..limits import DEFAULT_LIMITS, Limits, request_work

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..components import Components

MAX_SEED = 2**32 - 1
TASKS = ("txt2img", "img2img", "inpaint", "upscale")
IMAGE_TASKS = ("img2img", "inpaint", "upscale")
# Denoising strength when none is given: A1111's img2img default 0.75; for upscaling a regular model
# (resize + img2img, A1111 "hires fix") a moderate 0.4 that keeps the composition.
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 0.75, "upscale": 0.4}
INPAINT_FILLS = ("original", "fill", "latent noise", "latent nothing")  # A1111 "Masked content"
INPAINT_AREAS = ("whole", "only masked")  # A1111 "Inpaint area": Whole picture, Only masked (pipelines/inpaint.py)
CONCAT_KINDS = (None, "inpaint", "lowres")
MAX_UPSCALE = 8.0
MAX_MASK_BLUR = 128  # px; A1111's slider stops at 64, and a wider blur leaves no mask to repaint
# Sampling settings of a request that leaves them None and whose model recommends none (A1111's defaults,
# except the sampler). A model recommends its own in `ModelConfig.defaults` (daguerre's trained models do).
DEFAULT_SETTINGS: dict[str, Any] = {"steps": 20, "sampler": "DPM++ 2M", "schedule": "Automatic", "cfg_scale": 7.0}
LOWRES_NOISE_STEPS = 1000  # the low-res augmentation schedule's length (SD x4 upscaler `max_noise_level` < this)


@dataclass
class GenerationRequest:
    """What to generate. `None` sizes mean the model's native size; `seed=None` draws a random seed."""

    prompt: str = ""
    negative_prompt: str = ""
    # None: the model's recommended setting (ModelConfig.defaults), else DEFAULT_SETTINGS
    steps: int | None = None
    sampler: str | None = None  # AUTOMATIC1111 or ComfyUI name (docs/samplers.md)
    schedule: str | None = None  # A1111 "Schedule type": Automatic, Karras, Exponential, SGM Uniform, ...
    cfg_scale: float | None = None  # classifier-free guidance scale; 1 = no guidance
    guidance_rescale: float = 0.0  # Lin et al. 2024 rescale, for zero-terminal-SNR / v models
    eta: float | None = None  # noise of ancestral / SDE / DDIM steps; None = the sampler's default (sampler_names.py)
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1  # number of images
    batch_size: int = 1  # images per network call
    clip_skip: int = 1  # A1111 "Clip skip": 1 = the model's own layer, 2 = one layer earlier, ...
    class_label: int | str | None = None  # class-conditional models
    task: str = "txt2img"  # the pipeline: "txt2img", "img2img", "inpaint" or "upscale"
    init_image: str | os.PathLike | Image.Image | None = None  # img2img / inpaint / upscale input
    strength: float | None = None  # denoising strength in [0, 1]; None = DEFAULT_STRENGTH[task]
    resize_mode: str = "crop"  # how the init image meets width x height: crop, fit, stretch, none (images.py)
    mask: str | os.PathLike | Image.Image | None = None  # inpaint: white = repaint, black = keep
    mask_blur: int = 4  # A1111 "Mask blur": Gaussian sigma in pixels of the mask's soft edge
    inpaint_fill: str = "original"  # A1111 "Masked content": original, fill, latent noise, latent nothing
    inpaint_area: str = "whole"  # A1111 "Inpaint area": "whole" picture, or "only masked" (a crop at width x height)
    inpaint_padding: int = 32  # "only masked": pixels of context around the mask's bounding box
    upscale_factor: float = 2.0  # upscale: output size = input size x this (snapped to the model's grid)
    noise_level: int = 20  # upscale with an SR model that takes it (unet.num_classes): low-res augmentation step
    tile: bool | None = None  # tiled VAE decode/encode: True, False, or None = automatic for large images
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for pipeline-specific settings
    # the bounds `validate` checked this request against: its validated copy keeps them, so that a pipeline's
    # own validate (of an already validated request) applies the caller's limits, not DEFAULT_LIMITS
    limits: Limits | None = field(default=None, repr=False, compare=False)

    def settings(self, config: ModelConfig) -> dict[str, Any]:
        """steps, sampler, schedule and cfg_scale: this request's, else the model's recommended, else global.

        A schedule inside a sampler name ("DPM++ 2M Karras") is the schedule when the request names none
        (the model's recommended schedule goes with its recommended sampler); a schedule the request names
        wins over one inside the model's recommended sampler name. Only two conflicting choices of the
        request itself are an error (in `validate`)."""
        from ..diffusion.sampler_names import split_sampler_name

        chosen = {k: v if (v := getattr(self, k)) is not None else config.defaults.get(k, fallback)
                  for k, fallback in DEFAULT_SETTINGS.items()}
        if (split := split_sampler_name(chosen["sampler"])) and split[1] is not None:
            if self.schedule is None:
                chosen["schedule"] = split[1]
            elif self.sampler is None:
                chosen["sampler"] = split[0]
        return chosen

    def validate(self, config: ModelConfig, limits: Limits | None = None) -> GenerationRequest:
        """Check every field against the model and `limits` (daguerre.limits: size, images, steps, work;
        None: the request's own `limits` if it has some, else DEFAULT_LIMITS); return a copy with defaults
        (settings, size, seed) filled in, which keeps the limits."""
        if limits is None:
            limits = self.limits if self.limits is not None else DEFAULT_LIMITS
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a daguerre.limits.Limits, got {type(limits).__name__}")
        if any(getattr(self, k) is None for k in DEFAULT_SETTINGS):
            return dataclasses.replace(self, **self.settings(config)).validate(config, limits)
        from ..diffusion.sampler_names import resolve_sampler

        self._check_types()
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
        te = config.text_encoder
        if config.conditioning == "text" and te is not None and self.clip_skip > te.layers - te.skip_layers:
            raise ValueError(f"clip skip {self.clip_skip} is more than the {te.layers - te.skip_layers} layers this "
                             f"model's text encoder can skip to; use 1..{te.layers - te.skip_layers}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value} (leave it out for the "
                                 "model's native size)")
        limits.check_count(self.n, self.steps)
        limits.check_prompt(self.prompt)
        limits.check_prompt(self.negative_prompt, "negative prompt")
        chunks = _prompt_chunks(config, self.prompt, self.negative_prompt)
        if self.eta is not None and not (0.0 <= self.eta < float("inf")):
            raise ValueError(f"eta must be >= 0 (0 = no fresh noise per step), got {self.eta}")
        if self.inpaint_area not in INPAINT_AREAS or (self.inpaint_area != "whole" and self.task != "inpaint"):
            raise ValueError(f"inpaint area {self.inpaint_area!r}: choose one of {', '.join(INPAINT_AREAS)}; "
                             "'only masked' needs a mask (task inpaint)")
        resolve_sampler(self.sampler, self.schedule)  # raises with the list of valid names
        _check_task(config, self.task)
        factor = config.vae.downsample_factor * config.unet.downsample_factor
        images: dict[str, Any] = {}
        width, height = self.width, self.height
        if self.task in IMAGE_TASKS:
            images = self._validate_images(config, factor, limits)
            width, height = images.pop("size")
        width = config.sample_size if width is None else width  # 0 is an error below, not the default
        height = config.sample_size if height is None else height
        limits.check_size(width, height, min(self.batch_size, self.n), config.sample_size)
        for name, value in (("width", width), ("height", height)):
            if value < factor or value % factor:
                raise ValueError(
                    f"{name} {value} is not a positive multiple of {factor}, which this model needs "
                    f"(VAE factor {config.vae.downsample_factor} x U-Net factor {config.unet.downsample_factor}); "
                    f"try {max(factor, round(value / factor) * factor)}"
                )
        guided = self.cfg_scale != 1.0 and config.conditioning != "none"
        work = request_work(config, width=width, height=height, steps=self.steps, n=self.n, guided=guided,
                            encodes=self.task in IMAGE_TASKS, prompt_chunks=chunks)
        limits.check_work(work, f"{self.n} image(s) of {width}x{height} at {self.steps} steps")
        seed = self.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED)
        if not (0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (or -1 for random), got {seed}")
        if config.conditioning == "class":
            _class_index(config, self.class_label)
        elif self.class_label is not None:
            raise ValueError(
                f"class label {self.class_label!r} given, but model {config.name!r} is not class-conditional"
            )
        return dataclasses.replace(self, width=width, height=height, seed=seed, limits=limits, **images)

    def _check_types(self) -> None:
        """The type of every scalar field, so that a string or a bool from JSON, a form or a script is
        named here and not met deep inside torch (True is not a step count, "7" is not a CFG scale)."""
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")
        whole = ["steps", "n", "batch_size", "clip_skip", "mask_blur", "noise_level", "inpaint_padding"]
        whole += [k for k in ("seed", "width", "height") if getattr(self, k) is not None]
        for name in whole:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        real = ["cfg_scale", "guidance_rescale", "upscale_factor"]
        real += [k for k in ("strength", "eta") if getattr(self, k) is not None]
        for name in real:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):  # NaN or inf turn every pixel NaN: a black image
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("sampler", "schedule", "task", "resize_mode", "inpaint_fill"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")
        if self.tile not in (None, True, False):
            raise ValueError(f"tile must be true, false or left out (automatic), got {self.tile!r}")

    def _validate_images(self, config: ModelConfig, factor: int, limits: Limits) -> dict[str, Any]:
        """Check and load the image fields of an image task (each refused over `limits.max_input_pixels`
        before it is decoded): {init_image, mask, strength, size}."""
        from .images import RESIZE_MODES, center_crop, load_image, load_mask, snap_down

        if self.init_image is None:
            raise ValueError(f"{self.task} needs an input image (init_image)")
        strength = DEFAULT_STRENGTH[self.task] if self.strength is None else self.strength
        if not (0.0 <= strength <= 1.0):
            raise ValueError(
                f"denoising strength must be in [0, 1] (0 = keep the image, 1 = ignore it), got {strength}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        mode = "L" if config.vae.in_channels == 1 else "RGB"
        image = load_image(self.init_image, mode, limits)
        mask = None
        if self.task == "inpaint":
            if self.mask is None:
                raise ValueError("inpaint needs a mask image (white = repaint, black = keep)")
            mask = load_mask(self.mask, limits)
            if mask.size != image.size:
                raise ValueError(
                    f"mask {_name(self.mask)} is {mask.width}x{mask.height} but the image is "
                    f"{image.width}x{image.height}: give a mask of the same size as the image"
                )
            if mask.getextrema()[1] == 0:
                raise ValueError(f"mask {_name(self.mask)} is entirely black: nothing to repaint (white = repaint)")
            if not (isinstance(self.mask_blur, int) and 0 <= self.mask_blur <= MAX_MASK_BLUR):
                raise ValueError(f"mask blur must be a whole number of pixels in [0, {MAX_MASK_BLUR}], "
                                 f"got {self.mask_blur!r}")
            if self.inpaint_fill not in INPAINT_FILLS:
                raise ValueError(f"unknown masked-content mode {self.inpaint_fill!r}; choose one of "
                                 f"{', '.join(INPAINT_FILLS)}")
        if self.task != "upscale" and min(image.size) < factor:
            raise ValueError(f"image {_name(self.init_image)} is {image.width}x{image.height}, smaller than the "
                             f"model's {factor}-pixel grid: give a larger image")
        width, height = self.width, self.height
        if self.inpaint_area == "only masked":  # the crop around the mask runs at width x height, not the image
            if self.inpaint_padding < 0:
                raise ValueError(f"inpaint padding must be >= 0 pixels, got {self.inpaint_padding}")
            width, height = width or config.sample_size, height or config.sample_size
        elif self.task == "upscale":
            if not (1.0 < self.upscale_factor <= MAX_UPSCALE):
                raise ValueError(f"upscale factor must be in (1, {MAX_UPSCALE:g}], got {self.upscale_factor}")
            _check_noise_level(config, self.noise_level)
            width = width or snap_down(round(image.width * self.upscale_factor), factor)
            height = height or snap_down(round(image.height * self.upscale_factor), factor)
        elif width is None or height is None:
            # default size: the image's own, snapped down to the model's grid; "crop" (the default) takes
            # the centered window without resampling, so the kept pixels stay exactly the input's
            w0, h0 = snap_down(image.width, factor), snap_down(image.height, factor)
            if self.resize_mode == "none" and (w0, h0) != image.size:
                raise ValueError(
                    f"image {_name(self.init_image)} is {image.width}x{image.height}, not a multiple of {factor} "
                    f"as this model needs: use a resize mode (crop, fit, stretch) or give --size, e.g. {w0}x{h0}"
                )
            width, height = width or w0, height or h0
            if self.resize_mode == "crop" and image.width >= width and image.height >= height \
                    and image.width - width < factor and image.height - height < factor:
                image = center_crop(image, width, height)
                mask = center_crop(mask, width, height) if mask is not None else None
        if self.resize_mode == "none" and self.task != "upscale" and self.inpaint_area == "whole" \
                and image.size != (width, height):
            raise ValueError(f"image {_name(self.init_image)} is {image.width}x{image.height}, not {width}x{height}: "
                             "use a resize mode (crop, fit, stretch) or give a matching size")
        return {"init_image": image, "mask": mask, "strength": strength, "size": (width, height)}


class NonFiniteError(ValueError):
    """Sampling produced NaN or infinite values: there is no image to return (`check_finite`)."""


def check_finite(x: torch.Tensor, what: str, components: Components, request: GenerationRequest | None = None) -> None:
    """Raise a `NonFiniteError` naming the likely cause if `x` (the final latents, or the decoded pixels)
    holds a NaN or an infinity, which would otherwise be saved as an all-black image: weights that are
    not finite (looked for only then), else the request's settings, else a half-precision overflow."""
    import torch

    if bool(torch.isfinite(x).all()):
        return
    kind = "NaN" if bool(torch.isnan(x).any()) else "infinite"
    broken = [title for name, title in (("unet", "U-Net"), ("vae", "VAE"), ("text_encoder", "text encoder"))
              if (module := getattr(components, name, None)) is not None
              and not all(bool(torch.isfinite(p).all()) for p in module.parameters())]
    if broken:
        raise NonFiniteError(f"the model produced {kind} values in the {what}: its weights are broken (the "
                             f"{' and the '.join(broken)} {'holds' if len(broken) == 1 else 'hold'} NaN or "
                             "infinite values); use another copy of the model")
    causes = []
    if request is not None:
        causes.append(f"the settings may be extreme (cfg scale {request.cfg_scale:g}, guidance rescale "
                      f"{request.guidance_rescale:g}, {request.steps} steps, sampler {request.sampler})")
    dtypes = {p.dtype for m in (components.unet, components.vae) if m is not None for p in m.parameters()}
    half = sorted(str(d).removeprefix("torch.") for d in dtypes & {torch.float16, torch.bfloat16})
    if half:
        causes.append(f"{' or '.join(half)} may have overflowed: try the float32 compute dtype (--dtype fp32)")
    raise NonFiniteError(f"the model produced {kind} values in the {what}: "
                         f"{'; or '.join(causes) or 'the model or the settings are broken'}")


def _prompt_chunks(config: ModelConfig, prompt: str, negative: str) -> int:
    """Check the prompts' bracket syntax (pipelines.prompts) for a text model, and return an upper bound
    of the 77-token chunks the longer one makes (1 for other models)."""
    if config.conditioning != "text":
        return 1
    from .prompts import chunk_bound, parse_emphasis

    parse_emphasis(prompt)
    parse_emphasis(negative)
    return max(chunk_bound(prompt), chunk_bound(negative))


def _name(source: Any) -> str:
    """How to name an image source in an error message."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "(in-memory image)"


def _check_task(config: ModelConfig, task: str) -> None:
    """The task must exist and fit the model's concatenated-input kind (ModelConfig.concat)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if config.concat not in CONCAT_KINDS:
        raise ValueError(f"model {config.name!r} has an unknown concat kind {config.concat!r}; "
                         f"daguerre knows {', '.join(str(k) for k in CONCAT_KINDS)}")
    lat = config.vae.latent_channels
    if config.concat == "lowres":
        if task != "upscale":
            raise ValueError(f"model {config.name!r} is a super-resolution model (it takes a low-resolution image): "
                             f"use `daguerre upscale`, not {task}")
        if config.unet.in_channels != lat + config.vae.in_channels:
            raise ValueError(f"super-resolution model {config.name!r} has {config.unet.in_channels} input channels; "
                             f"expected {lat} latent + {config.vae.in_channels} image channels")
        if config.conditioning == "class":
            raise ValueError(f"model {config.name!r}: class-conditional super-resolution models are not supported")
    if config.concat == "inpaint" and config.unet.in_channels != 2 * lat + 1:
        raise ValueError(f"inpainting model {config.name!r} has {config.unet.in_channels} input channels; "
                         f"expected {2 * lat + 1} (latent {lat} + mask 1 + masked-image latent {lat})")


def _check_noise_level(config: ModelConfig, level: int) -> None:
    """The low-res augmentation level of an SR model that is told it (its label embedding has that many rows)."""
    if config.concat != "lowres" or config.unet.num_classes is None:
        return
    top = min(config.unet.num_classes, LOWRES_NOISE_STEPS) - 1
    if not (isinstance(level, int) and 0 <= level <= top):
        raise ValueError(f"noise level must be a whole number in [0, {top}], got {level!r}")


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

