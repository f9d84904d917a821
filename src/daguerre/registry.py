"""Resolve what the user names with `--model`: a file or folder, a shipped default model, or a random preset.

- a path: a daguerre / Stable Diffusion checkpoint or a diffusers folder (`daguerre.checkpoints.load_model`);
- the name of a model shipped inside the package (`daguerre/assets/models/NAME.safetensors`,
  `checkpoints.shipped.shipped_models`);
- `random:PRESET` (e.g. `random:tiny`): untrained weights at a preset's architecture, for trying the
  machinery before a model is trained or downloaded.

CLIP models (`--clip`) resolve the same way apart: a path (`checkpoints.clip_file.load_clip`: a daguerre
CLIP file, a transformers folder, an OpenCLIP or OpenAI checkpoint) or the name of a CLIP shipped in
`daguerre/assets/clip/NAME.safetensors`; `clip_for_model` names the CLIP shipped for a shipped model.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from .checkpoints.shipped import shipped_models
from .components import PARTS, Components, ModelSource, build_components
from .config import PRESETS, preset
from .memory import trim
from .precision import AUTO, QUANTIZE_CHOICES, auto_dtype, dtype_of, is_auto, resolve_dtype, uses_channels_last
from .quantize import weight_count

DEFAULT_MODEL = "shapes"
RANDOM_PREFIX = "random:"


def default_model_name() -> str:
    """The model used when none is named: the shipped default, else a random tiny model."""
    return DEFAULT_MODEL if DEFAULT_MODEL in shipped_models() else f"{RANDOM_PREFIX}tiny"


def open_model(
    spec: str | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = AUTO,
    quantize: str | None = None, compile: bool = False, release_after_use: bool = False,
    original_config: str | Path | None = None, base: str | Path | None = None,
) -> tuple[Components, str | None]:
    """(components, A1111 model hash or None) for a model name or path; see the module docstring.

    Every network is in the compute dtype `dtype` (`daguerre.precision.resolve_dtype`: "auto" by default,
    or "fp32", "bf16", "fp16", a torch dtype) on `device`, convolutions in its memory format. The weights of
    a file are converted while they are read, so an fp16 or bf16 file never passes through a float32 copy.
    Then `prepare_for_inference_` applies `quantize` ("int8") and `compile`.

    A part released later (`Components.release`) is read again from the file when it is acquired
    (`Components.source`; not for a compiled model). With `release_after_use` (a one-shot run, `daguerre
    generate`) no network's weights are read yet (only the configs, the tokenizer and the small tensors):
    every part starts released, is read when a pipeline acquires it and released when the pipeline is done
    with it (`Components.done_with`), so a run holds the text encoder, the U-Net and the VAE decoder one after
    the other; each run reads them again. A `random:` model has no file: it is built whole for any part, so
    it stays loaded (`release_after_use` does nothing for it).

    `original_config` is the checkpoint file's CompVis inference YAML (`--config FILE`): this open and the
    reads of its released parts use it, as if it were beside the file; no other load sees it. `base` is an
    adapter file's base model (a file or a shipped name; `checkpoints.adapter`), for this open and its reads.
    """
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE_CHOICES)}")
    if release_after_use and compile:
        raise ValueError("compile and release_after_use do not go together: the compiled U-Net keeps frozen copies "
                         "of its weights, which cannot be released; keep the model loaded to compile it")
    yaml = original_config_for(spec, original_config)
    release_after_use = release_after_use and not (spec or default_model_name()).startswith(RANDOM_PREFIX)
    parts = frozenset() if release_after_use else frozenset(PARTS)
    comps, model_hash = _open_parts(spec, device, dtype, quantize, parts, compile, yaml, base)
    if not compile:  # a compiled U-Net holds its weights in its graph: nothing to release, nothing to read again
        comps.source = _source(spec, device, dtype_of(comps.unet), quantize, yaml, base)  # "auto" decided once
    if release_after_use:
        comps.release_after_use = True
        comps.release(*PARTS)  # what the open read all the same: small tensors, a random model, a packaged encoder
    return comps, model_hash


def original_config_for(spec: str | None, original_config: str | Path | None) -> Path | None:
    """The CompVis YAML given for the model `spec` names, checked to go with a checkpoint file; None without one."""
    if original_config is None:
        return None
    from .checkpoints.detect import check_original_config

    name = spec or default_model_name()
    path = Path(name) if name.startswith(RANDOM_PREFIX) else shipped_models().get(name, Path(name).expanduser())
    return check_original_config(path, original_config)


def _open_parts(spec: str | None, device: torch.device | str | None, dtype: torch.dtype | str | None,
                quantize: str | None, parts: frozenset[str], compile: bool = False,
                yaml: Path | None = None, base: str | Path | None = None) -> tuple[Components, str | None]:
    """`_open` reading the weights of `parts` only (`checkpoints.parts`), then `prepare_for_inference_`."""
    from .checkpoints.parts import reading_parts

    if parts == frozenset(PARTS):
        comps, model_hash = _open(spec, device, dtype, quantize, yaml, base)
    else:
        with reading_parts(parts):
            comps, model_hash = _open(spec, device, dtype, quantize, yaml, base)
    prepare_for_inference_(comps, quantize=quantize, compile=compile, device=device or "cpu")
    trim()  # the load's freed buffers back to the system (daguerre.memory)
    return comps, model_hash


def _source(spec: str | None, device: torch.device | str | None, dtype: torch.dtype,
            quantize: str | None, yaml: Path | None, base: str | Path | None = None) -> ModelSource:
    """Where `Components.acquire` reads released parts of the model `spec` again from: in `dtype` (the source's,
    which `api.set_compute_dtype` updates), from the file as it is now (a file changed since is refused: the
    parts would come from two models), with the CompVis YAML and the adapter's base it was opened with (a base
    changed since is refused by its sha256)."""
    name = spec or default_model_name()
    stamp = _file_stamp(name)

    def read(parts: frozenset[str], dtype: torch.dtype) -> Components:
        if _file_stamp(name) != stamp:
            raise ValueError(f"model {name} changed on disk since it was opened: reading its networks again would "
                             "mix two models; open it again")
        return _open_parts(name, device, dtype, quantize, parts, yaml=yaml, base=base)[0]

    return ModelSource(name=name, device=torch.device(device or "cpu"), dtype=dtype, read=read)


def _file_stamp(spec: str) -> tuple | None:
    """(name, size, mtime) of the model's file, or of every file in its folder; None for a random model."""
    if spec.startswith(RANDOM_PREFIX):
        return None
    path = shipped_models().get(spec, Path(spec).expanduser())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def prepare_for_inference_(comps: Components, *, quantize: str | None = None, compile: bool = False,
                           device: torch.device | str | None = None) -> None:
    """In place: `quantize="int8"` stores the weights of the U-Net's and the text encoder's Linear and Conv2d
    layers in int8 (`daguerre.quantize`: half the memory of bf16, the images change slightly); `compile`
    compiles the U-Net with inductor freezing (`daguerre.compile`: faster after a slow first call at each
    size, more memory). Both are for generating only: a quantised network refuses to be saved. Without
    `compile`, the U-Net's other Conv2d and Linear layers compute with oneDNN-packed weights where
    `precision.uses_packed_weights` says so for `device` (default: the U-Net's) (`daguerre.nn.conv`: the
    same results bit for bit and the same memory; the VAE's large convolutions gained nothing from it)."""
    if quantize == "int8":
        from .quantize import quantize_int8_

        for module in (comps.unet, comps.text_encoder):
            if module is not None:
                quantize_int8_(module)
    if compile:
        from .compile import compile_for_inference_

        compile_for_inference_(comps.unet)
        return
    from .precision import uses_packed_weights

    if uses_packed_weights(dtype_of(comps.unet), device or next(comps.unet.parameters()).device,
                           weight_count(comps.unet)):
        from .nn.conv import pack_for_inference_

        pack_for_inference_(comps.unet)


