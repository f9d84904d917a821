"""The training loop, `run(stage, cfg, out)`, and what it is made of: run folder, AdamW with warm-up + cosine
decay, clipping, precision, and saving / restoring the whole training state (weights, EMA, optimizers, RNGs,
data position). A `Stage` (`vae.VAEStage`, `ldm.LDMStage`) supplies build / step / sample / export; `run` owns
set-up, resume and training phases, EMA, DDP gradient sync, gradient accumulation, logging, the sample grids'
schedule and checkpoints (the shape of nanoGPT's loop and DiT's `main`).

A SIGINT or SIGTERM while the loop trains stops it after the current step with a checkpoint of that step
(`TrainingInterrupted` names it); a second one, or one during set-up, interrupts at once (KeyboardInterrupt).
A run resumed when it has already finished keeps its final file as it is (`export.json` records which file
the end of the run wrote), so a model trained on that file can still resume on it.

Learning rate of optimizer step s (0-based): lr (s + 1) / warmup during warm-up, then
min_lr + (lr - min_lr) (1 + cos(pi p)) / 2 with p = (s - warmup) / (steps - warmup) (Loshchilov & Hutter
2017, SGDR without restarts), or lr flat with `decay = "constant"`. AdamW is Loshchilov & Hutter 2019.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write_text, probe_write
from . import dist, state
from .config import RunConfig, TrainConfig, load_run_config, to_jsonable, upgrade_run_dict
from .data import RANDOM_SPLIT, TrainData, checkpoint_split, load_train_data
from .ema import EMA
from .init import check_init_source
from .log import RunLogger, setup_logging, teardown_logging, truncate_metrics

logger = logging.getLogger("daguerre.train")
CONFIG_FILE = "config.json"
EXPORT_RECORD = "export.json"  # {"file", "step", "sha256"} of the final file the end of the run wrote
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# run-config keys that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.sample_every", "train.eval_every",
                     "train.checkpoint_every", "train.keep_last", "train.keep_every", "train.tensorboard",
                     "train.progress", "train.threads", "data.workers", "train.save_dtype", "data.cache_dir",
                     "train.device", "train.prune_vocabulary", "train.init_from")
# keys that may change between two sessions of a run as a new training phase (what is learned from here
# on, not what the model is): each change is logged and kept in the run's config history
PHASE_CHANGES = ("loss.offset_noise", "loss.min_snr_gamma", "loss.caption_dropout", "loss.timestep_bias",
                 "loss.timestep_bias_multiplier", "loss.timestep_bias_portion", "loss.timestep_bias_begin",
                 "loss.timestep_bias_end",
                 "data.shapes.min_objects", "data.shapes.max_objects", "data.shapes.p_relation",
                 "model.schedule.prediction_type", "model.schedule.zero_terminal_snr")
# a phase that changes what the network predicts also restarts the EMA (its warm-up from update 0): an
# average with weights trained for the old target is no model of the new one
RESTARTS_EMA = ("model.schedule.prediction_type", "model.schedule.zero_terminal_snr")
# the JSON objects of a checkpoint's state.json that a resume reads (besides step and format)
RESUME_OBJECTS = ("run_config", "optimizers", "ema_updates")


def lr_at(step: int, t: TrainConfig, peak: float | None = None) -> float:
    """The learning rate of optimizer step `step` (module docstring)."""
    lr = t.lr if peak is None else peak
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.decay == "constant":
        return lr
    span = max(1, t.steps - t.warmup_steps)
    p = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + (lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_optimizer(params: Iterable[nn.Parameter] | list[dict], t: TrainConfig,
                   lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over `params` (the single-tensor implementation: bitwise reproducible on the CPU); `params` may be
    parameter groups, each with an `lr_scale` (its learning rate = the schedule's x lr_scale, `set_lr`)."""
    return torch.optim.AdamW(
        list(params), lr=t.lr if lr is None else lr, betas=tuple(t.betas), eps=t.eps,
        weight_decay=t.weight_decay, foreach=False,
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0 = only measure it); returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=False))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast of a forward pass on `device` (a null context when off)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_threads(t: TrainConfig) -> None:
    if t.threads > 0:
        torch.set_num_threads(t.threads)


