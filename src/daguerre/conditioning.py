"""How a model is conditioned: one object chosen once from its `ModelConfig` (`conditioner_for`), used by
training and by the pipelines alike (issue 14).

A `Conditioner` owns the condition c of the denoiser D(x, sigma, c) (LDM, Rombach et al. 2022, Sec. 3.3):
`TextConditioner` (cross-attention context tau_theta(y) of a jointly trained CLIP-style encoder or of the
frozen MiniLM, whose contexts training caches), `ClassConditioner` (a label y, the last class being the
null label of classifier-free guidance, Ho & Salimans 2022), `LayoutConditioner` (the prompt's context followed
by the tokens of a layout of boxes, LDM Sec. 4.3.1), `GligenConditioner` (the prompt's context, and a layout's
boxes and phrases as the grounding tokens of a GLIGEN adapter, Li et al. 2023) and `Unconditional`. It gives the
training batch's condition (`batch`: dropped captions become the empty prompt, dropped labels the null class),
the request's (cond, uncond) pair (`pair`) and the null condition (`null`). The image concatenated to the
U-Net's latent input (LDM's "concatenation" conditioning) is a part it holds, `concat`: `NoConcat`,
`InpaintConcat` (SD inpainting: latent mask + latent of the masked image), `LowresConcat` (LDM
super-resolution, SD x4: the low-resolution pixels on the latent grid, noise-augmented, Ho et al. 2022) or
`SemanticConcat` (LDM semantic synthesis, Sec. 4.3.2: a semantic map, one channel per label, on the latent grid).
A new kind of condition is a new class here. The valid names are `daguerre.config`'s `Literal`s; text
encoding (prompt emphasis, tiled VAE encoding) is passed in as functions, as it lives above this layer.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from .config import ConcatKind, Conditioning, GligenConfig, LayoutConfig, ModelConfig, ScheduleConfig
from .data.layout import LayoutObject, check_layout, encode_layout, label_fractions, null_layout
from .diffusion.denoisers import batch_sigma
from .diffusion.schedules import alphas_cumprod, betas_from_config
from .models.gligen import grounding_tensor, null_grounding

if TYPE_CHECKING:
    from .config import TextEncoderConfig

Cond = dict[str, Any]
EncodePrompts = Callable[[list[str]], torch.Tensor]  # prompts -> context (B, T, d)
EncodeImages = Callable[[torch.Tensor], torch.Tensor]  # pixels (B, C, H, W) in [-1, 1] -> latents (B, c, h, w)
TextHook = Callable[[list[str], torch.device], Cond]  # training: captions -> {"context"} or {"ids"}
EncodePhrases = Callable[[list[str]], torch.Tensor]  # GLIGEN: phrases -> pooled text embeddings (N, d)
Denoise = Callable[..., torch.Tensor]  # denoiser(x, sigma, cond) -> x0

# The x4 upscaler's low-res augmentation schedule (CompVis x4-upscaling.yaml `low_scale_config`:
# linear_start 1e-4, linear_end 0.02 in CompVis' "linear", i.e. linspace of sqrt(beta), squared).
LOWRES_NOISE_SCHEDULE = ScheduleConfig(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)


# --- the image concatenated to the latent input ------------------------------------------------------

def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] -> latent resolution (B, 1, H/f, W/f) by max pooling.

    Max (not area) pooling: every latent cell that any repainted pixel touches is regenerated, so the
    decoded image is generated content wherever the pixel mask (and the paste-back) shows it. Area
    pooling would leave boundary cells partly pinned to the original latents, and the paste-back
    would then reveal a halo of half-repainted pixels at the mask's edge.
    """
    return F.max_pool2d(mask.float(), kernel_size=factor, stride=factor)


class NoConcat:
    """No image concatenated: the U-Net takes the noisy latent alone. The base of the concatenation kinds:
    each method is what a model without that input does."""

    kind: ClassVar[ConcatKind | None] = None
    takes_map: ClassVar[bool] = False  # a request gives a semantic map (`SemanticConcat`)

    def check_task(self, config: ModelConfig, task: str) -> None:
        """Raise ValueError if `task` does not fit the model (or its input channels do not fit the kind)."""

    def request_input(self, config: ModelConfig, request: Any) -> Cond:
        """The extra input a validated text-to-image request gives itself (a semantic map), batch 1."""
        return {}

    def starts_from_noise(self, task: str) -> bool:
        """Whether `task` samples from pure noise over the whole schedule (else from the strength's tail)."""
        return task == "txt2img"

    def check_noise_level(self, config: ModelConfig, level: int) -> None:
        """Raise ValueError if the low-res augmentation `level` is out of the model's range."""

    def unmasked_input(self, config: ModelConfig, height: int, width: int, device: torch.device,
                       encode: EncodeImages) -> Cond:
        """The extra input when a request gives no mask (txt2img, img2img)."""
        return {}

    def mask_input(self, config: ModelConfig, pixels: torch.Tensor, mask: torch.Tensor, encode: EncodeImages) -> Cond:
        """The extra input of an inpainting request with `pixels` (B, C, H, W) and `mask` (B, 1, H, W)."""
        return {}


