"""A request's AUTOMATIC1111 `parameters` text ("infotext"), written and read from the field table.

Every `GenerationRequest` field with a `png` key (pipelines/fields.py `Png`) is written by
`write_parameters` in table order, which is A1111's order (Steps, Sampler, Schedule type, CFG scale,
Seed, Size, then the model's hash and name as A1111 writes them right after the size, then Class,
Clip skip, Guidance rescale, Eta; then `Precision` when the networks did not compute in float32 and
`Weights: int8` when the weights were quantised), and
read back by `settings_from_parameters`, which is what `daguerre generate --from-png` and the server's
`infotext` apply. A pipeline adds keys that describe
what it did (Denoising strength, Mask blur, Hires upscaler, ...: `SamplingPlan.params`); those are
written after the table's and listed as not applied when read. The text format itself (quoting, the
`Negative prompt:` line) is pngmeta.py's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..pngmeta import parse_parameters
from ..precision import QUANTIZE_CHOICES
from .fields import NEGATIVE_KEY, PROMPT_KEY, SIZE_PNG, surface
from .request import GenerationRequest

if TYPE_CHECKING:
    from .request import ValidRequest

MODEL_HASH_KEY, MODEL_KEY = "Model hash", "Model"
PRECISION_KEY = "Precision"  # the compute dtype (fp16, bf16), written when it is not fp32 (daguerre.precision)
PRECISIONS = ("fp32", "bf16", "fp16")
WEIGHTS_KEY = "Weights"  # "int8" when the U-Net's weights were quantised (daguerre.quantize); absent otherwise
# keys that describe the image but change nothing when generating it again
# (LoRAs are applied again from the prompt's <lora:...> tags; "Lora hashes" and "TI hashes" identify their files)
INFORMATIONAL_KEYS = frozenset({MODEL_HASH_KEY, MODEL_KEY, "Version", "Lora hashes", "TI hashes"})


def write_parameters(
    req: ValidRequest, model: str | None, model_hash: str | None, precision: str = "fp32", quantize: str = "none"
) -> tuple[str, str, dict[str, Any]]:
    """(prompt, negative prompt, the A1111 key/value pairs) of a validated request made with `model` in
    `precision` ("fp32", "bf16", "fp16": `precision.short_name`; `Precision` is written after the table's
    keys when it is not fp32) with weights `quantize` ("int8": `Weights: int8`), for
    `pngmeta.format_parameters` (None values are left out)."""
    params: dict[str, Any] = {}
    for f, png in surface(GenerationRequest, "png"):
        params.update(png.write(req, f))
        if png is SIZE_PNG:
            params.update({MODEL_HASH_KEY: model_hash, MODEL_KEY: model})
    if precision != "fp32":
        params[PRECISION_KEY] = precision
    if quantize != "none":
        params[WEIGHTS_KEY] = quantize
    prompt = params.pop(PROMPT_KEY, "")
    given = " ".join(ref.tag() for ref in req.loras or () if not ref.from_prompt)  # --lora: as A1111 tags
    prompt = f"{prompt} {given}" if prompt and given else prompt or given
    return prompt, params.pop(NEGATIVE_KEY, ""), params


@dataclasses.dataclass
class PngSettings:
    """What a PNG's `parameters` text says about how to make the image again."""

    fields: dict[str, Any]  # GenerationRequest fields
    model: str | None  # the `Model` value, unless it is one a file may not select (`settings_from_parameters`)
    model_hash: str | None  # the `Model hash` value, if any
    ignored: list[str]  # keys daguerre does not apply (hires fix, LoRA, ...), and why a `Model` is not used
    precision: str = "fp32"  # the `Precision` value ("bf16", "fp16"); fp32 when the key is absent
    quantize: str = "none"  # the `Weights` value ("int8"); none when the key is absent


def settings_from_parameters(text: str, source: str = "parameters") -> PngSettings:
    """Read an A1111 `parameters` text (`pngmeta.parse_parameters`) into GenerationRequest fields: every
    field with a PNG key (prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, size,
    class, clip skip, guidance rescale, eta), and the `Precision` the image was computed in (absent: fp32).
    A value that does not parse is a ValueError naming `source` and the key. The `Model` is a name (A1111
    writes the checkpoint's name): a file never builds a `random:` model (random:sd15 allocates 860M
    untrained parameters) nor names a path to open, so such a `Model` is listed in `ignored` with the reason
    and `model` is None: the caller's choice of model stands. The same holds for a `CLIP model` that is a path
    (CLIP guidance): it is listed in `ignored` and the field left out.
    """
    prompt, negative, params = parse_parameters(text)
    params = {**params, PROMPT_KEY: prompt, NEGATIVE_KEY: negative}
    fields: dict[str, Any] = {}
    known = {*INFORMATIONAL_KEYS, PRECISION_KEY, WEIGHTS_KEY}
    for f, png in surface(GenerationRequest, "png"):
        fields.update(png.read(params, f, source))
        known.update(png.keys)
    if "hires_strength" in fields:  # the hires fix's: applied (pipelines/hires.py)
        known.add("Denoising strength")
    ignored = [k for k in params if k not in known]
    clip = fields.get("clip_model")
    if clip is not None and (why := _unusable_model(clip)):
        ignored.append(f"CLIP model {clip!r} ({why}; choose a CLIP with --clip)")
        del fields["clip_model"]
    model = params.get(MODEL_KEY)
    why = _unusable_model(model) if model is not None else None
    if why:
        ignored.append(f"Model {model!r} ({why}; choose a model with --model)")
        model = None
    precision = _choice(params, PRECISION_KEY, PRECISIONS, source)
    quantize = _choice(params, WEIGHTS_KEY, QUANTIZE_CHOICES, source)
    return PngSettings(fields, model, params.get(MODEL_HASH_KEY), ignored, precision, quantize)


def _choice(params: dict[str, str], key: str, choices: tuple[str, ...], source: str) -> str:
    """The value of `key`, one of `choices` (absent: the first, the default); any other is a ValueError naming
    `source` and the key."""
    value = params.get(key, choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{source}: {key} {params[key]!r} is not one of {', '.join(choices)}")
    return value


def _unusable_model(name: str) -> str | None:
    """Why settings read from a file may not select the model `name`, or None when they may."""
    from ..registry import RANDOM_PREFIX

    if name.startswith(RANDOM_PREFIX):
        return "a file never selects a random: model: untrained, and up to 860M parameters to build"
    if any(c in name for c in "/\\") or name.startswith(("~", ".")):
        return "a file never selects a path"
    return None