def seed_everything(seed: int, rank: int) -> None:
    """Seed the global torch / numpy / python RNGs of this process (the loops draw from their own
    per-sample generators; this makes anything else, and the RNG states a checkpoint stores, reproducible)."""
    import random

    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "provenance":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Resume:
    """Where a session starts: the checkpoint to continue from (None: step 0) and its meta, the
    training-phase changes of the config since it ([{"key", "from", "to"}]), and the newer checkpoints
    skipped because they are damaged ([(folder, why)])."""

    folder: Path | None = None
    meta: dict[str, Any] | None = None
    phase: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it: a read-only, full-inode or inaccessible output folder is one line
    naming it before any work (as root, permission bits do not stop a write: only trying does)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the output folder {folder} is a file: choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_write(folder)
    except OSError as e:
        raise ValueError(f"cannot write in the output folder {folder} ({e.strerror or e}): choose another "
                         "--out or fix its permissions") from None


def prepare_run_dir(out: Path, cfg: RunConfig, resume: bool, env: dist.DistEnv,
                    until: int | None = None) -> Resume:
    """Create the run folder; return where to start (`Resume`).

    Refuses to overwrite a run that has checkpoints unless `resume`. On resume the newest checkpoint
    that reads is used (damaged newer ones are skipped, named and kept); its stored config must match
    the current one except for the keys in RESUMABLE_CHANGES and PHASE_CHANGES, and a pause step
    `until` must lie beyond it (checked here, before any slow set-up).
    """
    latest = state.latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already holds a run (checkpoints up to {latest.name}): pass --resume to "
                         "continue it, or choose another --out")
    if env.is_main:
        check_writable(out)
    dist.barrier()
    if latest is None:
        if resume:
            logger.info("--resume: no checkpoint in %s yet, starting at step 0", out)
        return Resume()
    latest, meta, skipped = state.newest_intact_checkpoint(out, RESUME_OBJECTS)
    if latest is None:
        why = "; ".join(f"{folder.name}: {reason}" for folder, reason in skipped)
        raise ValueError(f"cannot resume {out}: no checkpoint reads ({why}); move the damaged ones away to start "
                         "again, or choose another --out")
    stop_step(int(meta["step"]), cfg.train.steps, until)
    stored = upgrade_run_dict(meta["run_config"])  # the previous release's flat [data] keys in their sections
    old, new = flat(stored), flat(to_jsonable(cfg.to_dict()))
    # a key the stored config lacks was added by a newer daguerre: the run used what is now its default
    default = flat(to_jsonable(load_run_config(None, cfg.stage).to_dict()))
    old = {**{k: default.get(k) for k in set(new) - set(old)}, **old}
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
                    and not k.startswith("sample."))  # the sample grids' settings never touch the weights
    changed = [k for k in differ if k not in PHASE_CHANGES]
    if changed:
        k = changed[0]
        raise ValueError(f"cannot resume {out}: config key {k} was {old.get(k)!r} and is now {new.get(k)!r} "
                         f"({len(changed)} keys differ); resume with the run's own: --config {out / CONFIG_FILE}")
    return Resume(latest, meta, [{"key": k, "from": old.get(k), "to": new.get(k)} for k in differ], skipped)


def write_config(out: Path, cfg: RunConfig, env: dist.DistEnv) -> None:
    if env.is_main:
        atomic_write_text(out / CONFIG_FILE, json.dumps(to_jsonable(cfg.to_dict()), indent=1, sort_keys=True))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def wrap_ddp(model: nn.Module, env: dist.DistEnv) -> nn.Module:
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


