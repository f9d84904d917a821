"""`GenerationRequest`: every field a user sets for one generation, the one table every surface reads.

The CLI, the HTTP server, the Python API and the PNG parameters all speak this one dataclass: each
field's metadata (`fields.setting`) names its type, the tasks it matters for and its face on every
surface (command-line flag, AUTOMATIC1111 payload key, PNG-parameters key), and the surfaces are
generated from it (pipelines/fields.py), so a new field is one edit here. `task` names the pipeline
(txt2img, img2img, inpaint, upscale); the image fields only matter for the tasks that take images.

`validate` checks a request once, at the edge, against one model and the request's `Limits`
(daguerre.limits: pixels, images, steps, estimated work, input image pixels, prompt length; prompt
brackets nested too deep, pipelines.prompts), and returns a `ValidRequest`: frozen, with every
default filled in and everything the pipelines need resolved (the sampler choice and its sigmas, the
seed, the loaded images, the class index). The pipelines take only that (`require_valid`) and do not
check or resolve again. It refuses, with a ValueError naming the field and value: a value of the
wrong type, a NaN or infinite number (they make an all-black image), a size of 0 or less, and
anything over the limits. `check_finite` is the matching check after sampling: NaN or infinite
latents or pixels are a `NonFiniteError`, never an image.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..limits import (
    DEFAULT_LIMITS,
    MAX_CLIP_GUIDANCE,
    MAX_CLIP_REPEATS,
    MAX_CUTOUTS,
    RECURRENCE_SIGMAS,
    LimitError,
    Limits,
    request_work,
)
from . import hires
from .fields import (
    BATCHES,
    CLASS_PNG,
    CLIP_PNG,
    ETA_PNG,
    FILL,
    FULL_RES,
    IMAGE_TASKS,
    INIT_IMAGES,
    LAYOUT_PAYLOAD,
    LAYOUT_PNG,
    MASK,
    MASK_BLUR,
    NEGATIVE_KEY,
    PROMPT_KEY,
    RESIZE,
    RESIZE_MODES,
    SAMPLER_PNG,
    SCHEDULE_PNG,
    SEMANTIC_PAYLOAD,
    SEMANTIC_PNG,
    SIZE_FLAG,
    SIZE_PNG,
    TASKS,
    TXT2IMG,
    Flag,
    Payload,
    Png,
    dashed_choices,
    setting,
)
from .hires import DEFAULT_STRENGTH as HIRES_STRENGTH
from .hires import HIRES_PAYLOAD, HIRES_PNG, HIRES_SIZE_FLAG, MAX_HIRES_SCALE
from .hires import UPSCALERS as HIRES_UPSCALERS
from .hires import flag_name as hires_flag_name

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..components import Components
    from ..conditioning import Conditioner
    from ..data.layout import LabelMap, LayoutObject
    from ..diffusion.sampler_names import SamplerChoice

MAX_SEED = 2**32 - 1
# Denoising strength when none is given: A1111's img2img default 0.75; for upscaling a regular model
# (resize + img2img, A1111 "hires fix") a moderate 0.4 that keeps the composition.
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 0.75, "upscale": 0.4}
INPAINT_FILLS = ("original", "fill", "latent noise", "latent nothing")  # A1111 "Masked content"
INPAINT_AREAS = ("whole", "only masked")  # A1111 "Inpaint area": Whole picture, Only masked (pipelines/inpaint.py)
MAX_UPSCALE = 8.0
MAX_MASK_BLUR = 128  # px; A1111's slider stops at 64, and a wider blur leaves no mask to repaint
MAX_LAYOUT_FILE = 256 * 1024  # bytes of a layout JSON file (64 objects take ~5 kB)
# Sampling settings of a request that leaves them None and whose model recommends none (A1111's defaults,
# except the sampler). A model recommends its own in `ModelConfig.defaults` (daguerre's trained models do).
DEFAULT_SETTINGS: dict[str, Any] = {"steps": 20, "sampler": "DPM++ 2M", "schedule": "Automatic", "cfg_scale": 7.0}
INPAINT = ("inpaint",)
UPSCALE = ("upscale",)
# Fewer network calls (issue 15): the fields that set them (`fast` fills these in), and DeepCache's shallow
# path by default: conv_in and the last output block.
FEWER_CALLS_FIELDS = ("cfg_min_sigma", "cfg_cutoff_sigma", "deepcache_interval", "deepcache_depth",
                      "deepcache_max_sigma", "tome_ratio")
DEEPCACHE_DEPTH = 1
MAX_TOME_RATIO = 0.75  # token merging: the sources are 3 of every 2x2 cell (nn/tome.py)
# `fast`: what it fills in, chosen by measurement (docs/benchmarks.md, "Fewer network calls"): DeepCache at
# FAST_DEEPCACHE = (interval, depth) on the last FAST_DEEPCACHE_FRACTION of the sampler's steps, token merging
# at FAST_TOME, and the CFG cutoff on the last FAST_CUTOFF_FRACTION of the steps (`cutoff_between` places the
# sigmas between two steps of the run).
# CLIP guidance (guidance.clip_guided_denoiser): the scale `--clip-guidance` alone means and the cutouts per
# image, chosen by measurement on the shipped shapes model (docs/clip.md)
CLIP_GUIDANCE = 500.0
CUTOUTS = 16
# the steps between limits.RECURRENCE_SIGMAS taken this many times by a guided request (self-recurrence,
# guidance.self_recurrent): with the shipped noise-aware CLIP it lifted the asked object from 44% to 62-66% of
# pilot images (docs/clip.md); 1 = off
CLIP_REPEATS = 8
# the sampler of a CLIP-guided request that names none (not the model's recommended one): ancestral steps follow
# the guidance far better than deterministic ones (docs/clip.md: noise-aware guidance of the shapes model drew the
# asked object alone in 34% of 32 images with Euler a against 9% with DPM++ 2M)
GUIDED_SAMPLER = "Euler a"
CLIP_GUIDANCE_FIELDS = ("clip_guidance", "clip_model", "cutouts", "clip_repeats")
FAST_DEEPCACHE = (3, 1)
FAST_DEEPCACHE_FRACTION = 0.7
FAST_TOME = 0.5
FAST_CUTOFF_FRACTION = 0.3
FAST_HELP = (f"DeepCache every {FAST_DEEPCACHE[0]} calls at depth {FAST_DEEPCACHE[1]} on the last "
             f"{FAST_DEEPCACHE_FRACTION:.0%} of the steps, token merging at {FAST_TOME:g}, and the CFG cutoff on the "
             f"last {FAST_CUTOFF_FRACTION:.0%}")
# A zero-terminal-SNR model (sigma_max 4096, not SD's 14.6) draws its image below about SD's sigma_max: a run with
# fewer than MIN_LOW_STEPS steps from below LOW_SIGMA breaks images for every sampler (docs/samplers.md,
# "Zero-terminal-SNR models"), and `validate` warns
LOW_SIGMA = 15.0
MIN_LOW_STEPS = 5


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. `None` sizes mean the model's native size; `seed=None` (or -1) draws a random seed.

    The fields with a PNG key come first, in the order A1111 writes them (pipelines/infotext.py)."""

    prompt: str = setting("", type=str, a1111=Payload("prompt", empty=True), png=PROMPT_KEY, cli=Flag(
        "prompt", nargs="?", help={"txt2img": "what to draw", "img2img": "what to draw",
                                   "inpaint": "what to draw in the masked area",
                                   "upscale": "what the image shows (guides the added detail)"}))
    negative_prompt: str = setting("", type=str, a1111=Payload("negative_prompt", empty=True), png=NEGATIVE_KEY,
                                   cli=Flag("--negative", "-N", help="negative prompt"))
    # None: the model's recommended setting (ModelConfig.defaults), else DEFAULT_SETTINGS
    steps: int | None = setting(None, type=int, a1111="steps", png="Steps", cli=Flag(
        "--steps", help="sampling steps (default: the model's recommended number, else 20)"))
    # AUTOMATIC1111 or ComfyUI name (docs/samplers.md)
    sampler: str | None = setting(None, type=str, a1111=Payload("sampler_name", "sampler_index", empty=True),
                                  png=SAMPLER_PNG, cli=Flag("--sampler", help="sampler, A1111 or ComfyUI name "
                                  "(default: the model's, else 'DPM++ 2M'); see docs/samplers.md or --list-samplers"))
    # A1111 "Schedule type": Automatic, Karras, Exponential, SGM Uniform, ...
    schedule: str | None = setting(None, type=str, a1111=Payload("scheduler", empty=True), png=SCHEDULE_PNG,
                                   cli=Flag("--schedule", help="schedule type: Automatic, Karras, Exponential, "
                                            "SGM Uniform, Simple, Normal (default: the model's, else Automatic)"))
    # classifier-free guidance scale; 1 = no guidance
    cfg_scale: float | None = setting(
        None, type=float, a1111="cfg_scale", png=Png("CFG scale", fmt=lambda v: f"{v:.10g}"),
        cli=Flag("--cfg", help="classifier-free guidance scale (default: the model's recommended scale, else 7)"))
    seed: int | None = setting(None, type=int, a1111="seed", png="Seed", cli=Flag(
        "--seed", help="seed of the first image; image i uses seed+i (-1 or left out: random)"))
    width: int | None = setting(None, type=int, a1111="width", png=SIZE_PNG, cli=SIZE_FLAG)
    height: int | None = setting(None, type=int, a1111="height", png=SIZE_PNG, cli=SIZE_FLAG)
    # class-conditional models: a class index or name
    class_label: int | str | None = setting(None, png=CLASS_PNG, cli=Flag(
        "--class", dest="class_label", metavar="NAME_OR_INDEX",
        help="class label, for class-conditional models (a class name or index)"))
    # A1111 "Clip skip": 1 = the model's own layer, 2 = one layer earlier, ...
    clip_skip: int = setting(1, type=int, a1111=Payload("override_settings", setting="CLIP_stop_at_last_layers"),
                             png="Clip skip", cli=Flag("--clip-skip", help="A1111 clip skip (default 1)"))
    # guidance truncation (A1111 "NGMS", diffusers' CFG cutoff): below this sigma the unconditional half is
    # skipped and the step uses the conditional prediction alone; 0 = never (guidance.cfg_denoiser)
    cfg_min_sigma: float = setting(0.0, type=float, a1111="s_min_uncond", png=Png("NGMS", fmt=lambda v: f"{v:g}"),
                                   cli=Flag("--cfg-min-sigma", metavar="SIGMA", help="A1111's NGMS: below noise "
                                            "level SIGMA every other network call skips the unconditional half of "
                                            "guidance: less work, some loss of guidance (default 0: never)"))
    # diffusers' CFG cutoff: every call below this sigma runs the conditional half alone; 0 = never
    cfg_cutoff_sigma: float = setting(0.0, type=float, a1111="cfg_cutoff_sigma",
                                      png=Png("CFG cutoff", fmt=lambda v: repr(float(v))), cli=Flag(
        "--cfg-cutoff", metavar="SIGMA", help="diffusers' CFG cutoff: every network call below noise level SIGMA "
        "runs without guidance, on the conditional half alone (default 0: never)"))
    # DeepCache (Ma et al. 2024): the U-Net's deep blocks run every N-th call, the shallow path every call
    deepcache_interval: int = setting(1, type=int, a1111="deepcache_interval", png="DeepCache interval", cli=Flag(
        "--deepcache", metavar="N", help="DeepCache feature reuse: the deep blocks of the U-Net run every N-th "
        "network call, the shallow path (--deepcache-depth outer blocks) every call (default 1: off)"))
    deepcache_depth: int = setting(DEEPCACHE_DEPTH, type=int, a1111="deepcache_depth", png="DeepCache depth",
                                   cli=Flag("--deepcache-depth", metavar="BLOCKS", help="with --deepcache: the "
                                            "input blocks (and as many output blocks) of the shallow path that "
                                            f"run every call (default {DEEPCACHE_DEPTH})"))
    # DeepCache only at the low-noise end: calls above this sigma run the whole U-Net; 0 = reuse at every sigma
    deepcache_max_sigma: float = setting(0.0, type=float, a1111="deepcache_max_sigma",
                                         png=Png("DeepCache max sigma", fmt=lambda v: repr(float(v))), cli=Flag(
        "--deepcache-max-sigma", metavar="SIGMA", help="with --deepcache: reuse features only on network calls below "
        "noise level SIGMA, where the image's layout is settled (default 0: at every noise level)"))
    # token merging (ToMe for SD, Bolya & Hoffman 2023) in the highest-resolution self-attention; 0 = off
    tome_ratio: float = setting(0.0, type=float, a1111="tome_ratio", png=Png("ToMe ratio", fmt=lambda v: f"{v:g}"),
                                cli=Flag("--tome", metavar="RATIO", help="token merging: the self-attention of the "
                                         "U-Net's highest-resolution transformers runs on the tokens left after "
                                         f"merging RATIO of them, at most {MAX_TOME_RATIO:g} (default 0: off)"))
    # the preset of the settings above that pay (FAST_PRESET): fills in those left at their defaults
    fast: bool = setting(False, type=bool, a1111="fast", cli=Flag(
        "--fast", help="fewer network calls: " + FAST_HELP.replace("%", "%%") + "; fills in those of these "
        "settings left off (default off)"))
    # Lin et al. 2024 rescale, for zero-terminal-SNR / v models
    guidance_rescale: float = setting(0.0, type=float, png=Png("Guidance rescale", fmt=lambda v: f"{v:g}"))
    # noise of ancestral / SDE / DDIM steps; None = the sampler's default (sampler_names.py)
    eta: float | None = setting(None, type=float, a1111="eta", png=ETA_PNG, cli=Flag(
        "--eta", help="noise of each step of an ancestral, SDE or DDIM sampler, 0 = none (default: the "
        "sampler's, A1111's: 1, DDIM 0); other samplers ignore it"))
    # CLIP guidance towards the prompt (guidance.clip_guided_denoiser): the scale of the CLIP loss; 0 = off
    clip_guidance: float = setting(0.0, type=float, a1111="clip_guidance", png=CLIP_PNG, cli=Flag(
        "--clip-guidance", metavar="SCALE", nargs="?", const=CLIP_GUIDANCE, help="steer the image towards the prompt "
        "by the gradient of a CLIP model's image-text distance (docs/clip.md); SCALE left out: the recommended "
        f"{CLIP_GUIDANCE:g} (default 0: off). With --cfg 0 a text model is unconditional and CLIP alone steers it"))
    # the guiding CLIP: a shipped CLIP's name or a path (registry.open_clip); None = the CLIP shipped for the model
    clip_model: str | None = setting(None, type=str, a1111="clip_model", png=CLIP_PNG, cli=Flag(
        "--clip", metavar="MODEL", help="with --clip-guidance: the CLIP model, a shipped CLIP's name or a path "
        "(daguerre CLIP file, transformers folder, OpenCLIP / OpenAI checkpoint); default: the CLIP shipped to guide "
        "the model (shapes: shapes-noisy-clip, a noise-aware CLIP of its latents, else shapes-clip)"))
    # random crops of the decoded x0 estimate CLIP sees per image and call (the first is the whole image)
    cutouts: int = setting(CUTOUTS, type=int, a1111="cutouts", png=CLIP_PNG, cli=Flag(
        "--cutouts", metavar="N", help=f"with --clip-guidance and a pixel CLIP: CLIP's views of each image per step, "
        f"the whole image and N-1 random crops; more is steadier and slower (default {CUTOUTS}, at most "
        f"{MAX_CUTOUTS}); a noise-aware CLIP reads the whole latents"))
    # each guided step at a sigma in limits.RECURRENCE_SIGMAS taken this many times, noised back between
    clip_repeats: int = setting(CLIP_REPEATS, type=int, a1111="clip_repeats", png=CLIP_PNG, cli=Flag(
        "--clip-repeats", metavar="N", help=f"with --clip-guidance: take each step between sigma "
        f"{RECURRENCE_SIGMAS[0]:g} and {RECURRENCE_SIGMAS[1]:g} N times, noised back to its level between them "
        f"(self-recurrence: the guidance acts N times where the image's objects are decided; default {CLIP_REPEATS}, "
        f"at most {MAX_CLIP_REPEATS}; 1 = off)"))
    n: int = setting(1, type=int, a1111=BATCHES, cli=Flag("--n", help="number of images (default 1)"))
    batch_size: int = setting(1, type=int, a1111=BATCHES, cli=Flag(  # images per network call
        "--batch-size", help="images per network call (default 1)"))
    # tiled VAE decode/encode: True, False, or None = automatic for large images
    tile: bool | None = setting(None, type=bool, cli=Flag(
        "--tile", help="decode with the VAE in overlapping tiles (less memory); default: automatically when the "
        "latent has more than 96x96 cells (768x768 pixels for Stable Diffusion)"))
    task: str = setting("txt2img", type=str)  # the pipeline: set by the command, the endpoint or the API method
    # img2img / inpaint / upscale input: a path or a PIL image (a `ValidRequest` holds it loaded)
    init_image: str | os.PathLike | Image.Image | None = setting(None, tasks=IMAGE_TASKS, a1111=INIT_IMAGES,
                                                                 cli=Flag("image", help="input image file"))
    # denoising strength in [0, 1]; None = DEFAULT_STRENGTH[task]
    strength: float | None = setting(None, type=float, tasks=IMAGE_TASKS, a1111="denoising_strength", cli=Flag(
        "--strength", "-s", help={
            "img2img": "denoising strength in [0, 1]: 0 keeps the image, 1 ignores it (default 0.75)",
            "inpaint": "denoising strength in [0, 1] inside the mask (default 0.75; 1 with an inpainting model "
                       "or --fill latent-noise)",
            "upscale": "regular models: img2img denoising strength after the resize (default 0.4); "
                       "super-resolution models start from noise and ignore it"}))
    # how the init image meets width x height: crop, fit, stretch, none (images.py)
    resize_mode: str = setting("crop", type=str, tasks=IMAGE_TASKS, a1111=RESIZE, cli=Flag(
        "--resize", choices=RESIZE_MODES, help="how the input meets --size: crop (scale to cover, center-crop), "
        "fit (scale to fit, pad with edge pixels), stretch, none (must match). Without --size the image's own size "
        "is used, center-cropped to the model's grid (default crop)"))
    # inpaint: white = repaint, black = keep
    mask: str | os.PathLike | Image.Image | None = setting(None, tasks=INPAINT, a1111=MASK, cli=Flag(
        "mask", help="mask image of the same size: white = repaint, black = keep"))
    # A1111 "Mask blur": Gaussian sigma in pixels of the mask's soft edge
    mask_blur: int = setting(4, type=int, tasks=INPAINT, a1111=MASK_BLUR, cli=Flag(
        "--mask-blur", help="soften the mask edge by a Gaussian of this many pixels (default 4); outside the "
        "blurred mask the output keeps the input's pixels exactly"))
    # A1111 "Masked content": original, fill, latent noise, latent nothing
    inpaint_fill: str = setting("original", type=str, tasks=INPAINT, a1111=FILL, cli=Flag(
        "--fill", **dashed_choices(INPAINT_FILLS, "inpaint_fill"), help="what the masked area starts from: the "
        "original image, a fill of its surroundings, latent noise or zero latents (the last two want --strength 1) "
        "(default original)"))
    # A1111 "Inpaint area": "whole" picture, or "only masked" (a crop at width x height)
    inpaint_area: str = setting("whole", type=str, tasks=INPAINT, a1111=FULL_RES, cli=Flag(
        "--only-masked", action="store_const", const="only masked", help="A1111's 'Only masked': redraw only a "
        "crop around the mask, at --size (default: the model's size), and paste it back; the output keeps the "
        "input's size"))
    # "only masked": pixels of context around the mask's bounding box
    inpaint_padding: int = setting(32, type=int, tasks=INPAINT, a1111=FULL_RES, cli=Flag(
        "--only-masked-padding", metavar="PIXELS", help="with --only-masked: pixels of context around the mask "
        "in the crop (default 32)"))
    # upscale: output size = input size x this (snapped to the model's grid)
    upscale_factor: float = setting(2.0, type=float, tasks=UPSCALE, cli=Flag(
        "--scale", help="upscale factor (default 2; --size overrides it)"))
    # upscale with an SR model that takes it (unet.num_classes): low-res augmentation step
    noise_level: int = setting(20, type=int, tasks=UPSCALE, cli=Flag(
        "--noise-level", help="super-resolution models that take it: noise added to the low-res input, in steps "
        "of the augmentation schedule (default 20)"))
    # semantic-synthesis models (docs/layout.md): the map, a PNG in the palette's colours (a path, a PIL image) or
    # a `data.layout.LabelMap`; a `ValidRequest` holds the LabelMap at the output size
    semantic_map: str | os.PathLike | Image.Image | LabelMap | None = setting(
        None, tasks=TXT2IMG, a1111=SEMANTIC_PAYLOAD, png=SEMANTIC_PNG, cli=Flag(
            "--semantic", metavar="MAP.png", help="semantic-synthesis models: the semantic map to draw, a PNG whose "
            "colours name the labels (the palette of docs/layout.md; the image takes the map's size unless --size "
            "says otherwise)"))
    # layout models (docs/layout.md): a list of {"phrase": ..., "box": [x0, y0, x1, y1]} (0-1 coordinates), or the
    # path of a JSON file of one; a `ValidRequest` holds a tuple of `data.layout.LayoutObject`, `boxes` included
    layout: str | os.PathLike | list[dict[str, Any]] | tuple[LayoutObject, ...] | None = setting(
        None, tasks=TXT2IMG, a1111=LAYOUT_PAYLOAD, png=LAYOUT_PNG, cli=Flag(
            "--layout", metavar="LAYOUT.json", help="layout models: a JSON list of objects {\"phrase\": \"a red "
            "circle\", \"box\": [x0, y0, x1, y1]} in 0-1 coordinates (x0, y0 the top-left corner)"))
    # more layout objects, each "phrase:x0,y0,x1,y1" (after those of `layout`)
    boxes: list[str] | None = setting(None, tasks=TXT2IMG, cli=Flag(
        "--box", action="append", metavar="PHRASE:X0,Y0,X1,Y1", help="layout models: one more object, e.g. "
        "--box \"a red circle:0.1,0.1,0.4,0.4\" (repeatable; after those of --layout)"))
    # GLIGEN adapter models: the fraction of the steps, from the first, that see the layout (GLIGEN's scheduled
    # sampling, its tau); the rest run the base model (conditioning.GligenConditioner.scheduled)
    layout_steps: float = setting(1.0, type=float, tasks=TXT2IMG, a1111="layout_steps",
                                  png=Png("Layout steps", fmt=lambda v: f"{v:g}"), cli=Flag(
        "--layout-steps", metavar="FRACTION", help="GLIGEN adapter models: the first FRACTION of the steps draw "
        "from the layout, the rest without it, as the base model (GLIGEN's scheduled sampling; default 1: all)"))
    # A1111's hires fix (enable_hr; pipelines/hires.py): after txt2img at the base size, upscale by this factor
    # (0 = off) and redraw by img2img; the A1111 payload and PNG codecs set every hires_ field
    hires_scale: float = setting(0.0, type=float, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG, cli=Flag(
        "--hires-scale", metavar="X", help="A1111's hires fix: generate at --size, upscale X times (at most "
        f"{MAX_HIRES_SCALE:g}) and redraw at the larger size by img2img (default 0: off)"))
    # the hires fix's final size (0 = from hires_scale; one of them 0: from the other and the base aspect)
    hires_width: int = setting(0, type=int, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG, cli=HIRES_SIZE_FLAG)
    hires_height: int = setting(0, type=int, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG, cli=HIRES_SIZE_FLAG)
    # A1111 upscaler name: Latent (bilinear), Latent (bicubic), Latent (nearest), ..., Lanczos, Nearest
    hires_upscaler: str = setting("Latent", type=str, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG, cli=Flag(
        "--hires-upscaler", choices=tuple(hires_flag_name(n) for n in HIRES_UPSCALERS), help="with the hires fix: "
        "latent* interpolate the latents, lanczos / nearest resize the decoded image (default latent: bilinear)"))
    # the second pass's steps (0 = steps) and denoising strength
    hires_steps: int = setting(0, type=int, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG, cli=Flag(
        "--hires-steps", metavar="N", help="with the hires fix: steps of the second pass (default 0: --steps)"))
    hires_strength: float = setting(HIRES_STRENGTH, type=float, tasks=TXT2IMG, a1111=HIRES_PAYLOAD, png=HIRES_PNG,
                                    cli=Flag(
        "--hires-denoise", metavar="S", help=f"with the hires fix: denoising strength of the second pass in [0, 1] "
        f"(default {HIRES_STRENGTH:g})"))
    # LoRAs to merge, each "FILE:WEIGHT" (or a (file, weight) pair): a path, or a name in the LoRA folder; with the
    # prompt's <lora:name:weight> tags, a `ValidRequest` holds them as `lora.syntax.LoraRef`s (docs/lora.md). Not
    # an HTTP field: a client names LoRAs by the prompt's tags, found in the server's --lora-dir only
    loras: list[str] | None = setting(None, cli=Flag(
        "--lora", dest="loras", action="append", metavar="FILE:WEIGHT", help="merge a LoRA (kohya / A1111, "
        "diffusers / PEFT, LyCORIS LoCon, LoHa, LoKr) with this weight (default 1): a file, or a name in "
        "--lora-dir (repeatable; the prompt's <lora:NAME:WEIGHT> tags too; docs/lora.md)"))
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for pipeline-specific settings
    # the bounds `validate` checks this request against when the caller gives none (a `ValidRequest` holds
    # those it was checked against)
    limits: Limits | None = field(default=None, repr=False, compare=False)

    def settings(self, config: ModelConfig) -> dict[str, Any]:
        """steps, sampler, schedule and cfg_scale: this request's, else the model's recommended, else global;
        a CLIP-guided request that names no sampler takes GUIDED_SAMPLER.

        A schedule inside a sampler name ("DPM++ 2M Karras") is the schedule when the request names none
        (the model's recommended schedule goes with its recommended sampler); a schedule the request names
        wins over one inside the model's recommended sampler name. Only two conflicting choices of the
        request itself are an error (in `validate`)."""
        from ..diffusion.sampler_names import split_sampler_name

        chosen = {k: v if (v := getattr(self, k)) is not None else config.defaults.get(k, fallback)
                  for k, fallback in DEFAULT_SETTINGS.items()}
        guided = isinstance(self.clip_guidance, int | float) and not isinstance(self.clip_guidance, bool)
        if self.sampler is None and guided and self.clip_guidance > 0:
            chosen["sampler"] = GUIDED_SAMPLER  # CLIP guidance: an ancestral sampler unless one is named
        if (split := split_sampler_name(chosen["sampler"])) and split[1] is not None:
            if self.schedule is None:
                chosen["schedule"] = split[1]
            elif self.sampler is None:
                chosen["sampler"] = split[0]
        return chosen

    def repeated_steps(self, sigmas: Any) -> int:
        """The sampler steps CLIP guidance's self-recurrence adds to a run through `sigmas` (guidance.self_recurrent):
        `clip_repeats - 1` for each step starting in limits.RECURRENCE_SIGMAS; 0 unguided or at 1 repeat."""
        if self.clip_guidance <= 0 or self.clip_repeats <= 1:
            return 0
        from ..guidance import recurrent_steps  # torch is loaded by now: the sigmas are a tensor

        return (self.clip_repeats - 1) * sum(recurrent_steps(sigmas, *RECURRENCE_SIGMAS))

    def validate(self, config: ModelConfig, limits: Limits | None = None) -> ValidRequest:
        """Check every field against the model and `limits` (daguerre.limits: size, images, steps, work;
        None: the request's own `limits` if it has some, else DEFAULT_LIMITS); return the `ValidRequest`
        with defaults (settings, size, seed, strength) filled in and the sampler, sigmas and images resolved."""
        if limits is None:
            limits = self.limits if self.limits is not None else DEFAULT_LIMITS
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a daguerre.limits.Limits, got {type(limits).__name__}")
        return dataclasses.replace(self, **self.settings(config))._resolve(config, limits)

    def _resolve(self, config: ModelConfig, limits: Limits) -> ValidRequest:
        """`validate` of a request whose sampling settings are filled in."""
        from ..conditioning import conditioner_for
        from ..diffusion.sampler_names import resolve_sampler

        self._check_types()
        if self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got n={self.n}, batch_size={self.batch_size}")
        if not (self.cfg_scale >= 0):
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        if not (self.cfg_min_sigma >= 0):
            raise ValueError(f"cfg minimum sigma must be >= 0 (0 = never skip the unconditional half), "
                             f"got {self.cfg_min_sigma}")
        if not (self.cfg_cutoff_sigma >= 0):
            raise ValueError(f"CFG cutoff sigma must be >= 0 (0 = never cut off guidance), got {self.cfg_cutoff_sigma}")
        blocks = config.unet.input_block_count
        if self.deepcache_interval < 1:
            raise ValueError(f"DeepCache interval must be a whole number >= 1 (1 = off), got {self.deepcache_interval}")
        if not 1 <= self.deepcache_depth < blocks:
            raise ValueError(f"DeepCache depth must be in [1, {blocks - 1}] for model {config.name!r} ({blocks} "
                             f"input blocks), got {self.deepcache_depth}")
        if not (self.deepcache_max_sigma >= 0):
            raise ValueError(f"DeepCache max sigma must be >= 0 (0 = reuse at every noise level), "
                             f"got {self.deepcache_max_sigma}")
        if not (0.0 <= self.tome_ratio <= MAX_TOME_RATIO):
            raise ValueError(f"token merging ratio must be in [0, {MAX_TOME_RATIO:g}] (0 = off), got {self.tome_ratio}")
        if not (0.0 <= self.guidance_rescale <= 1.0):
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1 (1 = the model's default layer), got {self.clip_skip}")
        conditioner = conditioner_for(config)
        conditioner.check_clip_skip(self.clip_skip)
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value} (leave it out for the "
                                 "model's native size)")
        limits.check_count(self.n, self.steps)
        limits.check_prompt(self.prompt)
        limits.check_prompt(self.negative_prompt, "negative prompt")
        chunks = _prompt_chunks(conditioner.takes_prompt, self.prompt, self.negative_prompt)
        if self.eta is not None and not (0.0 <= self.eta < float("inf")):
            raise ValueError(f"eta must be >= 0 (0 = no fresh noise per step), got {self.eta}")
        if self.inpaint_area not in INPAINT_AREAS or (self.inpaint_area != "whole" and self.task != "inpaint"):
            raise ValueError(f"inpaint area {self.inpaint_area!r}: choose one of {', '.join(INPAINT_AREAS)}; "
                             "'only masked' needs a mask (task inpaint)")
        choice = resolve_sampler(self.sampler, self.schedule)  # raises with the list of valid names
        _check_task(config, self.task)
        conditioner.concat.check_task(config, self.task)
        factor = config.vae.downsample_factor * config.unet.downsample_factor
        images: dict[str, Any] = {}
        width, height = self.width, self.height
        if self.task in IMAGE_TASKS:
            images = self._validate_images(config, factor, limits)
            width, height = images.pop("size")
        spatial = self._validate_spatial(config, conditioner, limits)
        semantic = spatial["semantic_map"]
        if semantic is not None:
            width, height = width or semantic.width, height or semantic.height
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
        guided = conditioner.guided(self.cfg_scale) and self.cfg_scale != 0  # cfg 0: one, unconditional call
        clip_model = self._check_clip_guidance(config)
        work = request_work(config, width=width, height=height, steps=self.steps, n=self.n, guided=guided,
                            encodes=self.task in IMAGE_TASKS, prompt_chunks=chunks,
                            clip_guided=self.clip_guidance > 0)
        limits.check_work(work, f"{self.n} image(s) of {width}x{height} at {self.steps} steps")
        hires_fields: dict[str, Any] = {}
        if hires.enabled(self):  # the final size through the same limits, before any work
            from .hires import upscaler_name

            hires_w, hires_h = hires.check(self, width, height, factor)
            try:
                limits.check_size(hires_w, hires_h, 1, config.sample_size)
            except LimitError as e:
                raise LimitError(f"the hires fix's final size: {e}") from None
            hires_steps = self.hires_steps or self.steps
            limits.check_count(self.n, hires_steps)
            limits.check_work(request_work(config, width=hires_w, height=hires_h, steps=hires_steps, n=self.n,
                                           guided=guided, encodes=True, prompt_chunks=chunks,
                                           clip_guided=self.clip_guidance > 0),
                              f"the hires fix: {self.n} image(s) of {hires_w}x{hires_h} at {hires_steps} steps")
            hires_fields["hires_upscaler"] = upscaler_name(self.hires_upscaler)
        seed = self.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED)
        if not (0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (or -1 for random), got {seed}")
        class_index = conditioner.class_index(self.class_label)
        resolved = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationRequest)}
        from ..lora.syntax import request_loras

        resolved["loras"] = request_loras(self.prompt, self.negative_prompt, self.loras)
        if semantic is not None:
            spatial["semantic_map"] = semantic.resized(width, height)  # nearest: labels are never blended
        resolved.update(width=width, height=height, seed=seed, limits=limits, clip_model=clip_model, **images,
                        **spatial, **hires_fields)
        sigmas = _run_sigmas(config, conditioner, choice, resolved)
        if repeated := self.repeated_steps(sigmas):  # counted on the run's sigmas
            limits.check_work(request_work(config, width=width, height=height, steps=self.steps + repeated,
                                           n=self.n, guided=guided, encodes=self.task in IMAGE_TASKS,
                                           prompt_chunks=chunks, clip_guided=True),
                              f"{self.n} image(s) of {width}x{height} at {self.steps} steps, "
                              f"{repeated} of them repeated (clip_repeats {self.clip_repeats})")
        _warn_few_low_steps(config, conditioner, choice, resolved, sigmas)
        if self.fast:
            resolved.update(fast_settings(self, sigmas, guided))
        valid = ValidRequest(**resolved, config=config, conditioner=conditioner, choice=choice,
                             class_index=class_index, sigmas=sigmas)
        if hires.enabled(self) and (repeated := self.repeated_steps(hires.second_pass_sigmas(valid))):
            limits.check_work(request_work(config, width=hires_w, height=hires_h, steps=hires_steps + repeated,
                                           n=self.n, guided=guided, encodes=True, prompt_chunks=chunks,
                                           clip_guided=True),
                              f"the hires fix: {self.n} image(s) of {hires_w}x{hires_h} at {hires_steps} steps, "
                              f"{repeated} of them repeated (clip_repeats {self.clip_repeats})")
        return valid

    def _check_clip_guidance(self, config: ModelConfig) -> str | None:
        """Check the CLIP guidance fields (scale and cutouts within `limits.MAX_CLIP_GUIDANCE` / `MAX_CUTOUTS`, a
        prompt to steer towards) and return the CLIP to open: the request's, else the one that guides the model
        by default (`registry.guide_for_model`); None when guidance is off. The file itself is opened (and found,
        or not) by the pipeline."""
        if not (0.0 <= self.clip_guidance <= MAX_CLIP_GUIDANCE):
            raise ValueError(f"CLIP guidance scale must be in [0, {MAX_CLIP_GUIDANCE:g}] (0 = off; "
                             f"{CLIP_GUIDANCE:g} recommended), got {self.clip_guidance}")
        if not (1 <= self.cutouts <= MAX_CUTOUTS):
            raise ValueError(f"cutouts must be a whole number in [1, {MAX_CUTOUTS}], got {self.cutouts}")
        if not (1 <= self.clip_repeats <= MAX_CLIP_REPEATS):
            raise ValueError(f"clip_repeats must be a whole number in [1, {MAX_CLIP_REPEATS}] (1 = off; "
                             f"{CLIP_REPEATS} recommended), got {self.clip_repeats}")
        if self.clip_guidance == 0:
            return self.clip_model
        from .prompts import plain_text

        if not plain_text(self.prompt):
            raise ValueError("CLIP guidance steers the image towards the prompt, which is empty: give a prompt")
        if self.clip_model is not None:
            if not self.clip_model.strip():
                raise ValueError("clip_model is empty: name a CLIP model (a shipped CLIP or a path), or leave it "
                                 "out for the model's own")
            return self.clip_model
        from ..registry import guide_for_model

        shipped = guide_for_model(config.name)
        if shipped is None:
            raise ValueError(f"model {config.name!r} ships no CLIP model to guide it: name one with --clip MODEL "
                             "(clip_model), a path or a shipped CLIP's name")
        return shipped

    def _validate_spatial(self, config: ModelConfig, conditioner: Conditioner, limits: Limits) -> dict[str, Any]:
        """Check and load the spatial conditions (docs/layout.md): {semantic_map: a LabelMap or None, layout: the
        objects of `layout` and `boxes` or None, boxes: None}. A model that does not read one refuses it, a
        semantic-synthesis model needs a map; a map's colours must be the palette's, a layout within the bounds
        of the model's layout encoder or adapter (`Conditioner.check_layout`)."""
        from ..data.layout import LabelMap, parse_box, parse_layout, read_label_map

        semantic = None
        if self.semantic_map is not None:
            if not conditioner.concat.takes_map:
                raise ValueError(f"model {config.name!r} does not draw from a semantic map (--semantic); "
                                 "semantic-synthesis models do (docs/layout.md)")
            if isinstance(self.semantic_map, LabelMap):
                semantic = self.semantic_map
                limits.check_input_image(semantic.width, semantic.height, "semantic map")
            else:
                from .images import load_image

                image = load_image(self.semantic_map, "RGB", limits)
                name = f"semantic map {_name(self.semantic_map)}"
                semantic = read_label_map(image, config.semantic_labels or [], name)
            if int(semantic.array().max()) >= len(config.semantic_labels or []):
                raise ValueError(f"the semantic map has label {int(semantic.array().max())}; model {config.name!r} "
                                 f"knows {len(config.semantic_labels or [])} labels")
        elif conditioner.concat.takes_map:
            raise ValueError(f"model {config.name!r} draws from a semantic map: give one (--semantic MAP.png, "
                             "docs/layout.md)")
        objects: list[LayoutObject] = []
        if self.layout is not None:
            value = self.layout
            if isinstance(value, (str, os.PathLike)):
                from ..untrusted import parse_json, regular_file

                path = regular_file(value, "layout file")
                with open(path, "rb") as f:
                    text = f.read(MAX_LAYOUT_FILE + 1)
                if len(text) > MAX_LAYOUT_FILE:
                    raise ValueError(f"layout file {path} is larger than {MAX_LAYOUT_FILE // 1024} KiB")
                value = parse_json(text, f"layout file {path}")
                source = f"layout file {path}"
            else:
                source = "layout"
            objects += parse_layout(value, source)
        if self.boxes is not None:
            if isinstance(self.boxes, str) or not isinstance(self.boxes, (list, tuple)):
                raise ValueError(f"boxes must be a list of \"phrase:x0,y0,x1,y1\" texts, got {self.boxes!r}")
            objects += [parse_box(b) for b in self.boxes]
        if objects:
            conditioner.check_layout(objects)  # a model that takes no layout refuses it by name
        if not (0.0 <= self.layout_steps <= 1.0):
            raise ValueError(f"layout steps must be a fraction in [0, 1] (1 = every step), got {self.layout_steps}")
        if self.layout_steps != 1.0 and not conditioner.schedules_layout:
            raise ValueError(f"layout steps {self.layout_steps:g}: model {config.name!r} has no GLIGEN adapter; "
                             "only GLIGEN models draw from a layout for part of the steps (docs/layout.md)")
        return {"semantic_map": semantic, "layout": tuple(objects) or None, "boxes": None}

    def _check_types(self) -> None:
        """The type of every field the table types (`setting(type=...)`), so that a string or a bool from
        JSON, a form or a script is named here and not met deep inside torch (True is not a step count,
        "7" is not a CFG scale). None passes where it is the field's default (filled in later)."""
        for f in dataclasses.fields(GenerationRequest):
            kind, value = f.metadata.get("type"), getattr(self, f.name)
            if kind is None or (value is None and f.default is None):
                continue
            if kind is str and not isinstance(value, str):
                raise ValueError(f"{f.name} must be text, got {value!r}")
            if kind is bool and value not in (True, False):
                raise ValueError(f"{f.name} must be true, false or left out (automatic), got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{f.name} must be a whole number, got {value!r}")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ValueError(f"{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):  # NaN or inf turn every pixel NaN: a black image
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")

    def _validate_images(self, config: ModelConfig, factor: int, limits: Limits) -> dict[str, Any]:
        """Check and load the image fields of an image task (each refused over `limits.max_input_pixels`
        before it is decoded): {init_image, mask, strength, size}."""
        from .images import center_crop, load_image, load_mask, snap_down

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
            from ..conditioning import conditioner_for

            conditioner_for(config).concat.check_noise_level(config, self.noise_level)
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


@dataclass(frozen=True, kw_only=True)
class ValidRequest(GenerationRequest):
    """A request `GenerationRequest.validate` checked against one model and resolved: the only request the
    pipelines take (`require_valid`), so none of them checks or resolves it again.

    Its fields are filled in: steps, sampler, schedule and cfg_scale (the request's, the model's or the
    global defaults), width and height, the seed of the first image (image i: seed + i, `seeds`), the
    strength of an image task; `init_image` and `mask` are loaded PIL images; `limits` the bounds it was
    checked against. Beside them: `config`, the model it was checked against; `choice`, the resolved
    sampler and schedule; `sigmas`, the float64 noise levels the sampler runs through (the img2img tail
    at the strength of an image task; `steps` + 1 values for txt2img); `class_index`, the class label's
    index for a class-conditional model; `conditioner`, how the model is conditioned (`daguerre.conditioning`).
    A changed request is validated again: `pipe.request(valid, steps=30)`."""

    config: ModelConfig = field(repr=False, compare=False)
    conditioner: Conditioner = field(repr=False, compare=False)
    choice: SamplerChoice = field(repr=False, compare=False)
    sigmas: torch.Tensor = field(repr=False, compare=False)
    class_index: int | None = None

    @property
    def seeds(self) -> range:
        """The seed of each image: seed, seed + 1, ..., seed + n - 1."""
        return range(self.seed, self.seed + self.n)

    @property
    def sampler_steps(self) -> int:
        """Sampler steps of one batch: `steps`, fewer for img2img at strength < 1, none at strength 0."""
        return len(self.sigmas) - 1


def require_valid(components: Components, request: Any, task: str) -> ValidRequest:
    """The pipelines' entry check: `request` is a `ValidRequest` for `task`, validated against this model."""
    if not isinstance(request, ValidRequest):
        raise TypeError(f"{task} takes a ValidRequest, got {type(request).__name__}: validate it first, "
                        f"request.validate(components.config)")
    if request.task != task:
        raise ValueError(f"a {request.task} request given to the {task} pipeline: make it with task={task!r}")
    if request.config != components.config:
        raise ValueError(f"the request was validated for model {request.config.name!r}, not for "
                         f"{components.config.name!r}: validate it against the model that runs it")
    return request


def fast_settings(request: GenerationRequest, sigmas: torch.Tensor, guided: bool) -> dict[str, Any]:
    """The settings `fast` fills in for a run through `sigmas` (the FAST_ constants; the cutoff only for a
    `guided` run), each only where the request leaves it at its default (off)."""
    defaults = GenerationRequest()
    found: dict[str, Any] = {}
    if request.deepcache_interval == defaults.deepcache_interval:
        found["deepcache_interval"] = FAST_DEEPCACHE[0]
    if request.deepcache_depth == defaults.deepcache_depth:
        found["deepcache_depth"] = FAST_DEEPCACHE[1]
    if request.deepcache_max_sigma == defaults.deepcache_max_sigma:
        found["deepcache_max_sigma"] = cutoff_between(sigmas, FAST_DEEPCACHE_FRACTION)
    if request.tome_ratio == defaults.tome_ratio:
        found["tome_ratio"] = FAST_TOME
    if guided and request.cfg_cutoff_sigma == defaults.cfg_cutoff_sigma:
        found["cfg_cutoff_sigma"] = cutoff_between(sigmas, FAST_CUTOFF_FRACTION)
    return found


def cutoff_between(sigmas: torch.Tensor, fraction: float) -> float:
    """A sigma (of the CFG cutoff, of DeepCache's window) below which the last `fraction` of the steps through
    `sigmas` (descending, ending in 0) fall: the geometric mean of the sigma of the last step above and of the
    first below, rounded to 4 digits where that keeps it strictly between them (the PNG parameters write it
    exactly). 0 (off) if no step falls below."""
    steps = len(sigmas) - 1
    cut = round(fraction * steps)
    if cut < 1 or steps < 2:
        return 0.0
    k = max(1, steps - cut)  # the first step run without guidance; step 0 is always guided
    above, below = float(sigmas[k - 1]), float(sigmas[k])
    middle = math.sqrt(above * below)
    short = float(f"{middle:.4g}")
    return short if below < short < above else middle


def _run_sigmas(config: ModelConfig, conditioner: Conditioner, choice: SamplerChoice,
                fields: dict[str, Any]) -> torch.Tensor:
    """The noise levels the sampler runs through: the sampler's schedule on the model's discrete sigmas, cut
    to the img2img tail at the strength an image task starts from (none for txt2img, nor for upscaling with
    a super-resolution model, which starts from pure noise)."""
    from ..diffusion.schedules import img2img_sigmas, model_sigmas

    sigmas = choice.sigmas(fields["steps"], model_sigmas(config.schedule))
    if conditioner.concat.starts_from_noise(fields["task"]):
        return sigmas
    return img2img_sigmas(sigmas, fields["strength"])


def low_steps(sigmas: torch.Tensor) -> int:
    """The steps of a run through `sigmas` (descending, ending in 0) that start below LOW_SIGMA."""
    return int((sigmas[:-1] < LOW_SIGMA).sum())


def _fewest_enough_steps(config: ModelConfig, conditioner: Conditioner, choice: SamplerChoice,
                         fields: dict[str, Any]) -> int | None:
    """The fewest steps above `fields["steps"]` (up to the model's num_train_timesteps - 1) whose run takes
    MIN_LOW_STEPS steps below LOW_SIGMA, or None if none does. That count never falls as the steps grow (each
    schedule spreads more points over the same sigmas), so it gallops up from the request's steps and bisects
    the last gap: some twenty schedules at most, not one per step count."""
    last = config.schedule.num_train_timesteps - 1  # DPM2's schedules take one step more

    def enough(n: int) -> bool:
        return low_steps(_run_sigmas(config, conditioner, choice, {**fields, "steps": n})) >= MIN_LOW_STEPS

    few, gap = fields["steps"], 1  # `few`: a step count known to be too few
    if few >= last:
        return None
    while not enough(n := min(few + gap, last)):
        if n == last:
            return None
        few, gap = n, 2 * gap
    while n - few > 1:  # `few` too few, `n` enough
        mid = (few + n) // 2
        few, n = (few, mid) if enough(mid) else (mid, n)
    return n


def _warn_few_low_steps(config: ModelConfig, conditioner: Conditioner, choice: SamplerChoice,
                        fields: dict[str, Any], sigmas: torch.Tensor) -> None:
    """Warn (warnings.warn: the CLI prints it as one line) when a run through `sigmas` that starts above LOW_SIGMA
    on a zero-terminal-SNR model takes fewer than MIN_LOW_STEPS steps below it, and say what gives enough: the
    model's recommended schedule if it does at these steps, and the fewest steps that do on this schedule."""
    if not config.schedule.zero_terminal_snr or float(sigmas[0]) < LOW_SIGMA:
        return  # an img2img tail that starts below LOW_SIGMA is short by its strength, not by the schedule
    found = low_steps(sigmas)
    if found >= MIN_LOW_STEPS:
        return
    from ..diffusion.sampler_names import AUTOMATIC, SCHEDULES, resolve_sampler
    from ..diffusion.schedules import model_sigmas

    label = choice.a1111_schedule
    if label == AUTOMATIC:  # a sampler that ignores the schedule type (DDIM, PLMS, UniPC): name what it runs
        label = next(s.label for s in SCHEDULES if (s.kind, s.spacing) == (choice.schedule, choice.spacing))
    advice = []
    recommended = config.defaults.get("schedule")
    if recommended is not None and recommended != fields["schedule"]:
        other = resolve_sampler(choice.a1111_name, recommended)
        if low_steps(_run_sigmas(config, conditioner, other, fields)) >= MIN_LOW_STEPS:
            advice.append(f"the model's recommended schedule {recommended}")
    enough = _fewest_enough_steps(config, conditioner, choice, fields)
    if enough is not None:
        advice.append(f"{enough} steps or more")
    warnings.warn(f"{choice.a1111_name} on the {label} schedule at {fields['steps']} steps takes {found} step(s) "
                  f"below sigma {LOW_SIGMA:g} on this zero-terminal-SNR model (sigma_max "
                  f"{float(model_sigmas(config.schedule)[-1]):.0f}), too few for a clean image: use "
                  f"{' or '.join(advice) or 'another schedule or more steps'} (docs/samplers.md)", stacklevel=4)


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
              and not all(p.is_meta or bool(torch.isfinite(p).all()) for p in module.parameters())]  # meta: released
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


def _prompt_chunks(takes_prompt: bool, prompt: str, negative: str) -> int:
    """Check the prompts' bracket syntax (pipelines.prompts) for a model that reads prompts, and return an
    upper bound of the 77-token chunks the longer one makes (1 for other models)."""
    if not takes_prompt:
        return 1
    from .prompts import chunk_bound, parse_emphasis

    parse_emphasis(prompt)
    parse_emphasis(negative)
    return max(chunk_bound(prompt), chunk_bound(negative))


def _name(source: Any) -> str:
    """How to name an image source in an error message."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "(in-memory image)"


def _check_task(config: ModelConfig, task: str) -> None:
    """The task must exist (whether it fits the model is its conditioner's `concat.check_task`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