def _open(spec: str | None, device: torch.device | str | None, dtype: torch.dtype | str | None,
          quantize: str | None = None, yaml: Path | None = None,
          base: str | Path | None = None) -> tuple[Components, str | None]:
    from .checkpoints import short_hash

    spec = spec or default_model_name()
    if spec.startswith(RANDOM_PREFIX) and base is not None:
        raise ValueError(f"a base model goes with an adapter file; {spec} is a random model, it needs none")
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in {spec!r}; presets: {', '.join(PRESETS)}")
        comps = build_components(preset(name))
        comps.config.name = spec
        _randomize_zero_layers(comps)
        dtype = _compute_dtype(dtype, device, lambda: weight_count(comps.unet))
        _to(comps, device, dtype)
        set_memory_format(comps, dtype, device or "cpu")
        return comps, None
    shipped = shipped_models()
    path = shipped.get(spec, Path(spec).expanduser())
    if not path.exists():
        names = ", ".join(sorted(shipped)) or "none installed"
        raise FileNotFoundError(
            f"no model {spec!r}: not a file or folder, nor a shipped model ({names}), nor random:PRESET"
        )
    dtype = _compute_dtype(dtype, device, lambda: _stored_unet_parameters(path, yaml, base))
    comps = _load_file(path, device, dtype, quantize, yaml, base)
    set_memory_format(comps, dtype, device or "cpu")
    model_hash = short_hash(path) if path.is_file() else None
    return comps, model_hash


