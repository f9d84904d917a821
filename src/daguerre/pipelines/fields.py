"""The vocabulary of the request's field table: how one `GenerationRequest` field shows on each surface.

`GenerationRequest` (pipelines/request.py) is the one table of what a user sets. Each field is made
with `setting(...)`, whose metadata names the field's type (checked by `validate`), the tasks it
matters for, and its face on every surface: `Flag` on the command line (commands/request_args.py
adds the flags of a command's task and reads them back), `Payload` in AUTOMATIC1111's txt2img /
img2img JSON (server/payload.py) and `Png` in A1111's `parameters` text (pipelines/infotext.py
writes and reads it). Most fields need only a name on a surface. The few that A1111 or the command
line spell differently carry a small codec here, written once: one `WxH` flag and PNG key for width
and height, A1111's `n_iter` batches of `batch_size`, its numeric resize and fill modes, its
`inpaint_full_res` switch, the sampler written under its A1111 name. A codec that several fields
share (size) is one object that both fields name; `surface` lists it once. A new field is one
`setting(...)` line, and every surface takes it (tests/test_request_fields.py checks each surface
against the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .request import ValidRequest

TASKS = ("txt2img", "img2img", "inpaint", "upscale")
IMAGE_TASKS = ("img2img", "inpaint", "upscale")
TXT2IMG = ("txt2img",)
SURFACES = ("cli", "a1111", "png")
Decode = Callable[[Any, str], "Image.Image"]  # (base64 text, its name in messages) -> image: the server's decoder


def setting(default: Any = None, *, type: Any = None, tasks: tuple[str, ...] = TASKS, cli: Flag | None = None,
            a1111: str | Payload | None = None, png: str | Png | None = None, **options: Any) -> Any:
    """A `GenerationRequest` field with its metadata: `type` (int, float, str or bool: what `validate`
    checks and a flag or PNG value converts to; None: no check), the `tasks` it matters for (which
    commands take its flag, which A1111 endpoint reads it), and its `cli` flag, `a1111` payload key and
    `png` parameters key (a plain name, or a codec). `options` go to `dataclasses.field`."""
    metadata = {"type": type, "tasks": tasks, "cli": cli,
                "a1111": Payload(a1111) if isinstance(a1111, str) else a1111,
                "png": Png(png) if isinstance(png, str) else png}
    if "default_factory" in options:
        return dataclasses.field(metadata=metadata, **options)
    return dataclasses.field(default=default, metadata=metadata, **options)


def surface(cls: type, name: str, task: str | None = None) -> list[tuple[dataclasses.Field, Any]]:
    """(field, codec) of every field of the table `cls` with a face on surface `name` ("cli", "a1111",
    "png"), in table order, only those that matter for `task` if given; a codec that several fields
    share comes once, with the first of them."""
    seen: set[int] = set()
    found = []
    for f in dataclasses.fields(cls):
        codec = f.metadata.get(name)
        if codec is None or id(codec) in seen or (task is not None and task not in f.metadata["tasks"]):
            continue
        seen.add(id(codec))
        found.append((f, codec))
    return found


class PayloadError(ValueError):
    """A value of an A1111 payload that a field's codec cannot read; the server answers it as a 422
    `ApiError` naming the field (server/payload.py)."""


# --- the command line ------------------------------------------------------------------------------

class Flag:
    """A field's command-line flag, or positional argument (a name without dashes; `nargs="?"` makes it
    optional). The value left out is None, so a command knows which flags were given (`--from-png`
    lets them win over the file) and the field keeps its default otherwise. An int or float field's
    flag converts to its type, a bool field's is `--x/--no-x`; `help` is one text or one per task;
    `to_fields(value)` maps a value onto several fields (`--size`); other keywords go to argparse."""

    def __init__(self, *names: str, help: str | Mapping[str, str], dest: str | None = None,
                 to_fields: Callable[[Any], dict[str, Any]] | None = None, **options: Any):
        self.names, self.help, self.dest, self.to_fields, self.options = names, help, dest, to_fields, options

    @property
    def positional(self) -> bool:
        return not self.names[0].startswith("-")

    def _dest(self, f: dataclasses.Field) -> str:
        return self.names[0] if self.positional else self.dest or f.name

    def add(self, parser: argparse.ArgumentParser, f: dataclasses.Field, task: str) -> None:
        options = {"help": self.help if isinstance(self.help, str) else self.help[task], "default": None,
                   **self.options}
        kind = f.metadata["type"]
        if kind in (int, float) and "type" not in options and "action" not in options:
            options["type"] = kind
        elif kind is bool and "action" not in options:
            options["action"] = argparse.BooleanOptionalAction
        if not self.positional:
            options["dest"] = self._dest(f)
            if "action" not in options and "choices" not in options:  # --cfg CFG, not --cfg CFG_SCALE
                options.setdefault("metavar", self.names[0].lstrip("-").upper().replace("-", "_"))
        parser.add_argument(*self.names, **options)

    def read(self, args: argparse.Namespace, f: dataclasses.Field) -> dict[str, Any]:
        value = getattr(args, self._dest(f), None)
        if value is None:
            return {}
        return self.to_fields(value) if self.to_fields is not None else {f.name: value}


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768); '512' -> (512, 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


SIZE_FLAG = Flag("--size", type=parse_size, dest="size", help="WIDTHxHEIGHT in pixels (default: the model's)",
                 to_fields=lambda size: {"width": size[0], "height": size[1]})


def dashed_choices(choices: tuple[str, ...], name: str, **options: Any) -> dict[str, Any]:
    """Flag keywords for a choice whose values hold spaces ("latent noise"): typed with dashes
    (`--fill latent-noise`), read back with spaces."""
    return {"choices": tuple(c.replace(" ", "-") for c in choices),
            "to_fields": lambda value: {name: value.replace("-", " ")}, **options}


# --- AUTOMATIC1111 payloads ------------------------------------------------------------------------

class Payload:
    """A field's key(s) in an A1111 txt2img / img2img payload. Plain: the value of the first key that
    is set (not None; with `empty=True` not empty either), else the field keeps its default; `read(p,
    decode)` replaces that for the fields A1111 spells differently, and `setting` names an A1111
    setting taken per request from `override_settings`. The first key, present in the payload, keeps an
    `infotext`'s value for the field out (`given`)."""

    def __init__(self, *keys: str, empty: bool = False, setting: str | None = None,
                 read: Callable[[Mapping[str, Any], Decode], dict[str, Any]] | None = None):
        self.keys, self.empty, self.setting, self._read = keys, empty, setting, read

    def given(self, p: Mapping[str, Any]) -> bool:
        if self.setting is not None:
            overrides = p.get("override_settings")
            return isinstance(overrides, dict) and self.setting in overrides
        return self.keys[0] in p

    def read(self, p: Mapping[str, Any], f: dataclasses.Field, decode: Decode) -> dict[str, Any]:
        if self._read is not None:
            return self._read(p, decode)
        if self.setting is not None:
            return {f.name: p["override_settings"][self.setting]} if self.given(p) else {}
        for key in self.keys:
            value = p.get(key)
            if value is not None and (value or not self.empty):
                return {f.name: value}
        return {}


