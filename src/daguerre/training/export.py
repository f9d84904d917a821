"""`daguerre train export RUN`: a usable model from any stage-2 checkpoint, while the run goes on.

A training checkpoint holds everything a finished run's model file is made of (the EMA weights, the
run config, the autoencoder's path and hash), so exporting checkpoint N is resuming the run with
`train.steps = N`: no training step is left to do, and the run's own final-export code writes the model
(EMA weights, pruned vocabulary, recommended settings, provenance with the steps and training time so
far). It works on a scratch copy of the checkpoint, so the run folder is only read, and a run that is
still training is not disturbed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from ..fileio import atomic_path
from . import state
from .config import RunConfig
from .loop import RESUME_OBJECTS, check_writable

logger = logging.getLogger("daguerre.train")


def find_checkpoint(run: Path, step: int | None) -> tuple[Path, dict]:
    """(folder, meta) of checkpoint `step` of `run` (the newest that reads when None, damaged newer ones
    named in a warning); FileNotFoundError listing the others, ValueError naming a damaged file."""
    found = state.list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run} has no training checkpoints ({run / state.CHECKPOINT_DIR} is empty or missing)")
    if step is None:
        folder, meta, skipped = state.newest_intact_checkpoint(run, RESUME_OBJECTS)
        for bad, why in skipped:
            logger.warning("skipped the damaged checkpoint %s: %s", bad, why)
        if folder is None:
            raise ValueError(f"{run}: no checkpoint reads ({'; '.join(why for _, why in skipped)})")
        return folder, meta
    for s, folder in found:
        if s == step:
            return folder, state.check_checkpoint(folder, RESUME_OBJECTS)
    steps = ", ".join(str(s) for s, _ in found)
    raise FileNotFoundError(f"{run} has no checkpoint of step {step}; it has steps {steps}")


def export_checkpoint(run: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the model of stage-2 checkpoint `step` (default: the newest) of `run` to `out`
    (default: RUN/model_step_NNNNNNNN.safetensors); returns its path."""
    from .ldm import train_ldm

    run = Path(run)
    folder, meta = find_checkpoint(run, step)
    stored = meta["run_config"]
    if stored.get("stage") != "ldm":
        raise ValueError(f"{folder} is a {stored.get('stage')!r} checkpoint; export makes models of stage-2 (ldm) runs")
    step = int(meta["step"])
    if not isinstance(meta.get("vae_file"), str):
        raise ValueError(f"{folder / state.META_FILE}: no vae_file (the autoencoder the run trained on)")
    vae_file = Path(meta["vae_file"])
    if not vae_file.is_file():
        raise FileNotFoundError(f"the run's autoencoder {vae_file} is missing: the export needs the file it trained on")
    try:
        cfg = RunConfig.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder / state.META_FILE}: its run_config is not valid: {e}") from None
    cfg.train.steps = step
    cfg.train.progress = False
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir) if cfg.data.cache_dir else run / "latents")
    out = Path(out) if out is not None else run / f"model_step_{step:08d}.safetensors"
    check_writable(out.parent)  # a read-only destination is one line now, not after the export's work
    with tempfile.TemporaryDirectory(prefix="daguerre-export-") as tmp:
        scratch = Path(tmp) / "run"
        shutil.copytree(folder, scratch / state.CHECKPOINT_DIR / folder.name)
        made = train_ldm(cfg, scratch, vae_path=vae_file, resume=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as target:
            shutil.copyfile(made, target)
    return out
