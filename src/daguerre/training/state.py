"""Resumable training state: safetensors for every tensor, JSON for everything else, no pickles.

A checkpoint is a folder `RUN/checkpoints/step_00001000/` holding `state.safetensors` (model weights,
EMA weights, the optimizer's per-parameter state flattened to `optim.<name>.<param index>.<field>`,
the torch RNG state of every process as uint8 tensors, numpy's MT19937 key) and `state.json` (step,
optimizer hyper-parameters, python/numpy RNG scalars, data-stream position, the resolved run config,
timings). The folder is built under a temporary name and renamed into place (`fileio.atomic_dir`), so
a run killed at any moment leaves only complete checkpoints; the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_dir, atomic_save_safetensors
from ..untrusted import read_json, regular_file

CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
STATE_FORMAT = "daguerre-train-state-1"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / TENSORS_FILE).is_file() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(folder: str | Path, objects: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON half of checkpoint `folder`, with its format, its step and the JSON objects `objects`
    checked; ValueError naming the file when it is damaged (not JSON, nested absurdly, fields missing)."""
    path = Path(folder) / META_FILE
    meta = read_json(path, "training-state file")
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown training-state format {meta.get('format')!r}")
    m = STEP_DIR.match(Path(folder).name)
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or (m is not None and step != int(m.group(1))):
        raise ValueError(f"{path}: step {step!r} is not the step of its folder {Path(folder).name}")
    for name in objects:
        if not isinstance(meta.get(name), dict):
            raise ValueError(f"{path}: no {name} object")
    return meta


def check_checkpoint(folder: str | Path, objects: tuple[str, ...] = ()) -> dict[str, Any]:
    """The meta of checkpoint `folder` if both its files read (the tensors' header and size: a file cut
    short by a full disk or a crash is caught); ValueError naming the damaged file otherwise."""
    from ..weights.io import read_shapes

    meta = read_meta(folder, objects)
    read_shapes(Path(folder) / TENSORS_FILE)
    return meta


def newest_intact_checkpoint(
    run_dir: str | Path, objects: tuple[str, ...] = ()
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """(folder, meta) of the newest checkpoint of a run that reads (`check_checkpoint`), and the newer ones
    skipped as (folder, why); (None, None, skipped) when none does."""
    skipped: list[tuple[Path, str]] = []
    for _, folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, check_checkpoint(folder, objects), skipped
        except (ValueError, OSError) as e:
            skipped.append((folder, str(e)))
    return None, None, skipped


# --- optimizer and RNG as tensors + JSON ---------------------------------------------------------------

def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten `opt.state_dict()`: tensors to `{prefix}{param}.{field}`, the rest (hyper-parameters) to JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, fields in sd["state"].items():
        for name, value in fields.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str
) -> None:
    """Inverse of `optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    for key, value in tensors.items():
        m = pat.match(key)
        if m:
            state.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for idx, fields in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(fields)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch / numpy / python RNG states as (tensors, JSON)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_version, list(py_state), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


# --- the checkpoint folder -------------------------------------------------------------------------------

def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep_last: int,
    keep_every: int = 0,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last` and, with
    `keep_every` > 0, those whose step is a multiple of `keep_every`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        atomic_save_safetensors(tensors, tmp / TENSORS_FILE, {"format": STATE_FORMAT})
        (tmp / META_FILE).write_text(json.dumps({"format": STATE_FORMAT, **meta}, indent=1), encoding="utf-8")
    # only checkpoints up to this one count: a newer one left by an earlier session (damaged, so the run
    # resumed before it) is no reason to delete the one just written; it is replaced when the run gets there
    for old_step, old in [c for c in list_checkpoints(run_dir) if c[0] <= step][:-keep_last]:
        if not (keep_every > 0 and old_step % keep_every == 0):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON meta) of a checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TENSORS_FILE).is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {TENSORS_FILE} / {META_FILE})")
    meta = read_meta(folder)
    path = regular_file(folder / TENSORS_FILE, "training-state file")
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); truncated or corrupt?") from None


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def load_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(sd, strict=True)