# how an init image meets width x height (pipelines/images.py `resize_image`), and A1111 img2img's
# "resize_mode" and "inpainting_fill" (Masked content) codes -> daguerre's names
RESIZE_MODES = ("crop", "fit", "stretch", "none")
RESIZE_MODE = {0: "stretch", 1: "crop", 2: "fit"}  # Just resize, Crop and resize, Resize and fill
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def _batches(p: Mapping[str, Any], _decode: Decode) -> dict[str, Any]:
    """A1111 makes `n_iter` batches of `batch_size` images."""
    batch_size, n_iter = p.get("batch_size", 1), p.get("n_iter", 1)
    for key, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PayloadError(f"{key} must be a whole number >= 1, got {value!r}")
    return {"batch_size": batch_size, "n": batch_size * n_iter}


def _init_images(p: Mapping[str, Any], decode: Decode) -> dict[str, Any]:
    images = p.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise PayloadError("init_images must be a list of one base64-encoded image (daguerre takes one init image)")
    return {"init_image": decode(images[0], "init_images[0]")}


def coded(key: str, name: str, codes: Mapping[int, str], meaning: str) -> Payload:
    """The codec of a field A1111 sends as a number (0 when left out): `codes` maps it to daguerre's value
    of field `name`; `meaning` tells the valid numbers in an error."""

    def read(p: Mapping[str, Any], _decode: Decode) -> dict[str, Any]:
        code = p.get(key, 0)
        if code not in codes:
            raise PayloadError(f"{key} {code!r} is not supported; use {meaning}")
        return {name: codes[code]}

    return Payload(key, read=read)


def _mask(p: Mapping[str, Any], decode: Decode) -> dict[str, Any]:
    from PIL import ImageOps

    mask = decode(p["mask"], "mask").convert("L")
    return {"mask": ImageOps.invert(mask) if p.get("inpainting_mask_invert") else mask}