class InpaintConcat(NoConcat):
    """SD inpainting (9 channels for 4 latent channels): cat(latent mask, latent of the masked image)."""

    kind = "inpaint"

    def check_task(self, config: ModelConfig, task: str) -> None:
        lat = config.vae.latent_channels
        if config.unet.in_channels != 2 * lat + 1:
            raise ValueError(f"inpainting model {config.name!r} has {config.unet.in_channels} input channels; "
                             f"expected {2 * lat + 1} (latent {lat} + mask 1 + masked-image latent {lat})")

    @staticmethod
    def build(pixels: torch.Tensor, mask: torch.Tensor, encode: EncodeImages, factor: int) -> torch.Tensor:
        """cat(latent mask (1 ch), latent of the masked image (c ch)) -> (B, 1 + c, h, w).

        SD's convention: the mask is binarised (>= 0.5), the masked image is image * (mask < 0.5) (the
        repainted area set to 0, mid-gray in [-1, 1]) and encoded by the VAE (`encode`, latents at the
        pixels' device); the U-Net input is [noisy latent, mask, masked-image latent], and the Denoiser
        appends cond["concat"] after x. Training and `daguerre inpaint` both build it here.
        """
        binary = (mask >= 0.5).to(pixels.dtype)  # (B, 1, H, W)
        masked = pixels * (1 - binary)  # (B, C, H, W)
        masked_latent = encode(masked)  # (B, c, h, w)
        return torch.cat([latent_mask(binary, factor).to(masked_latent), masked_latent], dim=1)

    def unmasked_input(self, config: ModelConfig, height: int, width: int, device: torch.device,
                       encode: EncodeImages) -> Cond:
        """Everything masked and the masked image all gray, as A1111 does (its `inpainting_mask_weight` 1)."""
        pixels = torch.zeros(1, config.vae.in_channels, height, width, device=device)
        everything = torch.ones(1, 1, height, width, device=device)
        return self.mask_input(config, pixels, everything, encode)

    def mask_input(self, config: ModelConfig, pixels: torch.Tensor, mask: torch.Tensor, encode: EncodeImages) -> Cond:
        return {"concat": self.build(pixels, mask, encode, config.vae.downsample_factor)}