class TrainingState:
    """The named pieces of a run (modules, EMAs, optimizers) and their checkpointing."""

    def __init__(
        self, modules: dict[str, nn.Module], emas: dict[str, EMA], optimizers: dict[str, torch.optim.Optimizer]
    ) -> None:
        self.modules, self.emas, self.optimizers = modules, emas, optimizers
        self.elapsed = 0.0  # training seconds of the run so far, over all sessions
        self.history: list[dict[str, Any]] = []  # training-phase config changes: {"step", "key", "from", "to"}
        self._session_start = time.perf_counter()

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self._session_start

    def save(self, run_dir: Path, step: int, cfg: RunConfig, sampler: dist.StreamSampler, env: dist.DistEnv,
             extra: dict[str, Any] | None = None) -> None:
        """Checkpoint `step` (steps done). Collective: every process must call it (RNG states are gathered)."""
        rng_tensors, rng_meta = state.rng_state()
        gathered = dist.all_gather_objects((rng_tensors, rng_meta))
        if not env.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"step": step, "world": env.world, "run_config": to_jsonable(cfg.to_dict()),
                                "sampler": sampler.state(step), "seconds": self.seconds(), "optimizers": {},
                                "ema_updates": {}, "rng": [], "config_history": self.history, **(extra or {})}
        for name, m in self.modules.items():
            tensors.update(state.module_tensors(unwrap(m), f"model.{name}."))
        for name, e in self.emas.items():
            tensors.update(e.state_tensors(f"ema.{name}."))
            meta["ema_updates"][name] = e.num_updates
        for name, opt in self.optimizers.items():
            t, m = state.optimizer_state(opt, f"optim.{name}.")
            tensors.update(t)
            meta["optimizers"][name] = m
        for rank, (t, m) in enumerate(gathered):
            tensors.update({f"rng.{rank}.{k}": v for k, v in t.items()})
            meta["rng"].append(m)
        path = state.save_checkpoint(run_dir, step, tensors, meta, cfg.train.keep_last, cfg.train.keep_every)
        logger.info("checkpoint %s", path)

    def load(self, folder: Path, env: dist.DistEnv) -> tuple[int, dict[str, Any]]:
        """Restore everything from checkpoint `folder`; returns (step, meta). A checkpoint whose contents
        do not fit the run is one ValueError naming it."""
        tensors, meta = state.load_checkpoint(folder)
        try:
            self._restore(tensors, meta, env)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {folder}: its state does not fit this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self._session_start = time.perf_counter()
        logger.info("resumed from step %d (checkpoint %s)", meta["step"], folder)
        return int(meta["step"]), meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], env: dist.DistEnv) -> None:
        for name, m in self.modules.items():
            state.load_module_tensors(unwrap(m), tensors, f"model.{name}.")
        for name, e in self.emas.items():
            e.load_tensors(tensors, f"ema.{name}.", meta["ema_updates"][name])
        for name, opt in self.optimizers.items():
            state.load_optimizer_state(opt, tensors, meta["optimizers"][name], f"optim.{name}.")
        rank = env.rank if meta["world"] == env.world else 0
        if meta["world"] != env.world:
            logger.warning("resuming a %d-process run on %d processes: the data order changes from here on",
                           meta["world"], env.world)
        prefix = f"rng.{rank}."
        state.set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["rng"][rank])
        self.elapsed = float(meta.get("seconds", 0.0))
        self.history = list(meta.get("config_history", []))


def resume_state(ts: TrainingState, resume: Resume, env: dist.DistEnv) -> tuple[int, dict[str, Any] | None]:
    """Load the checkpoint of `resume` into `ts` (step 0 and no meta when there is none) and record the
    phase changes of this resume in its config history."""
    for folder, why in resume.skipped:  # logged here, after the run's log file is set up
        logger.warning("skipped the damaged checkpoint %s (left in place until the run rewrites that step): %s",
                       folder, why)
    if resume.folder is None:
        return 0, None
    start, meta = ts.load(resume.folder, env)
    phase = resume.phase
    for c in phase:
        logger.warning("config key %s changes from %r to %r at step %d: a new training phase, kept in the run's "
                       "config history", c["key"], c["from"], c["to"], start)
    ts.history += [{"step": start, **c} for c in phase]
    if any(c["key"] in RESTARTS_EMA for c in phase):
        for e in ts.emas.values():
            e.num_updates = 0
        logger.warning("the prediction target changed: the EMA of the weights restarts its warm-up at step %d", start)
    return start, meta


def stop_step(start: int, steps: int, until: int | None) -> int:
    """The step this session ends at: `train.steps`, or `until` (a pause: checkpoint, no final model)."""
    if start > steps:
        raise ValueError(f"the run is already at step {start}, beyond train.steps {steps}: set train.steps to "
                         f"{start} or more (--set train.steps=N)")
    if until is None:
        return steps
    if until <= start:
        raise ValueError(f"--until {until}: the run is already at step {start}; give a later step "
                         f"(train.steps is {steps})")
    return min(until, steps)