def _mask_blur(p: Mapping[str, Any], _decode: Decode) -> dict[str, Any]:
    """`mask_blur`, or its x and y parts when they agree (daguerre blurs both directions alike)."""
    blur, xy = p.get("mask_blur"), {p.get("mask_blur_x"), p.get("mask_blur_y")} - {None}
    if blur is None and len(xy) == 1:
        blur = xy.pop()
    elif xy and xy != {blur}:
        raise PayloadError(f"mask_blur_x / mask_blur_y ({p.get('mask_blur_x')}, {p.get('mask_blur_y')}) differ "
                           f"from mask_blur ({blur}) or from each other: daguerre blurs the mask the same way in "
                           "both directions; give mask_blur alone")
    return {} if blur is None else {"mask_blur": blur}


def _full_res(p: Mapping[str, Any], _decode: Decode) -> dict[str, Any]:
    """`inpaint_full_res` (A1111's schema default: true) is "only masked", with its padding (default 0)."""
    if not p.get("inpaint_full_res", True):
        return {}
    padding = p.get("inpaint_full_res_padding")
    return {"inpaint_area": "only masked", "inpaint_padding": 0 if padding is None else padding}


def _semantic_map(p: Mapping[str, Any], decode: Decode) -> dict[str, Any]:
    """A semantic map is a base64 image, as init images are (never a path: a client names no server file)."""
    value = p.get("semantic_map")
    return {} if value in (None, "") else {"semantic_map": decode(value, "semantic_map")}


def _layout(p: Mapping[str, Any], _decode: Decode) -> dict[str, Any]:
    """A layout is a list of {"phrase", "box"} objects (never a path: a client names no server file)."""
    from ..data.layout import parse_layout

    value = p.get("layout")
    if value is None:
        return {}
    if not isinstance(value, list):
        raise PayloadError(f"layout must be a list of {{\"phrase\": ..., \"box\": [x0, y0, x1, y1]}} objects, got "
                           f"{type(value).__name__}")
    try:
        return {"layout": parse_layout(value, "layout")}
    except ValueError as e:
        raise PayloadError(str(e)) from None