class LowresConcat(NoConcat):
    """LDM super-resolution / SD x4 upscaler: the low-resolution RGB pixels in [-1, 1], bicubic to the
    latent grid; with `unet.num_classes` set, noise-augmented to a level the U-Net is told as its label."""

    kind = "lowres"

    def check_task(self, config: ModelConfig, task: str) -> None:
        lat = config.vae.latent_channels
        if task != "upscale":
            raise ValueError(f"model {config.name!r} is a super-resolution model (it takes a low-resolution image): "
                             f"use `daguerre upscale`, not {task}")
        if config.unet.in_channels != lat + config.vae.in_channels:
            raise ValueError(f"super-resolution model {config.name!r} has {config.unet.in_channels} input channels; "
                             f"expected {lat} latent + {config.vae.in_channels} image channels")
        if config.conditioning == "class":
            raise ValueError(f"model {config.name!r}: class-conditional super-resolution models are not supported")

    def starts_from_noise(self, task: str) -> bool:
        return task in ("txt2img", "upscale")

    def check_noise_level(self, config: ModelConfig, level: int) -> None:
        if config.unet.num_classes is None:
            return
        top = min(config.unet.num_classes, LOWRES_NOISE_SCHEDULE.num_train_timesteps) - 1
        if not (isinstance(level, int) and 0 <= level <= top):
            raise ValueError(f"noise level must be a whole number in [0, {top}], got {level!r}")

    @staticmethod
    def build(config: ModelConfig, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The low-res pixels (B, C, h0, w0) in [-1, 1], bicubic to the latent grid of a height x width
        output -> (B, C, height/f, width/f). `upscale` and the trainer both build this input here."""
        f = config.vae.downsample_factor
        size = (height // f, width // f)
        if tuple(image.shape[-2:]) == size:
            return image
        down = size[0] < image.shape[-2] or size[1] < image.shape[-1]
        return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=down).clamp(-1, 1)

    @staticmethod
    def noise_scales(level: int) -> tuple[float, float] | None:
        """(a, s) of noise-conditioning augmentation at `level` on `LOWRES_NOISE_SCHEDULE`: the input becomes
        a * concat + s * eps, a = sqrt(abar_level), s = sqrt(1 - abar_level); None at level 0 (used as it is)."""
        if level <= 0:
            return None
        abar = float(alphas_cumprod(betas_from_config(LOWRES_NOISE_SCHEDULE))[level])
        return abar**0.5, (1 - abar) ** 0.5


class SemanticConcat(NoConcat):
    """LDM semantic synthesis (Sec. 4.3.2): a semantic map, one label per pixel, as K channels on the latent grid,
    each the fraction of a cell's pixels that carry its label (`data.layout.label_fractions`). Convolutional, so a
    model trained at one size generates from larger maps. The label names are `config.semantic_labels`."""

    kind = "semantic"
    takes_map = True

    def check_task(self, config: ModelConfig, task: str) -> None:
        labels, lat = config.semantic_labels or [], config.vae.latent_channels
        if task != "txt2img":
            raise ValueError(f"model {config.name!r} draws from a semantic map: use `daguerre generate --semantic "
                             f"MAP.png`, not {task}")
        if not labels or config.unet.in_channels != lat + len(labels):
            raise ValueError(f"semantic-synthesis model {config.name!r} has {config.unet.in_channels} input channels "
                             f"and {len(labels)} labels; expected {lat} latent channels + one per label")

    @staticmethod
    def build(labels: torch.Tensor, count: int, factor: int) -> torch.Tensor:
        """(B, H, W) labels -> (B, count, H/f, W/f) label fractions: what training and `generate` both feed."""
        return label_fractions(labels, count, factor)

    def request_input(self, config: ModelConfig, request: Any) -> Cond:
        labels = torch.from_numpy(request.semantic_map.array().copy())[None]  # (1, H, W)
        return {"concat": self.build(labels, len(config.semantic_labels), config.vae.downsample_factor)}

    def unmasked_input(self, config: ModelConfig, height: int, width: int, device: torch.device,
                       encode: EncodeImages) -> Cond:
        raise ValueError(f"model {config.name!r} draws from a semantic map: give one (--semantic MAP.png)")


CONCATS: dict[ConcatKind | None, type[NoConcat]] = {
    c.kind: c for c in (NoConcat, InpaintConcat, LowresConcat, SemanticConcat)}


# --- the condition of the denoiser -------------------------------------------------------------------

class Conditioner:
    """The condition of a model: none (`Unconditional`) unless a subclass says otherwise. `concat` is the
    image concatenated to the latent input; `text_encoder` the config of the encoder that reads prompts."""

    kind: ClassVar[Conditioning]
    takes_prompt: ClassVar[bool] = False  # the request's prompts reach the model (and are parsed)
    takes_layout: ClassVar[bool] = False  # a request gives a layout of boxes (`LayoutConditioner`)
    schedules_layout: ClassVar[bool] = False  # the layout may be given to the first steps only (GLIGEN)

    def __init__(self, config: ModelConfig, concat: NoConcat) -> None:
        self.config, self.concat = config, concat
        self.text_encoder: TextEncoderConfig | None = None

    def guided(self, cfg_scale: float) -> bool:
        """Whether classifier-free guidance runs (a second, unconditional branch) at `cfg_scale`."""
        return cfg_scale != 1.0

    def check_clip_skip(self, clip_skip: int) -> None:
        """Raise ValueError if the encoder cannot skip `clip_skip` - 1 of its last layers."""

    def class_index(self, label: int | str | None) -> int | None:
        """The class index a request's label names; a label is an error for a model without classes."""
        if label is not None:
            raise ValueError(f"class label {label!r} given, but model {self.config.name!r} is not class-conditional")
        return None

    def null(self, device: torch.device, encode: EncodePrompts | None = None) -> Cond:
        """The null condition of batch 1 (the unconditional branch of classifier-free guidance)."""
        return {}

    def pair(self, request: Any, device: torch.device, encode: EncodePrompts | None = None,
             phrases: EncodePhrases | None = None) -> tuple[Cond, Cond | None]:
        """(cond, uncond) of batch 1 for a request (`prompt`, `negative_prompt`, `cfg_scale`, `class_index`);
        uncond is None when guidance is off. `encode` turns prompts into a context (the pipelines' prompt
        syntax), `phrases` a layout's phrases into pooled embeddings (GLIGEN)."""
        return {}, None

    def check_layout(self, objects: Sequence[LayoutObject]) -> None:
        """Raise ValueError if the model cannot draw this layout (or any: it takes none)."""
        raise ValueError(f"model {self.config.name!r} does not draw from a layout (--layout, --box); layout models do "
                         "(docs/layout.md)")

    def scheduled(self, denoiser: Denoise, request: Any) -> Denoise:
        """The denoiser a request samples with (GLIGEN: the layout for the first part of the steps only)."""
        return denoiser

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, data: Any, device: torch.device,
              text: TextHook | None = None, text_dropped: torch.Tensor | None = None) -> Cond:
        """The training condition of the items `rows` of `data` (its `captions` / `labels` / `layouts`), with the
        samples where `dropped` is True given the null condition (classifier-free guidance training); a layout
        model also drops the prompt alone where `text_dropped` is True."""
        return {}

    def guidance_scale(self, scale: float) -> float:
        """The cfg scale a training sample grid uses for a configured `scale`."""
        return scale

    def sample_cells(self, prompts: Sequence[str], labels: Sequence[int], n_unconditional: int) -> list[Cond]:
        """The request fields (prompt, class_label) of each cell of a training sample grid."""
        return [{"prompt": "", "class_label": None}] * n_unconditional

    def preview_count(self, prompts: Sequence[str], n_unconditional: int) -> int:
        """How many training images a concatenation model's sample grid shows."""
        return n_unconditional

    def item_request(self, caption: str, label: int | None) -> Cond:
        """The request fields that condition a sample on a training item's own caption or label."""
        return {"prompt": "", "class_label": None}


