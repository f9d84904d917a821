"""CLIP model files: daguerre's own, and the CLIP weights users have (transformers, OpenCLIP, OpenAI).

daguerre's CLIP file (`save_clip`) is a safetensors file whose tensors carry transformers' `CLIPModel`
names (`text_model.*`, `vision_model.*`, `text_projection.weight`, `visual_projection.weight`,
`logit_scale`: `models.clip.CLIPModel`'s own state dict) and whose metadata holds the `CLIPConfig`
JSON (`daguerre_clip_config`, with `format` = "daguerre-clip"). `load_clip` reads it and also:

- a transformers folder (`config.json` of model_type "clip", `preprocessor_config.json` if present, and
  `model.safetensors`, its sharded form, or `pytorch_model.bin` read with weights only);
- an OpenCLIP checkpoint: safetensors or a state-dict `.bin`/`.pt`/`.pth` with OpenCLIP's names
  (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`, `visual.proj`,
  `text_projection`, `ln_final.*`, `positional_embedding`, `logit_scale`, ...);
- OpenAI's `.pt` files, TorchScript archives, read by `checkpoints.torchscript` (never `torch.jit.load`,
  never an unrestricted unpickler); their names are OpenCLIP's.

OpenCLIP-named weights state no config: it is read from the shapes (widths, layers, patch size, image
size = patch x sqrt(positions - 1), heads = width / 64, as OpenAI's and OpenCLIP's ViTs use). The one
thing shapes cannot tell is the MLP activation: OpenAI-trained weights use quick_gelu (an OpenAI
archive, or a state dict carrying OpenAI's `input_resolution` / `context_length` / `vocab_size`
entries), OpenCLIP-trained ones GELU unless their model name ends in "-quickgelu". The default follows
that rule; `activation=` overrides it (and is refused for files that state their config).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, CLIPConfig, TextEncoderConfig, VisionConfig
from ..fileio import atomic_save_safetensors
from ..models.clip import CLIPModel
from ..models.noisy_clip import build_clip_model
from ..untrusted import read_json
from ..weights.io import read_shapes, read_state_dict, sniff
from ..weights.strict import check_state_dict, few, instantiate
from .text_keys import (
    _BLOCK_RE,
    _OPENCLIP_BLOCK,
    _OPENCLIP_FUSED,
    CLIP_HEAD_DIM,
    text_config_from_state_dict,
    text_config_from_transformers,
    text_state_dict_from_openclip,
)
from .torchscript import read_torchscript, torchscript_prefix

CLIP_FORMAT = "daguerre-clip"  # safetensors metadata "format" of a daguerre CLIP file
CLIP_CONFIG_KEY = "daguerre_clip_config"  # the CLIPConfig JSON
ACTIVATION_CHOICES = ("quick_gelu", "gelu")
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI's jit buffers: not weights
DERIVED_KEYS = ("position_ids",)  # transformers' arange buffers, when a file stores them
# transformers `CLIPVisionConfig` / `CLIPConfig` defaults, for fields a config.json leaves out
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_HF_PROJECTION_DIM = 512
_HF_LOGIT_SCALE_INIT = 2.6592
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# OpenCLIP vision names (without "visual.") -> transformers names; blocks as the text tower's (text_keys)
_OPENCLIP_VISION_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias",
}
VISION_LAYER = "vision_model.encoder.layers.{}."
_VISION_LAYER_RE = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")


@dataclasses.dataclass
class CLIPWeights:
    """What `read_clip` found: the state dict in daguerre's names, its config, and where they came from."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig
    format: str  # "daguerre CLIP file", "transformers folder", "OpenCLIP state dict", "OpenAI TorchScript archive"
    stored_dtypes: dict[str, int]


# --- daguerre's file ------------------------------------------------------------------------------