BATCHES = Payload("batch_size", "n_iter", read=_batches)
SEMANTIC_PAYLOAD = Payload("semantic_map", read=_semantic_map)
LAYOUT_PAYLOAD = Payload("layout", read=_layout)
INIT_IMAGES = Payload("init_images", read=_init_images)
RESIZE = coded("resize_mode", "resize_mode", RESIZE_MODE, "0 (just resize), 1 (crop and resize) or 2 (resize and fill)")
MASK = Payload("mask", "inpainting_mask_invert", read=_mask)
MASK_BLUR = Payload("mask_blur", "mask_blur_x", "mask_blur_y", read=_mask_blur)
FILL = coded("inpainting_fill", "inpaint_fill", INPAINTING_FILL,
              "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
FULL_RES = Payload("inpaint_full_res", "inpaint_full_res_padding", read=_full_res)


# --- A1111 PNG parameters ----------------------------------------------------------------------------

PROMPT_KEY, NEGATIVE_KEY = "Prompt", "Negative prompt"  # the text's first lines, under A1111's names for them


class Png:
    """A field's key in A1111's `parameters` text. Plain: written as the value (`fmt` formats it) and
    left out when it equals the field's default, as A1111 leaves out settings at their defaults; read
    back with the field's type. `write(request)` and `read(params, source)` replace that where the text
    differs from the field (the sampler's A1111 name, size as WxH, eta's two keys)."""

    def __init__(self, *keys: str, fmt: Callable[[Any], Any] | None = None,
                 write: Callable[[ValidRequest], dict[str, Any]] | None = None,
                 read: Callable[[Mapping[str, str], str], dict[str, Any]] | None = None):
        self.keys, self.fmt, self._write, self._read = keys, fmt, write, read

    def write(self, req: ValidRequest, f: dataclasses.Field) -> dict[str, Any]:
        if self._write is not None:
            return self._write(req)
        value = getattr(req, f.name)
        if value is None or (f.default is not dataclasses.MISSING and value == f.default):
            return {}
        return {self.keys[0]: self.fmt(value) if self.fmt is not None else value}

    def read(self, params: Mapping[str, str], f: dataclasses.Field, source: str) -> dict[str, Any]:
        if self._read is not None:
            return self._read(params, source)
        key = self.keys[0]
        if key not in params:
            return {}
        kind = f.metadata["type"]
        try:
            return {f.name: kind(params[key]) if kind in (int, float) else params[key]}
        except ValueError:
            raise ValueError(f"{source}: {key} {params[key]!r} is not a "
                             f"{'whole number' if kind is int else 'number'}") from None


def _write_size(req: ValidRequest) -> dict[str, Any]:
    return {"Size": f"{req.width}x{req.height}"}


def _read_size(params: Mapping[str, str], source: str) -> dict[str, Any]:
    if "Size" not in params:
        return {}
    width, sep, height = params["Size"].lower().partition("x")
    width, height = width.strip(), height.strip()
    if not (sep and _ascii_digits(width) and _ascii_digits(height)):  # int() reads "²" and "٣" too
        raise ValueError(f"{source}: Size {params['Size']!r} is not WIDTHxHEIGHT")
    return {"width": int(width), "height": int(height)}


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 10  # 10 digits: far over any limit already


def _write_eta(req: ValidRequest) -> dict[str, Any]:
    """A1111 writes "Eta" (ancestral and SDE samplers) or "Eta DDIM" for a sampler that takes eta, when the
    request's differs from that sampler's default (sampler_names.Eta)."""
    eta = req.choice.eta
    if eta is None or req.eta is None or req.eta == eta.default:
        return {}
    return {eta.infotext: f"{req.eta:g}"}


def _read_eta(params: Mapping[str, str], source: str) -> dict[str, Any]:
    found = {}
    for key in ("Eta", "Eta DDIM"):  # A1111 writes one of them; were both there, "Eta DDIM" would win
        if key in params:
            try:
                found["eta"] = float(params[key])
            except ValueError:
                raise ValueError(f"{source}: {key} {params[key]!r} is not a number") from None
    return found


def _read_class(params: Mapping[str, str], _source: str) -> dict[str, Any]:
    """A class label is written as given: an index (read back as a whole number) or a class name."""
    if "Class" not in params:
        return {}
    label = params["Class"]
    return {"class_label": int(label) if _ascii_digits(label.removeprefix("-")) else label}


def _write_clip(req: ValidRequest) -> dict[str, Any]:
    """CLIP guidance's keys, written only when it ran (scale > 0): its scale, the CLIP model, the cutouts, the
    repeats of the recurrent steps."""
    if not req.clip_guidance:
        return {}
    return {"CLIP guidance": f"{req.clip_guidance:g}", "CLIP model": req.clip_model, "Cutouts": req.cutouts,
            "CLIP repeats": req.clip_repeats}


def _read_clip(params: Mapping[str, str], source: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "CLIP guidance" in params and "CLIP repeats" not in params:
        found["clip_repeats"] = 1  # written before the repeats existed: its steps were taken once
    for key, name, kind in (("CLIP guidance", "clip_guidance", float), ("Cutouts", "cutouts", int),
                            ("CLIP repeats", "clip_repeats", int)):
        if key in params:
            try:
                found[name] = kind(params[key])
            except ValueError:
                raise ValueError(f"{source}: {key} {params[key]!r} is not a "
                                 f"{'whole number' if kind is int else 'number'}") from None
    if "CLIP model" in params:
        found["clip_model"] = params["CLIP model"]
    return found


def _write_semantic(req: ValidRequest) -> dict[str, Any]:
    return {} if req.semantic_map is None else {"Semantic map": req.semantic_map.encode()}


def _read_semantic(params: Mapping[str, str], source: str) -> dict[str, Any]:
    """The map, bounded by `limits.MAX_PIXELS` before it is decompressed (the request's limits check it again)."""
    from ..data.layout import LabelMap
    from ..limits import MAX_PIXELS

    if "Semantic map" not in params:
        return {}
    return {"semantic_map": LabelMap.decode(params["Semantic map"], MAX_PIXELS, f"{source}: Semantic map")}


def _write_layout(req: ValidRequest) -> dict[str, Any]:
    from ..data.layout import layout_text

    return {"Layout": layout_text(req.layout)} if req.layout else {}


def _read_layout(params: Mapping[str, str], source: str) -> dict[str, Any]:
    from ..data.layout import parse_layout
    from ..untrusted import parse_json

    if "Layout" not in params:
        return {}
    return {"layout": parse_layout(parse_json(params["Layout"], f"{source}: Layout"), f"{source}: Layout")}


SIZE_PNG = Png("Size", write=_write_size, read=_read_size)
SEMANTIC_PNG = Png("Semantic map", write=_write_semantic, read=_read_semantic)
LAYOUT_PNG = Png("Layout", write=_write_layout, read=_read_layout)
SAMPLER_PNG = Png("Sampler", write=lambda req: {"Sampler": req.choice.a1111_name})
SCHEDULE_PNG = Png("Schedule type", write=lambda req: {"Schedule type": req.choice.a1111_schedule})
ETA_PNG = Png("Eta", "Eta DDIM", write=_write_eta, read=_read_eta)
CLASS_PNG = Png("Class", read=_read_class)
CLIP_PNG = Png("CLIP guidance", "CLIP model", "Cutouts", "CLIP repeats", write=_write_clip, read=_read_clip)