def _load_file(path: Path, device: torch.device | str | None, dtype: torch.dtype, quantize: str | None,
               yaml: Path | None = None, base: str | Path | None = None) -> Components:
    """`load_model`; with `quantize="int8"` on the CPU, the U-Net's and text encoder's weights are quantised
    while they are read (`quantize.int8_loading`: no float copy of the U-Net, equal to quantising after), unless
    the file's loader transforms those weights beyond renaming (then it is loaded and quantised after)."""
    from .checkpoints import load_model
    from .quantize import QuantizeWhileReadingError, int8_loading

    if quantize == "int8" and torch.device(device or "cpu").type == "cpu":
        try:
            with int8_loading():
                return load_model(path, device=device, dtype=dtype, original_config=yaml, base=base)
        except QuantizeWhileReadingError:
            trim()
    return load_model(path, device=device, dtype=dtype, original_config=yaml, base=base)


def _compute_dtype(
    dtype: torch.dtype | str | None, device: torch.device | str | None, unet_parameters: Callable[[], int]
) -> torch.dtype:
    """`resolve_dtype`, asking for the U-Net's size (`unet_parameters()`) only when `auto` depends on it."""
    if not is_auto(dtype) or auto_dtype(device, 0) == auto_dtype(device, None):
        return resolve_dtype(dtype, device)
    return resolve_dtype(dtype, device, unet_parameters())


def _stored_unet_parameters(path: Path, yaml: Path | None = None, base: str | Path | None = None) -> int:
    """The U-Net parameter count of a model file or folder, from its header (`checkpoints.summary.describe`:
    safetensors headers only, the networks built on the meta device; a pickle is read whole)."""
    from .checkpoints.summary import describe

    return describe(path, hashes=False, original_config=yaml, base=base)["parameters"]["unet"]


def set_memory_format(comps: Components, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """The convolutions of the U-Net and the VAE channels_last where `precision.uses_channels_last` says so
    (else left as they are: contiguous), for a run on `device` (default: the U-Net's; a partial read leaves
    it on the meta device)."""
    device = next(comps.unet.parameters()).device if device is None else torch.device(device)
    if uses_channels_last(dtype, device, weight_count(comps.unet)):
        for module in (comps.unet, comps.vae):
            _channels_last_(module)


TRIM_EVERY = 64 * 2**20  # bytes of weights converted to channels_last between two `memory.trim` calls


def _channels_last_(module: torch.nn.Module) -> None:
    """`module.to(memory_format=torch.channels_last)` a layer at a time, the C heap trimmed every `TRIM_EVERY`
    bytes: converted all at once, the freed contiguous copies stay as holes between the new ones (glibc), which
    raised the peak of an SD 1.5 int8 load by ~0.35 GiB. Children come before their parents, so each tensor is
    copied once (a tensor already channels_last is kept as it is, as `Tensor.to` does)."""
    pending = 0
    for m in reversed(list(module.modules())):
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        pending += sum(t.numel() * t.element_size() for t in own
                       if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last))
        m.to(memory_format=torch.channels_last)
        if pending >= TRIM_EVERY:
            trim()
            pending = 0