def save_clip(model: CLIPModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a daguerre CLIP file (module docstring), atomically; floating tensors in `dtype`
    (default: as they are in the model)."""
    if not isinstance(model, CLIPModel):
        raise ValueError(f"save_clip writes a CLIPModel, got {type(model).__name__}")
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {CLIP_CONFIG_KEY: model.clip_config.to_json(), "format": CLIP_FORMAT, "daguerre_version": __version__}
    atomic_save_safetensors(tensors, path, meta, dtype=dtype)


def load_clip(path: str | os.PathLike, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, activation: str | None = None) -> CLIPModel:
    """A CLIP model from any file or folder of the module docstring, loaded strictly (every tensor used,
    every shape checked), floating weights in `dtype` (default float32) on `device`, in eval mode and
    without parameter gradients (`requires_grad_(True)` to train it). `activation` ("quick_gelu" or
    "gelu") sets the MLP activation of OpenCLIP-named weights, which cannot state it."""
    weights = read_clip(path, dtype=dtype or torch.float32, activation=activation)
    cfg = weights.config
    model = instantiate(lambda: build_clip_model(cfg), weights.state_dict, f"{path}: the CLIP model",
                        device=device, dtype=dtype)
    return model.requires_grad_(False)


def read_clip(path: str | os.PathLike, *, dtype: torch.dtype | None = None, activation: str | None = None,
              shapes_only: bool = False) -> CLIPWeights:
    """The tensors (daguerre's names; with `shapes_only` on the meta device, no weights read where the
    format allows) and config of a CLIP file or folder; ValueError naming the file and what to do."""
    if activation is not None and activation not in ACTIVATION_CHOICES:
        raise ValueError(f"activation {activation!r}: use one of {', '.join(ACTIVATION_CHOICES)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such CLIP file or folder: {path}")
    if path.is_dir():
        return _read_folder(path, dtype, activation, shapes_only)
    kind = sniff(path)
    if kind == "torch-zip" and torchscript_prefix(path) is not None:
        sd = read_torchscript(path, dtype=dtype, shapes_only=shapes_only)
        stored = _dtypes(sd)
        return _from_openclip(path, sd, activation or "quick_gelu", "OpenAI TorchScript archive", stored)
    if kind not in ("safetensors", "torch-zip", "pickle"):
        raise ValueError(f"{path}: not a CLIP checkpoint (it looks like {kind}); expected a daguerre CLIP "
                         ".safetensors file, a transformers CLIP folder, an OpenCLIP checkpoint or OpenAI's .pt")
    if shapes_only:
        sd, meta, _ = read_shapes(path)
    else:
        sd, meta = read_state_dict(path, dtype)
    stored = _dtypes(sd)
    if meta.get("format") == CLIP_FORMAT or CLIP_CONFIG_KEY in meta:
        if activation is not None:
            raise ValueError(f"{path} is a daguerre CLIP file, which states its activation: leave activation unset")
        if CLIP_CONFIG_KEY not in meta:
            raise ValueError(f"{path}: a daguerre CLIP file without its {CLIP_CONFIG_KEY} metadata; write it again "
                             "with daguerre.checkpoints.clip_file.save_clip")
        try:
            cfg = CLIPConfig.from_json(meta[CLIP_CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: the {CLIP_CONFIG_KEY} metadata is not a valid CLIP config: {e}") from None
        return CLIPWeights(sd, cfg, "daguerre CLIP file", stored)
    sd = _strip_module_prefix(sd)
    if any(k.startswith("visual.") for k in sd):
        openai = any(k in sd for k in OPENAI_ONLY_KEYS)
        fmt = "OpenAI state dict" if openai else "OpenCLIP state dict"
        return _from_openclip(path, sd, activation or ("quick_gelu" if openai else "gelu"), fmt, stored)
    if any(k.startswith("vision_model.") for k in sd):  # transformers names without a config.json
        sd = _drop_derived(sd)
        cfg = _infer_config(path, sd, _text_config(path, sd, "transformers"), activation or "quick_gelu",
                            "inferred from shapes (transformers names, no config.json)")
        return CLIPWeights(sd, cfg, "transformers CLIP state dict", stored)
    hint = (" (a diffusion model: open it with --model)" if any(k.startswith(("model.diffusion_model.", "unet."))
                                                                 for k in sd) else "")
    raise ValueError(f"{path}: not a CLIP model{hint}: none of its {len(sd)} tensors is an image tower "
                     "(visual.* as OpenCLIP/OpenAI, vision_model.* as transformers), e.g. "
                     f"{few(sd)}")


# --- transformers --------------------------------------------------------------------------------

def clip_config_from_transformers(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                                  name: str = "transformers-clip") -> CLIPConfig:
    """The CLIPConfig of a transformers `CLIPConfig` dict (config.json), with the image mean and std of its
    `preprocessor_config.json` when given (else OpenAI's)."""
    if config.get("model_type") != "clip":
        raise ValueError(f"model_type {config.get('model_type')!r} is not a CLIP model (\"clip\"): a folder of "
                         "a whole CLIPModel is needed, not of one tower")
    text = text_config_from_transformers(dict(config))
    projection = config.get("projection_dim") or _HF_PROJECTION_DIM
    text = dataclasses.replace(text, projection_dim=projection)
    v = {**_HF_VISION_DEFAULTS, **{k: val for k, val in (config.get("vision_config") or {}).items()
                                   if val is not None}}
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], channels=v["num_channels"],
                          width=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                          mlp_dim=v["intermediate_size"], activation=v["hidden_act"],
                          layer_norm_eps=v["layer_norm_eps"])
    pre = preprocessor or {}
    scale = config.get("logit_scale_init_value")
    cfg = CLIPConfig(name=name, text_encoder=text, vision=vision,
                     logit_scale_init=_HF_LOGIT_SCALE_INIT if scale is None else scale,
                     image_mean=tuple(pre.get("image_mean") or CLIP_IMAGE_MEAN),
                     image_std=tuple(pre.get("image_std") or CLIP_IMAGE_STD))
    return CLIPConfig.from_dict(cfg.to_dict())  # types and bounds checked as any stored config


