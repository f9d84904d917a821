"""Generation parameters in PNG files, in the AUTOMATIC1111 `parameters` text-chunk format.

The chunk holds the prompt, an optional `Negative prompt:` line, and one line of `Key: value`
pairs separated by commas (`Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,
Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd15`). Values that contain a comma, a
colon or a newline are written as JSON strings, as A1111 does, so tools that read A1111 images
(A1111's PNG Info, ComfyUI, civitai) read ours.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .fileio import atomic_path

NEGATIVE_PREFIX = "Negative prompt:"
# `Key: value` where value is a JSON string or runs to the next comma (A1111's generation-parameter grammar)
_PARAM = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The A1111 `parameters` text for a prompt, a negative prompt and ordered key/value pairs (None values dropped)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of `format_parameters`: (prompt, negative prompt, {key: value string})."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    matches = _PARAM.findall(last)
    if len(matches) >= 3:  # A1111's rule: the last line holds the parameters when it has several of them
        lines = lines[:-1]
        for key, value in matches:
            value = value.strip()
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            params[key.strip()] = value
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def _png_info(parameters: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    return info


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None, *,
             replace: bool = True) -> Path:
    """Write `image` as PNG with the `parameters` text chunk, atomically; returns the path. With
    `replace=False` an existing file at `path` is kept and FileExistsError raised (fileio.atomic_path)."""
    path = Path(path)
    with atomic_path(path, replace=replace) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(parameters))
    return path


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """`image` encoded as PNG with the `parameters` text chunk (what the server sends)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(parameters))
    return buf.getvalue()


def read_png_parameters(path: str | os.PathLike) -> str:
    """The `parameters` text of a PNG, or a ValueError saying the file carries none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters") or getattr(im, "text", {}).get("parameters")
    except OSError as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None
    if not text:
        raise ValueError(f"{path} carries no generation parameters (no 'parameters' PNG text chunk)")
    return text
