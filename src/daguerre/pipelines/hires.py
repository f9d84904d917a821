"""AUTOMATIC1111's hires fix (`enable_hr`): text-to-image at the base size, the result upscaled, then
image-to-image at the larger size.

The first pass is the plain txt2img image of the request (same seed, same steps, same size). Its final
latents are resized by interpolation (A1111's "Latent" upscalers: bilinear, nearest, bicubic, ...), or its
decoded pixels resized (Lanczos, Nearest) and encoded again; then the img2img tail of the schedule at
`hires_strength` (A1111's denoising_strength) runs `hires_steps` steps (0: the request's steps), image i
with its own seed + i. The final size is `hires_scale` x the base size, or `hires_width` x `hires_height`
(one of them 0: from the other and the base aspect), snapped down to the model's grid. The PNG parameters
are A1111's: the base Size, then "Denoising strength, Hires upscale (or Hires resize), Hires steps, Hires
upscaler", read back by `--from-png`. This module is the request side (fields, sizes, checks, PNG keys), read
by `request` and `common`; the run itself is `hires_run.hires_fix`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .fields import Flag, Payload, Png, parse_size

if TYPE_CHECKING:
    from .request import ValidRequest

# A1111 upscaler name -> (space, mode): latent interpolation (torch) or a pixel resize (PIL)
UPSCALERS: dict[str, tuple[str, str]] = {
    "Latent": ("latent", "bilinear"),
    "Latent (antialiased)": ("latent", "bilinear-antialias"),
    "Latent (bicubic)": ("latent", "bicubic"),
    "Latent (bicubic antialiased)": ("latent", "bicubic-antialias"),
    "Latent (nearest)": ("latent", "nearest"),
    "Latent (nearest-exact)": ("latent", "nearest-exact"),
    "Lanczos": ("pixel", "lanczos"),
    "Nearest": ("pixel", "nearest"),
}
MAX_HIRES_SCALE = 8.0
DEFAULT_STRENGTH = 0.7  # A1111's hires denoising strength in its UI


def flag_name(name: str) -> str:
    """"Latent (bicubic)" -> "latent-bicubic": the command line's spelling of an upscaler."""
    return name.lower().replace(" (", "-").replace(")", "").replace(" ", "-")


def upscaler_name(text: str) -> str:
    """The A1111 name of an upscaler given by its A1111 name or its flag spelling, any case; a ValueError
    listing the choices otherwise."""
    for name in UPSCALERS:
        if text.strip().lower() in (name.lower(), flag_name(name)):
            return name
    raise ValueError(f"unknown hires upscaler {text!r}; choose one of {', '.join(UPSCALERS)}")


def enabled(req: Any) -> bool:
    """Whether the request asks for the hires fix."""
    return bool(req.hires_scale) or bool(req.hires_width) or bool(req.hires_height)


def hires_size(width: int, height: int, scale: float, hires_width: int, hires_height: int,
               factor: int) -> tuple[int, int]:
    """The second pass's size from the base size: `scale` x, or the given width and/or height (the other from the
    base aspect), snapped down to the model's grid of `factor` pixels (at least one cell)."""
    if hires_width or hires_height:
        w = hires_width or round(hires_height * width / height)
        h = hires_height or round(hires_width * height / width)
    else:
        w, h = round(width * scale), round(height * scale)
    return max(factor, w // factor * factor), max(factor, h // factor * factor)


def check(req: Any, width: int, height: int, factor: int) -> tuple[int, int]:
    """Check the hires fields of a txt2img request of base size width x height; return the final size."""
    if req.task != "txt2img":
        raise ValueError(f"the hires fix is for txt2img only, not {req.task}")
    if req.hires_scale and not (1.0 <= req.hires_scale <= MAX_HIRES_SCALE):
        raise ValueError(f"hires scale must be in [1, {MAX_HIRES_SCALE:g}] (0 = off), got {req.hires_scale}")
    for name in ("hires_width", "hires_height", "hires_steps"):
        if getattr(req, name) < 0:
            zero = "the same steps" if name == "hires_steps" else "from the scale"
            raise ValueError(f"{name} must be >= 0 (0 = {zero}), got {getattr(req, name)}")
    if not (0.0 <= req.hires_strength <= 1.0):
        raise ValueError(f"hires denoising strength must be in [0, 1], got {req.hires_strength}")
    upscaler_name(req.hires_upscaler)
    return hires_size(width, height, req.hires_scale or 1.0, req.hires_width, req.hires_height, factor)


# --- surfaces: A1111 payload and PNG parameters --------------------------------------------------------

def _read_payload(p: Mapping[str, Any], _decode: Any) -> dict[str, Any]:
    if not p.get("enable_hr"):
        return {}
    found: dict[str, Any] = {"hires_scale": p.get("hr_scale") if p.get("hr_scale") is not None else 2.0}
    for key, name in (("hr_resize_x", "hires_width"), ("hr_resize_y", "hires_height"),
                      ("hr_second_pass_steps", "hires_steps"), ("denoising_strength", "hires_strength")):
        if p.get(key) is not None:
            found[name] = p[key]
    if p.get("hr_upscaler") not in (None, ""):
        found["hires_upscaler"] = p["hr_upscaler"]
    return found


def _write_png(req: ValidRequest) -> dict[str, Any]:
    if not enabled(req):
        return {}
    out: dict[str, Any] = {"Denoising strength": f"{req.hires_strength:g}"}
    if req.hires_width or req.hires_height:
        out["Hires resize"] = f"{req.hires_width}x{req.hires_height}"
    else:
        out["Hires upscale"] = f"{req.hires_scale:g}"
    if req.hires_steps:
        out["Hires steps"] = req.hires_steps
    out["Hires upscaler"] = upscaler_name(req.hires_upscaler)
    return out


def _read_png(params: Mapping[str, str], source: str) -> dict[str, Any]:
    if "Hires upscale" not in params and "Hires resize" not in params:
        return {}
    try:
        found: dict[str, Any] = {}
        if "Hires resize" in params:
            w, _, h = params["Hires resize"].lower().partition("x")
            found.update(hires_width=int(w), hires_height=int(h))
        else:
            found["hires_scale"] = float(params["Hires upscale"])
        if "Hires steps" in params:
            found["hires_steps"] = int(params["Hires steps"])
        if "Denoising strength" in params:
            found["hires_strength"] = float(params["Denoising strength"])
    except ValueError as e:
        raise ValueError(f"{source}: a hires fix value does not parse ({e})") from None
    if "Hires upscaler" in params:
        found["hires_upscaler"] = params["Hires upscaler"]
    return found


HIRES_PAYLOAD = Payload("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                        "denoising_strength", read=_read_payload)
HIRES_SIZE_FLAG = Flag("--hires-size", type=parse_size, dest="hires_size", metavar="WIDTHxHEIGHT",
                       help="the hires fix to this final size instead of --hires-scale (A1111's hr_resize_x / "
                       "hr_resize_y)", to_fields=lambda size: {"hires_width": size[0], "hires_height": size[1]})
HIRES_PNG = Png("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", write=_write_png, read=_read_png)


def second_pass_sigmas(req: ValidRequest) -> Any:
    """The noise levels of the second pass: the img2img tail at `hires_strength` of `hires_steps` (0: steps)."""
    from ..diffusion.schedules import img2img_sigmas, model_sigmas

    return img2img_sigmas(req.choice.sigmas(req.hires_steps or req.steps, model_sigmas(req.config.schedule)),
                          req.hires_strength)


# --- the pipeline ------------------------------------------------------------------------------------------