def _read_folder(folder: Path, dtype: torch.dtype | None, activation: str | None, shapes_only: bool) -> CLIPWeights:
    if (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is a diffusers pipeline folder, not a CLIP model: open it with --model")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: a folder without config.json is not a transformers CLIP folder")
    if activation is not None:
        raise ValueError(f"{folder} is a transformers folder, whose config.json states the activation: "
                         "leave activation unset")
    config = read_json(folder / "config.json", "transformers config")
    pre_file = folder / "preprocessor_config.json"
    pre = read_json(pre_file, "preprocessor config") if pre_file.is_file() else None
    try:
        cfg = clip_config_from_transformers(config, pre, name=folder.name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    sd: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        part = read_shapes(file)[0] if shapes_only else read_state_dict(file, dtype)[0]
        sd.update(part)
    stored = _dtypes(sd)
    return CLIPWeights(_drop_derived(sd), cfg, "transformers folder", stored)


def _weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a transformers folder: model.safetensors, its shards, or pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{index}: shard {name!r} is not a file name in the folder")
            files.append(folder / name)
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise FileNotFoundError(f"{folder}: no weights ({', '.join(_HF_WEIGHTS)})")


def _drop_derived(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED_KEYS}


# --- OpenCLIP / OpenAI ---------------------------------------------------------------------------

def _strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP training checkpoint's state dict without DistributedDataParallel's `module.` prefix."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def vision_state_dict_from_openclip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names of OpenCLIP's image tower (keys without `visual.`): blocks as the text tower's,
    `proj` (width, dim), applied as x @ P, as the Linear weight P^T; ValueError naming unknown keys (a
    ResNet tower, timm trunks, attention pooling and layer scale are not supported)."""
    out, unknown = {}, []
    for key, value in sd.items():
        if key in _OPENCLIP_VISION_TOP:
            out[_OPENCLIP_VISION_TOP[key]] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif (m := _BLOCK_RE.fullmatch(key)) and m.group(2) in _OPENCLIP_BLOCK:
            out[VISION_LAYER.format(m.group(1)) + _OPENCLIP_BLOCK[m.group(2)]] = value
        elif m and m.group(2) in _OPENCLIP_FUSED:
            if value.shape[0] % 3:
                raise ValueError(f"visual.{key} has {value.shape[0]} rows, not 3 x width (q, k, v stacked)")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{VISION_LAYER.format(m.group(1))}self_attn.{proj}.{_OPENCLIP_FUSED[m.group(2)]}"] = part.clone()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        else:
            unknown.append("visual." + key)
    if unknown:
        resnet = any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in unknown)
        raise ValueError(("a ResNet image tower (OpenAI RN50 etc.), which daguerre does not implement: use a ViT "
                          "CLIP; " if resnet else "") + f"unknown OpenCLIP image-tower keys: {few(unknown)}")
    return out


def _from_openclip(path: Path, sd: dict[str, torch.Tensor], activation: str, fmt: str,
                   stored: dict[str, int]) -> CLIPWeights:
    """OpenCLIP/OpenAI names -> daguerre's, with the config read from the shapes (module docstring)."""
    vision = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in OPENAI_ONLY_KEYS
            and not k.endswith(".attn_mask") and k != "logit_scale"}
    if "logit_scale" not in sd:
        raise ValueError(f"{path}: no logit_scale: an image and text tower pair without CLIP's temperature "
                         "is not a whole OpenCLIP model")
    try:
        text_cfg = text_config_from_state_dict(text, "openclip")
        out = text_state_dict_from_openclip(text, text_cfg)
        out.update(vision_state_dict_from_openclip(vision))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    out["logit_scale"] = sd["logit_scale"].reshape(())
    text_cfg = dataclasses.replace(text_cfg, skip_layers=0)  # CLIP's embedding is the last layer's
    source = "OpenAI-trained: quick_gelu" if fmt.startswith("OpenAI") else "OpenCLIP default"
    cfg = _infer_config(path, out, text_cfg, activation, f"inferred from shapes ({fmt}); activation {activation} "
                        f"({'argument' if activation != ('quick_gelu' if 'OpenAI' in fmt else 'gelu') else source})")
    return CLIPWeights(out, cfg, fmt, stored)