class Unconditional(Conditioner):
    """p(x): no condition, so no guidance either."""

    kind = "none"

    def guided(self, cfg_scale: float) -> bool:
        return False

    def guidance_scale(self, scale: float) -> float:
        return 1.0


class TextConditioner(Conditioner):
    """Cross-attention on tau_theta(y), the text encoder's hidden states: daguerre's CLIP-style encoder
    (trained jointly, its weights in the checkpoint) or the frozen pretrained MiniLM (`text_encoder.frozen`),
    whose contexts training reads from a cache. The null condition is the empty prompt."""

    kind = "text"
    takes_prompt = True

    def __init__(self, config: ModelConfig, concat: NoConcat) -> None:
        super().__init__(config, concat)
        self.text_encoder = config.text_encoder

    def check_clip_skip(self, clip_skip: int) -> None:
        te = self.text_encoder
        if te is not None and clip_skip > te.layers - te.skip_layers:
            raise ValueError(f"clip skip {clip_skip} is more than the {te.layers - te.skip_layers} layers this "
                             f"model's text encoder can skip to; use 1..{te.layers - te.skip_layers}")

    def null(self, device: torch.device, encode: EncodePrompts | None = None) -> Cond:
        return {"context": _need(encode, self.config)([""])}

    def pair(self, request: Any, device: torch.device, encode: EncodePrompts | None = None,
             phrases: EncodePhrases | None = None) -> tuple[Cond, Cond | None]:
        guided = self.guided(request.cfg_scale)
        prompts = [request.prompt, request.negative_prompt] if guided else [request.prompt]
        context = _need(encode, self.config)(prompts)  # one call; rows padded to equal length
        return {"context": context[:1]}, ({"context": context[1:]} if guided else None)

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, data: Any, device: torch.device,
              text: TextHook | None = None, text_dropped: torch.Tensor | None = None) -> Cond:
        caps = ["" if d else data.captions[i] for i, d in zip(rows.tolist(), dropped.tolist(), strict=True)]
        if text is None:
            raise ValueError(f"model {self.config.name!r} is text-conditional: training needs its text encoder")
        return text(caps, device)

    def sample_cells(self, prompts: Sequence[str], labels: Sequence[int], n_unconditional: int) -> list[Cond]:
        return [{"prompt": p, "class_label": None} for p in prompts]

    def preview_count(self, prompts: Sequence[str], n_unconditional: int) -> int:
        return len(prompts)

    def item_request(self, caption: str, label: int | None) -> Cond:
        return {"prompt": str(caption), "class_label": None}