def _to(comps: Components, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
    for module in (comps.unet, comps.vae, comps.text_encoder):
        if module is not None:
            module.to(device=device, dtype=dtype)


def _randomize_zero_layers(comps: Components, std: float = 0.02) -> None:
    """Give zero-initialised weights (the U-Net's output convs, training's usual start) small random
    values, so an untrained `random:` model still responds to its prompt and seed."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (comps.unet, comps.vae, comps.text_encoder):
            if module is None:
                continue
            for p in module.parameters():
                if p.dim() > 1 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def shipped_model_for(semantic_map: bool, layout: bool) -> str | None:
    """The shipped model a request with a semantic map or a layout goes to when it names none (issue 18): the
    default model when it draws from that condition, else the first other shipped model (by name) that does;
    None when none does. Only each file's header (its config) is read."""
    from .conditioning import conditioner_for
    from .config import ModelConfig
    from .weights.io import read_shapes

    shipped = shipped_models()
    for name in sorted(shipped, key=lambda n: (n != DEFAULT_MODEL, n)):
        text = read_shapes(shipped[name])[1].get("daguerre_config")
        if text is None:
            continue
        conditioner = conditioner_for(ModelConfig.from_json(text))
        if (not semantic_map or conditioner.concat.takes_map) and (not layout or conditioner.takes_layout):
            return name
    return None


def model_file(spec: str) -> dict[str, str | None]:
    """{"file", "sha256"} of the checkpoint file a spec names (None for random models and folders)."""
    from .weights.io import file_hash

    if spec.startswith(RANDOM_PREFIX):
        return {"file": None, "sha256": None}
    path = shipped_models().get(spec, Path(spec).expanduser())
    return {"file": str(path), "sha256": file_hash(path) if path.is_file() else None}


# --- CLIP models (issue 16) ----------------------------------------------------------------------------

CLIP_FOR_MODEL = {"shapes": "shapes-clip"}  # shipped diffusion model -> the shipped CLIP trained on its data
# shipped diffusion model -> the shipped CLIP that guides it by default (a noise-aware CLIP of its latents)
GUIDE_FOR_MODEL = {"shapes": "shapes-noisy-clip"}


def shipped_clips() -> dict[str, Path]:
    """Name -> path of every CLIP model that ships inside the package (assets/clip/NAME.safetensors)."""
    folder = resources.files("daguerre") / "assets" / "clip"
    if not folder.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".safetensors")}


def clip_for_model(model_name: str | None) -> str | None:
    """The name of the CLIP shipped for a shipped diffusion model ("shapes" -> "shapes-clip"), or None when
    the model has none. The name is returned even before that file is installed: check `shipped_clips()`."""
    return CLIP_FOR_MODEL.get(model_name or "")


def guide_for_model(model_name: str | None) -> str | None:
    """The name of the CLIP that guides a shipped diffusion model by default (`--clip-guidance` without
    `--clip`): its noise-aware CLIP when that is installed, else its CLIP (`clip_for_model`), else None."""
    guide = GUIDE_FOR_MODEL.get(model_name or "")
    return guide if guide is not None and guide in shipped_clips() else clip_for_model(model_name)


def clip_path(spec: str) -> Path:
    """The file or folder a CLIP spec names: a shipped CLIP's name or a path; FileNotFoundError listing the
    shipped names otherwise."""
    shipped = shipped_clips()
    path = shipped.get(spec, Path(spec).expanduser())
    if not path.exists():
        names = ", ".join(sorted(shipped)) or "none installed"
        raise FileNotFoundError(f"no CLIP model {spec!r}: not a file or folder, nor a shipped CLIP ({names})")
    return path


def open_clip(spec: str, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
              activation: str | None = None):
    """The `models.clip.CLIPModel` a spec names (`clip_path`), in eval mode without parameter gradients, its
    weights read straight into `dtype` (None: float32; or a name as --dtype takes) on `device`.
    `activation` is for OpenCLIP files, which cannot state theirs (docs/formats.md)."""
    from .checkpoints.clip_file import load_clip

    path = clip_path(spec)
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, device)
    return load_clip(path, device=device, dtype=dtype, activation=activation)