def paused(out: Path, step: int, steps: int, env: dist.DistEnv) -> Path:
    """End a session at `step` < train.steps (`--until`): the checkpoint of `step`, which --resume continues."""
    dist.barrier()
    folder = out / state.CHECKPOINT_DIR / state.step_dir_name(step)
    logger.info("paused at step %d of %d: checkpoint %s; continue with --resume", step, steps, folder)
    return folder


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (`signal_name`, "SIGINT" or "SIGTERM") after `step` steps, checkpointed in
    `checkpoint`, which --resume continues from."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: stopped after step {step}, checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopSignals:
    """SIGINT / SIGTERM handlers for a training session (main thread only; a signal the process ignores stays
    ignored). While `armed` (the loop trains) the first signal is only noted: `requested` tells the loop, which
    stops after the step; a second, or one while not armed, raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.armed = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if not self.armed or self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: stopping after this step with a checkpoint (%s again stops at once, losing the steps "
                       "since the last checkpoint)", self.signal_name, self.signal_name)

    def requested(self) -> bool:
        """Whether any process got a stop signal (collective: every process calls it at every step)."""
        flag = torch.tensor([1.0 if self.signal_name is not None else 0.0], dtype=torch.float64)
        return bool(dist.all_reduce_mean_(flag)[0] > 0)


def finished_output(out: Path, output: str, checkpoint: Path, step: int) -> Path | None:
    """RUN/`output` when the end of the run wrote it after the final `checkpoint` (of step `step`) and it is
    unchanged since: as EXPORT_RECORD says, or for a run finished before that record, the file is newer than
    the checkpoint."""
    from ..untrusted import read_json
    from ..weights.io import file_hash

    path, record = out / output, out / EXPORT_RECORD
    if not path.is_file():
        return None
    if not record.is_file():
        return path if path.stat().st_mtime_ns >= (checkpoint / state.META_FILE).stat().st_mtime_ns else None
    try:
        done = read_json(record, "export record")
    except ValueError:
        return None
    if done.get("file") != output or done.get("step") != step or done.get("sha256") != file_hash(path):
        return None
    return path


def record_output(out: Path, path: Path, step: int) -> None:
    """Note in RUN/EXPORT_RECORD which final file the end of the run wrote at `step` (its sha256)."""
    from ..weights.io import file_hash

    atomic_write_text(out / EXPORT_RECORD, json.dumps({"file": path.name, "step": step, "sha256": file_hash(path)}))


def due(step: int, every: int, last: int) -> bool:
    """Whether an every-N action is due after `step` steps (always at the last step)."""
    return step == last or (every > 0 and step % every == 0)


# --- the loop ----------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What a stage's `build` gets: the run config and folder, this process, the data, and whether the run
    starts at step 0 (no checkpoint: `train.init_from` applies)."""

    cfg: RunConfig
    out: Path
    env: dist.DistEnv
    data: TrainData
    fresh: bool


@dataclass
class RunSummary:
    """What a stage's `export` records of the run: training seconds, phase history, images per step, processes."""

    seconds: float
    history: list[dict[str, Any]]
    global_batch: int
    world: int


class Stage(Protocol):
    """A training stage (autoencoder, latent diffusion): what `run` needs from it.

    `prepare` loads what can fail before the run folder is made; `build` makes the networks (`modules`,
    checkpointed as model.<name>.*), their `optimizers` (learning-rate peak `peak_lr[name]`, default
    train.lr) and the data `pool` the stream samples; `ema_targets` get an EMA, `evaluated` are the modules
    whose EMA copies `sample` and `export` read. `step` runs one micro-batch forward and backward (gradients
    only; `run` steps the optimizers) and returns its metrics."""

    output: str
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    peak_lr: dict[str, float]
    ema_targets: tuple[str, ...]
    evaluated: tuple[str, ...]
    pool: np.ndarray

    def prepare(self, env: dist.DistEnv) -> None: ...
    def build(self, setup: Setup) -> None: ...
    def resumed(self, meta: dict[str, Any]) -> None: ...
    def describe(self, env: dist.DistEnv) -> str: ...
    def begin(self, sampler: dist.StreamSampler, start: int) -> None: ...
    def step(self, step: int, micro: int, sync: bool) -> dict[str, float]: ...
    def sample(self, step: int, models: dict[str, nn.Module], runlog: RunLogger, *, grid: bool,
               evaluate: bool) -> None: ...
    def checkpoint_meta(self) -> dict[str, Any]: ...
    def export(self, path: Path, models: dict[str, nn.Module], summary: RunSummary) -> None: ...


def run(stage: Stage, cfg: RunConfig, out: str | Path, *, resume: bool = False, until: int | None = None) -> Path:
    """Train `stage` as configured; returns RUN/<stage.output>, or with `until` < train.steps the checkpoint of
    step `until` (a pause: resume later with `resume`)."""
    env = dist.init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    try:
        with StopSignals() as stop:
            return _run(stage, cfg, Path(out), resume, until, env, stop)
    finally:
        dist.shutdown()
        teardown_logging()
        torch.set_num_threads(threads)