# --- configs from shapes -------------------------------------------------------------------------

def _text_config(path: Path, sd: Mapping[str, torch.Tensor], layout: str) -> TextEncoderConfig:
    try:
        return text_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("vision_model.")}, layout)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _infer_config(path: Path, sd: Mapping[str, torch.Tensor], text: TextEncoderConfig, activation: str,
                  how: str) -> CLIPConfig:
    """The CLIPConfig of a state dict in daguerre's names, its image tower read from the shapes."""
    need = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{path}: not a whole CLIP image tower: missing {few(missing)}")
    patch, positions, fc1, proj = (sd[k] for k in need)
    width, channels, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    grid = math.isqrt(positions.shape[0] - 1)
    if grid * grid != positions.shape[0] - 1 or width % CLIP_HEAD_DIM:
        raise ValueError(f"{path}: {positions.shape[0]} image positions (not 1 + a square grid) or width {width} "
                         f"(not a multiple of {CLIP_HEAD_DIM}): not a ViT image tower daguerre can read")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _VISION_LAYER_RE.match(k)))
    if text.projection_dim != proj.shape[0]:
        raise ValueError(f"{path}: text projection to {text.projection_dim} but image projection to "
                         f"{proj.shape[0]}: the towers do not share a joint space")
    vision = VisionConfig(image_size=grid * p, patch_size=p, channels=channels, width=width, layers=layers,
                          heads=width // CLIP_HEAD_DIM, mlp_dim=fc1.shape[0], activation=activation)
    text = dataclasses.replace(text, activation=activation)
    cfg = CLIPConfig(name=path.stem, text_encoder=text, vision=vision,
                     provenance={"source": {"file": path.name, "config": how}})
    return CLIPConfig.from_dict(cfg.to_dict())


def _dtypes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values()))


# --- description (daguerre info) -----------------------------------------------------------------