class ClassConditioner(Conditioner):
    """A class label y through the U-Net's label embedding; the last class (K - 1) is the null label."""

    kind = "class"

    @property
    def null_label(self) -> int:
        return (self.config.unet.num_classes or 1) - 1

    def class_index(self, label: int | str | None) -> int | None:
        names = self.config.class_names or []
        count = self.config.unet.num_classes or len(names)
        if label is None:
            raise ValueError(f"model {self.config.name!r} is class-conditional: give a class label "
                             f"(0..{count - 1} or a name)")
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            lowered = [n.lower() for n in names]
            if label.lower() not in lowered:
                raise ValueError(f"unknown class {label!r}; classes: {', '.join(names)}")
            return lowered.index(label.lower())
        index = int(label)
        if not (0 <= index < count):
            raise ValueError(f"class label {index} out of range 0..{count - 1}")
        return index

    def null(self, device: torch.device, encode: EncodePrompts | None = None) -> Cond:
        return {"y": torch.tensor([self.null_label], device=device)}

    def pair(self, request: Any, device: torch.device, encode: EncodePrompts | None = None,
             phrases: EncodePhrases | None = None) -> tuple[Cond, Cond | None]:
        y = torch.tensor([request.class_index], device=device)
        return {"y": y}, (self.null(device) if self.guided(request.cfg_scale) else None)

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, data: Any, device: torch.device,
              text: TextHook | None = None, text_dropped: torch.Tensor | None = None) -> Cond:
        y = data.labels[rows].clone()
        y[dropped] = self.null_label
        return {"y": y.to(device)}

    def sample_cells(self, prompts: Sequence[str], labels: Sequence[int], n_unconditional: int) -> list[Cond]:
        chosen = labels or list(range(len(self.config.class_names or [])))
        return [{"prompt": "", "class_label": int(label)} for label in chosen]

    def item_request(self, caption: str, label: int | None) -> Cond:
        return {"prompt": "", "class_label": int(label)}


class LayoutConditioner(TextConditioner):
    """Layout-to-image (LDM Sec. 4.3.1): the prompt's context followed by the tokens of a layout of boxes, each
    object its phrase's words and its box's corners, encoded by the U-Net's `layout_net` (models/layout.py). The
    null condition is the empty prompt and the empty layout; training drops both (`dropped`) or the prompt alone
    (`text_dropped`), so the model draws from the boxes with or without a prompt."""

    kind = "layout"
    takes_layout = True

    @property
    def layout(self) -> LayoutConfig:
        if self.config.unet.layout is None:
            raise ValueError(f"layout model {self.config.name!r} has no layout encoder (unet.layout)")
        return self.config.unet.layout

    def null(self, device: torch.device, encode: EncodePrompts | None = None) -> Cond:
        return {**super().null(device, encode), "layout": null_layout(self.layout)[None].to(device)}

    def pair(self, request: Any, device: torch.device, encode: EncodePrompts | None = None,
             phrases: EncodePhrases | None = None) -> tuple[Cond, Cond | None]:
        cond, uncond = super().pair(request, device, encode)
        cond["layout"] = encode_layout(request.layout or (), self.layout)[None].to(device)  # (1, objects, tokens)
        if uncond is not None:
            uncond["layout"] = null_layout(self.layout)[None].to(device)
        return cond, uncond

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, data: Any, device: torch.device,
              text: TextHook | None = None, text_dropped: torch.Tensor | None = None) -> Cond:
        either = dropped if text_dropped is None else dropped | text_dropped
        out = super().batch(rows, either, data, device, text)
        layouts = data.layouts[rows].clone()  # (B, objects, tokens)
        layouts[dropped] = null_layout(self.layout)
        return {**out, "layout": layouts.to(device)}

    def check_layout(self, objects: Sequence[LayoutObject]) -> None:
        check_layout(objects, self.layout)