def _run(stage: Stage, cfg: RunConfig, out: Path, resume: bool, until: int | None, env: dist.DistEnv,
         stop: StopSignals) -> Path:
    t = cfg.train
    configure_threads(t)
    stage.prepare(env)
    resume_from = prepare_run_dir(out, cfg, resume, env, until)
    if resume_from.folder is None:
        check_init_source(t.init_from)
    setup_logging(out, env.is_main)
    split = RANDOM_SPLIT
    if resume_from.meta is not None:
        finished = int(resume_from.meta["step"]) == t.steps
        kept = finished_output(out, stage.output, resume_from.folder, t.steps) if finished else None
        if kept is not None:  # rewriting it would change its hash: a model trained on it could no longer resume
            logger.info("the run finished at step %d: %s is kept as it is (raise train.steps to train on)",
                        t.steps, kept)
            return kept
        split = checkpoint_split(resume_from.meta)  # a run keeps the held-out split it began with
    data = load_train_data(cfg.data, split)
    seed_everything(t.seed, env.rank)
    stage.build(Setup(cfg, out, env, data, fresh=resume_from.folder is None))
    modules, optimizers = stage.modules, stage.optimizers
    emas = {name: EMA(modules[name], t.ema_decay, t.ema_warmup) for name in stage.ema_targets}
    ts = TrainingState(modules, emas, optimizers)
    start, meta = resume_state(ts, resume_from, env)
    if meta is not None:
        stage.resumed(meta)  # (a stage may refuse the checkpoint here)
        if env.is_main:
            truncate_metrics(out, start)
    write_config(out, cfg, env)
    logger.info(stage.describe(env))
    sampler = dist.StreamSampler(stage.pool, t.seed, t.batch_size, env.world, env.rank, t.grad_accum)
    copies = {n: copy.deepcopy(modules[n]).eval().requires_grad_(False) for n in stage.evaluated} if env.is_main else {}

    def ema_models() -> dict[str, nn.Module]:
        for name, e in emas.items():
            if name in copies:
                e.copy_to(copies[name])
        return copies

    def checkpoint_meta() -> dict[str, Any]:
        return {**stage.checkpoint_meta(), "split": data.split}  # the split: a resume keeps it

    runlog = RunLogger(out, enabled=env.is_main, start=start, total=t.steps, images_per_step=sampler.global_batch,
                       progress=t.progress, tensorboard=t.tensorboard)
    stage.begin(sampler, start)
    end = stop_step(start, t.steps, until)
    stop.armed = True
    for step in range(start, end):
        for name, opt in optimizers.items():
            set_lr(opt, lr_at(step, t, stage.peak_lr.get(name)))
        sums: dict[str, float] = defaultdict(float)
        for micro in range(t.grad_accum):  # gradient accumulation: DDP syncs on the last micro-batch
            for k, v in stage.step(step, micro, micro == t.grad_accum - 1).items():
                sums[k] += v
        norms = []
        for opt in optimizers.values():
            norms.append(clip_gradients([p for g in opt.param_groups for p in g["params"]], t.grad_clip))
            opt.step()  # (a no-op for an optimizer whose parameters got no gradient, e.g. a GAN not started)
            opt.zero_grad(set_to_none=True)
        for name, e in emas.items():
            e.update(modules[name])
        done = step + 1
        avg = {k: v / t.grad_accum for k, v in sums.items()}
        runlog.add({**avg, "grad_norm": norms[0]})
        runlog.step(done, avg["loss"])
        if due(done, t.log_every, t.steps):
            means = runlog.take_means()  # over the steps since the last line, averaged over processes
            vals = dist.all_reduce_mean_(torch.tensor(list(means.values()), dtype=torch.float64))
            lr = next(iter(optimizers.values())).param_groups[0]["lr"]
            runlog.log(done, {**dict(zip(means, vals.tolist(), strict=True)), "lr": lr,
                              "images_per_s": runlog.images_per_second(done)}, echo=True)
        grid, evaluate = due(done, t.sample_every, t.steps), due(done, t.eval_every, t.steps)
        if env.is_main and (grid or evaluate):
            stage.sample(done, ema_models(), runlog, grid=grid, evaluate=evaluate)
        saved = due(done, t.checkpoint_every, end)  # end: train.steps, or the pause of --until
        if saved:
            ts.save(out, done, cfg, sampler, env, extra=checkpoint_meta())
        if stop.requested():  # SIGINT / SIGTERM: a checkpoint of this step, then stop
            if not saved:
                ts.save(out, done, cfg, sampler, env, extra=checkpoint_meta())
            runlog.close()
            dist.barrier()
            folder = out / state.CHECKPOINT_DIR / state.step_dir_name(done)
            name = stop.signal_name or "a stop signal of another process"
            logger.warning("stopped by %s after step %d of %d: checkpoint %s", name, done, t.steps, folder)
            raise TrainingInterrupted(stop.signal_name or "SIGTERM", done, folder)
    stop.armed = False
    runlog.close()
    if end < t.steps:
        return paused(out, end, t.steps, env)
    path = out / stage.output
    if env.is_main:
        stage.export(path, ema_models(), RunSummary(ts.seconds(), ts.history, sampler.global_batch, env.world))
        record_output(out, path, t.steps)
    dist.barrier()
    return path