def is_clip(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a CLIP model (a daguerre CLIP file, a transformers CLIP folder, an OpenAI
    archive, or a weight file with an image tower), judged from headers and names only for safetensors."""
    path = Path(path)
    try:
        if path.is_dir():
            cfg = path / "config.json"
            return cfg.is_file() and read_json(cfg, "config").get("model_type") == "clip"
        if not path.is_file():
            return False
        kind = sniff(path)
        if kind == "torch-zip" and torchscript_prefix(path) is not None:
            return True
        if kind != "safetensors":
            return False
        shapes, meta, _ = read_shapes(path)
    except (ValueError, OSError):
        return False
    return meta.get("format") == CLIP_FORMAT or any(k.startswith(("visual.", "vision_model.")) for k in shapes)


def reads_latents(path: str | os.PathLike) -> bool:
    """Whether `path` is a daguerre noise-aware CLIP file (image_input "latents": it guides from a diffusion
    model's noisy latents and cannot score pixels), judged from its safetensors header."""
    path = Path(path)
    try:
        if not path.is_file() or sniff(path) != "safetensors":
            return False
        meta = read_shapes(path)[1]
        if meta.get("format") != CLIP_FORMAT:
            return False
        return CLIPConfig.from_json(meta[CLIP_CONFIG_KEY]).image_input == "latents"
    except (ValueError, OSError, KeyError):
        return False


def describe_clip(path: str | os.PathLike, *, hashes: bool = True) -> dict[str, Any]:
    """A JSON-ready summary of a CLIP file or folder (what `daguerre info` prints): towers, widths, patch,
    image size, parameters, joint width; the names and shapes are checked as `load_clip` checks them."""
    from ..weights.io import file_hash, short_hash

    path = Path(path)
    weights = read_clip(path, shapes_only=True)
    cfg = weights.config
    with torch.device("meta"):
        model = build_clip_model(cfg)
    check_state_dict(model.state_dict(), weights.state_dict, f"{path}: the CLIP model")
    vision_params = sum(p.numel() for n, p in model.named_parameters()
                        if n.startswith(("vision_model.", "visual_projection.", "noise_embedding.")))
    total = sum(p.numel() for p in model.parameters())
    t, v = cfg.text_encoder, cfg.vision
    is_file = path.is_file()
    size = path.stat().st_size if is_file else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "path": str(path), "kind": "clip", "format": weights.format, "name": cfg.name,
        "projection_dim": cfg.projection_dim,
        "vision": {"width": v.width, "layers": v.layers, "heads": v.heads, "mlp_dim": v.mlp_dim,
                   "patch_size": v.patch_size, "image_size": v.image_size, "activation": v.activation},
        "text": {"width": t.width, "layers": t.layers, "heads": t.heads, "mlp_dim": t.mlp_dim,
                 "max_length": t.max_length, "vocab_size": t.vocab_size, "activation": t.activation,
                 "pruned_vocabulary": None if t.token_ids is None else len(t.token_ids)},
        "parameters": {"vision": vision_params, "text": total - vision_params - 1, "total": total},
        "image_input": cfg.image_input,
        "latent_space": dataclasses.asdict(cfg.latent_space) if cfg.latent_space is not None else None,
        "stored_dtypes": weights.stored_dtypes, "file_size": size,
        "sha256": file_hash(path) if hashes and is_file else None,
        "short_hash": short_hash(path) if hashes and is_file else None,
        "config": cfg.to_dict(),
    }


def format_clip_info(info: Mapping[str, Any], human_count, human_size) -> str:
    """The human-readable form of `describe_clip`'s result (`human_count` / `human_size` format numbers)."""
    v, t, p = info["vision"], info["text"], info["parameters"]
    vocab = f"{t['vocab_size']} tokens" + (f" (pruned to {t['pruned_vocabulary']})" if t["pruned_vocabulary"] else "")
    ls = info.get("latent_space")
    unit = "latent px" if ls else "px"
    lines = [
        f"model:           {info['path']}",
        f"format:          {info['format']}",
        f"kind:            CLIP (contrastive image-text model), {info['name']}"
        + (", noise-aware (reads noisy latents and sigma)" if ls else ""),
        f"image tower:     ViT, {v['image_size']} {unit} in {v['patch_size']} {unit} patches "
        f"({(v['image_size'] // v['patch_size']) ** 2} patches), width {v['width']}, {v['layers']} layers, "
        f"{v['heads']} heads, MLP {v['mlp_dim']}, {v['activation']}",
        f"text tower:      width {t['width']}, {t['layers']} layers, {t['heads']} heads, MLP {t['mlp_dim']}, "
        f"{t['activation']}, {t['max_length']}-token window, {vocab}",
        f"joint space:     {info['projection_dim']}-d",
        *([f"latent space:    model {ls['model'] or '?'}'s latents ({info['config']['vision']['channels']} x "
           f"{v['image_size']} x {v['image_size']}, scale factor {ls['scale_factor']:.6g}), autoencoder sha256 "
           f"{ls['vae_sha256'][:16] or '?'}, sigma {ls['sigma_min']:.3g} to {ls['sigma_max']:.4g}"] if ls else []),
        f"parameters:      image {human_count(p['vision'])}, text {human_count(p['text'])}, "
        f"total {human_count(p['total'])} ({p['total']:,})",
        "stored dtypes:   " + ", ".join(f"{k} x{n}" for k, n in sorted(info["stored_dtypes"].items(),
                                                                         key=lambda kv: -kv[1])),
    ]
    source = (info["config"].get("provenance") or {}).get("source") or {}
    if source.get("config"):
        lines.append(f"config:          {source['config']}")
    lines.append(f"size:            {human_size(info['file_size'])}")
    if info["sha256"]:
        lines.append(f"sha256:          {info['sha256']}")
    return "\n".join(lines)