class GligenConditioner(TextConditioner):
    """A GLIGEN adapter on a text model (Li et al., CVPR 2023; models/gligen.py): the prompt's context, and each
    object of a layout one grounding token (its box's Fourier features and its phrase's pooled embedding) read by
    the U-Net's gated self-attention layers. Without a layout the adapter does not run (the model is its base);
    the unconditional branch of guidance has the null grounding tokens, as GLIGEN's has, and training gives them
    to the rows that drop both prompt and layout. `scheduled` gives the layout to the first `layout_steps` of the
    steps only (GLIGEN's scheduled sampling); the rest run the base model."""

    kind = "gligen"
    takes_layout = True
    schedules_layout = True

    @property
    def gligen(self) -> GligenConfig:
        if self.config.unet.gligen is None:
            raise ValueError(f"GLIGEN model {self.config.name!r} has no adapter (unet.gligen)")
        return self.config.unet.gligen

    def check_layout(self, objects: Sequence[LayoutObject]) -> None:
        if len(objects) > self.gligen.max_objects:
            raise ValueError(f"the layout has {len(objects)} objects; model {self.config.name!r} takes at most "
                             f"{self.gligen.max_objects}")

    def pair(self, request: Any, device: torch.device, encode: EncodePrompts | None = None,
             phrases: EncodePhrases | None = None) -> tuple[Cond, Cond | None]:
        cond, uncond = super().pair(request, device, encode)
        objects = request.layout or ()
        if not objects:  # no boxes: the base model, exactly
            return cond, uncond
        if phrases is None:
            raise ValueError(f"GLIGEN model {self.config.name!r}: its phrases need the text encoder")
        embedded = phrases([o.phrase for o in objects])  # (N, phrase_dim)
        cond["layout"] = grounding_tensor([o.box for o in objects], embedded, self.gligen.max_objects)[None].to(device)
        if uncond is not None:
            uncond["layout"] = null_grounding(self.gligen)[None].to(device)
        return cond, uncond

    def batch(self, rows: torch.Tensor, dropped: torch.Tensor, data: Any, device: torch.device,
              text: TextHook | None = None, text_dropped: torch.Tensor | None = None) -> Cond:
        either = dropped if text_dropped is None else dropped | text_dropped
        out = super().batch(rows, either, data, device, text)
        layouts = data.layouts[rows].clone()  # (B, objects, 5 + phrase_dim)
        layouts[dropped] = null_grounding(self.gligen)
        return {**out, "layout": layouts.to(device)}

    def scheduled(self, denoiser: Denoise, request: Any) -> Denoise:
        """GLIGEN's scheduled sampling: the layout for the first ceil(`layout_steps` x steps) steps, then none
        (the base model, for the detail); `layout_steps` 1 keeps it throughout."""
        steps = len(request.sigmas) - 1
        if not request.layout or request.layout_steps >= 1 or steps < 1:
            return denoiser
        grounded = math.ceil(request.layout_steps * steps - 1e-9)  # steps 0 .. grounded - 1 see the layout
        return GroundedSteps(denoiser, float(request.sigmas[grounded]))


class GroundedSteps:
    """A denoiser that passes the condition's "layout" on only at noise levels above `cut` (every sigma of the
    call); at or below it the model runs without (GLIGEN's scheduled sampling, Li et al. 2023, Sec. 3.3)."""

    def __init__(self, denoiser: Denoise, cut: float) -> None:
        self.denoiser, self.cut = denoiser, cut
        self.prediction_type = getattr(denoiser, "prediction_type", "epsilon")  # what guidance rescale reads

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        if cond and "layout" in cond and bool((batch_sigma(sigma, x) <= self.cut).all()):
            cond = {k: v for k, v in cond.items() if k != "layout"}
        return self.denoiser(x, sigma, cond)


CONDITIONERS: dict[Conditioning, type[Conditioner]] = {
    c.kind: c for c in (TextConditioner, ClassConditioner, Unconditional, LayoutConditioner, GligenConditioner)}


def conditioner_for(config: ModelConfig) -> Conditioner:
    """The conditioner of `config` (its `conditioning` and `concat`); ValueError naming an unknown kind."""
    cls = CONDITIONERS.get(config.conditioning)
    if cls is None:
        raise ValueError(f"model {config.name!r} has an unknown conditioning {config.conditioning!r}; daguerre "
                         f"knows {', '.join(typing.get_args(Conditioning))}")
    concat = CONCATS.get(config.concat)
    if concat is None:
        raise ValueError(f"model {config.name!r} has an unknown concat kind {config.concat!r}; daguerre knows "
                         f"{', '.join(typing.get_args(ConcatKind))} (or none)")
    return cls(config, concat())


def _need(encode: EncodePrompts | None, config: ModelConfig) -> EncodePrompts:
    if encode is None:
        raise ValueError(f"model {config.name!r} is text-conditional: its prompts need the text encoder")
    return encode
