"""The compression study (issue 19, point 3; docs/experiments/compression.md): how the first stage's down-sampling
factor f and its regulariser (KL or VQ) trade reconstruction against the cost and quality of latent diffusion.

For every cell (data set x regulariser x f in 1, 2, 4, 8) the driver runs daguerre's own commands, each once:

    daguerre train vae --config <data>_vae --set model.vae.channel_mult=... [--set model.regularizer=vq ...]
    daguerre train ldm --config <data>_ldm --vae CELL/vae/vae.safetensors ...   (checkpoints kept every eval_every)
    daguerre train export CELL/ldm --step S                                      (for each kept step S)
    daguerre eval --model CELL/models/step_S.safetensors ...                     (FD against its floor, adherence)

and records the CPU time of each (the children's user + system time, `getrusage`; also the wall time). The first
stage's reconstruction (held-out PSNR / SSIM, VQ code use) comes from the VAE file's provenance; the rate is the
latent size. `report` gathers what is measured into results.json, a Markdown table and three plots (matplotlib):
the rate-distortion trade-off, sample quality against LDM training steps per f (the LDM paper's Fig. 6), and
against CPU time.

    python bench/compression_study.py run --out runs/compression [--cells fashion-kl-f4,...] [budget flags]
    python bench/compression_study.py report --out runs/compression --png-dir docs/images/compression
    python bench/compression_study.py status --out runs/compression
    python bench/compression_study.py steptimes --cells fashion-kl-f1,...   # CPU s per step: the budget's basis

Every task is skipped when its output exists and every training resumes from its newest checkpoint (`--resume`),
so the same `run` command continues a stopped study (SIGTERM: the running command gets it and checkpoints). The
budget is written to OUT/budget.json by the first run and read back by later ones; a different budget for the
same folder is refused. Run it with OMP_NUM_THREADS=1 (the configs train on one thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FACTORS = (1, 2, 4, 8)
REGULARIZERS = ("kl", "vq")
# the autoencoder's channel_mult per f (len - 1 down-samplings), the same for both data sets
CHANNEL_MULT = {1: (1,), 2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4)}
LATENT_CHANNELS = 4  # every cell's latent channels (KL posterior / VQ code dimension)
MAIN_CRITERION = {"single": "shape_colour", "relation": "relation", "class": "class"}  # daguerre eval's verdicts


@dataclass(frozen=True)
class DataSet:
    """A data set of the study: its shipped run configs and what the study changes in both stages."""

    name: str
    vae_config: str
    ldm_config: str
    channels: int
    size: int
    data_sets: tuple[str, ...]  # --set for both stages (the same images)
    ldm_sets: tuple[str, ...]  # --set for stage 2 only
    eval_args: tuple[str, ...]  # extra daguerre eval arguments


DATASETS = {
    # 32 px shapes scenes (the shipped model's 64 px would make f = 1 sixteen times dearer); 8000 images are
    # enough for the budget's ~19k samples and keep the latent cache of f = 1 short
    "shapes": DataSet("shapes", "shapes_vae", "shapes_ldm", 3, 32, ("data.size=32", "data.shapes.n=8000"), (),
                      ("--prompts", "single")),
    # attention only at the second level: at f = 1 the first level is 32x32 (1024 tokens), 3.7x the step time
    "fashion": DataSet("fashion", "fashion_vae", "fashion_ldm", 1, 32, ("data.size=32",),
                       ("model.unet.attention_levels=[1]",), ()),
}


@dataclass(frozen=True)
class Budget:
    """What every cell gets: the same steps for each stage, the same evaluation."""

    vae_steps: int = 600
    ldm_steps: int = 600
    ldm_batch: int = 32
    eval_every: int = 200  # LDM checkpoints kept, exported and evaluated at these steps
    eval_n: int = 100  # daguerre eval --n
    sample_steps: int = 20  # daguerre eval --steps
    codebook_size: int = 512  # VQ cells: codes (EMA updates, dead-code restart)

    def eval_steps(self) -> list[int]:
        return list(range(self.eval_every, self.ldm_steps + 1, self.eval_every))

    def check(self) -> Budget:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"budget {f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.ldm_steps % self.eval_every:
            raise ValueError(f"budget eval_every {self.eval_every} must divide ldm_steps {self.ldm_steps}")
        return self


@dataclass(frozen=True)
class Cell:
    dataset: str
    regularizer: str
    f: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.regularizer}-f{self.f}"

    @classmethod
    def parse(cls, name: str) -> Cell:
        try:
            dataset, reg, f = name.split("-")
            cell = cls(dataset, reg, int(f.removeprefix("f")))
        except ValueError:
            raise ValueError(f"cell {name!r}: expected DATASET-REG-fN, e.g. fashion-kl-f4") from None
        if dataset not in DATASETS or reg not in REGULARIZERS or cell.f not in FACTORS:
            raise ValueError(f"cell {name!r}: data set one of {sorted(DATASETS)}, regulariser one of "
                             f"{list(REGULARIZERS)}, f one of {list(FACTORS)}")
        return cell

    def latent(self) -> tuple[int, int, int]:
        side = DATASETS[self.dataset].size // self.f
        return LATENT_CHANNELS, side, side

    def rate(self, budget: Budget) -> dict[str, float]:
        """The latent's size: values per image, per pixel value, and (VQ) bits per image."""
        c, h, w = self.latent()
        ds = DATASETS[self.dataset]
        out = {"latent_values": c * h * w, "values_per_pixel_value": c * h * w / (ds.size**2 * ds.channels)}
        if self.regularizer == "vq":
            out["bits"] = h * w * math.log2(budget.codebook_size)
        return out


def all_cells() -> list[Cell]:
    """Cheap cells first (large f), so a partial study already has every data set's trend."""
    return [Cell(d, r, f) for d in DATASETS for f in sorted(FACTORS, reverse=True) for r in REGULARIZERS]


# --- the tasks of one cell --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    output: Path  # exists = done
    command: list[str]


def daguerre(*words: str) -> list[str]:
    return [sys.executable, "-m", "daguerre", *words]


def _sets(pairs: Sequence[str]) -> list[str]:
    return [w for p in pairs for w in ("--set", p)]


def vae_sets(cell: Cell, budget: Budget) -> list[str]:
    ds = DATASETS[cell.dataset]
    mult = ",".join(str(m) for m in CHANNEL_MULT[cell.f])
    pairs = [*ds.data_sets, f"model.vae.channel_mult=[{mult}]", f"model.vae.latent_channels={LATENT_CHANNELS}",
             f"train.steps={budget.vae_steps}", "train.warmup_steps=100", "train.eval_every=200",
             "train.sample_every=0", "train.checkpoint_every=100", "train.keep_last=2", "train.progress=false"]
    if cell.regularizer == "vq":
        pairs += ["model.regularizer=vq", f"model.codebook_size={budget.codebook_size}", "loss.codebook_ema=0.99",
                  "loss.codebook_restart=100"]
    return pairs


def ldm_sets(cell: Cell, budget: Budget) -> list[str]:
    ds = DATASETS[cell.dataset]
    return [*ds.data_sets, *ds.ldm_sets, f"train.steps={budget.ldm_steps}", f"train.batch_size={budget.ldm_batch}",
            "train.warmup_steps=100", "train.sample_every=0", "train.checkpoint_every=100", "train.keep_last=2",
            f"train.keep_every={budget.eval_every}", "train.progress=false", "train.save_dtype=float32"]


def cell_tasks(cell: Cell, budget: Budget, out: Path) -> list[Task]:
    ds, d = DATASETS[cell.dataset], out / cell.name
    vae = d / "vae" / "vae.safetensors"
    tasks = [
        Task("vae", vae, daguerre("train", "vae", "--config", ds.vae_config, "--out", str(d / "vae"), "--resume",
                                  *_sets(vae_sets(cell, budget)))),
        Task("recon", d / "recon.json",
             [sys.executable, str(Path(__file__).resolve()), "recon", "--vae", str(vae), "--dataset", cell.dataset,
              "--n", str(budget.eval_n), "--json", str(d / "recon.json")]),
        Task("ldm", d / "ldm" / "model.safetensors",
             daguerre("train", "ldm", "--config", ds.ldm_config, "--vae", str(vae), "--out", str(d / "ldm"),
                      "--resume", *_sets(ldm_sets(cell, budget)))),
    ]
    for step in budget.eval_steps():
        model = d / "models" / f"step_{step}.safetensors"
        tasks.append(Task(f"export@{step}", model, daguerre("train", "export", str(d / "ldm"), "--step", str(step),
                                                            "--out", str(model))))
        report = d / "eval" / f"step_{step}"
        tasks.append(Task(f"eval@{step}", report / "report.json",
                          daguerre("eval", "--model", str(model), "--n", str(budget.eval_n), "--steps",
                                   str(budget.sample_steps), "--out", str(report), "--overwrite", *ds.eval_args)))
    return tasks


# --- running ----------------------------------------------------------------------------------------------------

Runner = Callable[[list[str], Path], tuple[int, float, float]]  # (command, log) -> (exit status, cpu s, wall s)
_child: list[subprocess.Popen] = []
_stopping: list[bool] = []  # set by SIGTERM


def run_command(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run `command` with its output appended to `log`: (exit status, its CPU seconds, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        _child.append(proc)
        try:
            status = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint
            _stopping.append(True)
            status = proc.wait()
        finally:
            _child.remove(proc)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return status, cpu, time.perf_counter() - t0


def _forward_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: the running command gets it (a training run checkpoints); the driver stops when it has ended."""
    _stopping.append(True)
    for proc in list(_child):
        proc.send_signal(signal.SIGTERM)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def add_time(cell_dir: Path, task: str, cpu: float, wall: float, done: bool) -> None:
    """Accumulate a task's CPU and wall seconds in CELL/timing.json (a resumed task adds its segments)."""
    path = cell_dir / "timing.json"
    timing = _read_json(path) or {}
    entry = timing.setdefault(task, {"cpu_s": 0.0, "wall_s": 0.0, "segments": 0, "done": False})
    entry["cpu_s"] += cpu
    entry["wall_s"] += wall
    entry["segments"] += 1
    entry["done"] = done
    _write_json(path, timing)


def vae_metrics(vae_file: Path) -> dict[str, Any]:
    """Held-out PSNR / SSIM (and VQ code use) and training facts from a VAE file's provenance (safetensors
    metadata: nothing is loaded)."""
    from safetensors import safe_open

    with safe_open(str(vae_file), "pt") as f:
        config = json.loads(f.metadata()["daguerre_config"])
    prov = config.get("provenance", {})
    return {"holdout": prov.get("holdout_metrics", {}), "parameters": prov.get("parameters"),
            "scale_factor": config["vae"]["scale_factor"], "training_seconds": prov.get("training_seconds")}


RECON_SEED = 7  # the reconstructed images: not the eval's reference (seed 0) nor its floor


def reconstruction_fd(vae_file: Path, dataset: str, n: int) -> dict[str, Any]:
    """The Frechet distance of the autoencoder's reconstructions (issue 19): `n` images of the study's size
    (shapes rendered at 32 px; Fashion-MNIST's padded 32 px, train split) through encode -> posterior mode ->
    (VQ: quantise) -> decode, measured as `daguerre eval` measures samples (the shipped classifier's features,
    the same 1000 reference images), beside the same images unreconstructed (what a perfect autoencoder gets:
    this set's FD floor)."""
    import torch

    from daguerre.checkpoints.vae_file import load_vae
    from daguerre.data.shapes import sample_prompts
    from daguerre.metrics.evaluate import REAL_KEY, fashion_reference, shapes_reference
    from daguerre.metrics.extractors import load_extractor
    from daguerre.metrics.stats import feature_statistics, frechet_distance
    from daguerre.metrics.train_classifier import render_scenes
    from daguerre.training.vae import evaluate_vae

    size = DATASETS[dataset].size
    if dataset == "shapes":
        kind = DATASETS[dataset].eval_args[-1]
        images = render_scenes([p.scene for p in sample_prompts(kind, n, REAL_KEY + RECON_SEED)], size)
        real = shapes_reference((kind,), 1000, REAL_KEY)
        extractor = load_extractor("default", "shapes")
    else:
        images = fashion_reference("train", n, RECON_SEED)
        real = fashion_reference("test", 1000, 0)
        extractor = load_extractor("default", "fashion_mnist")
    vae, _ = load_vae(vae_file)
    with torch.no_grad():
        rec, metrics = evaluate_vae(vae.eval(), images)
        stats_real = feature_statistics(extractor.features(real).double().numpy())
        fd = {name: frechet_distance(*feature_statistics(extractor.features(x).double().numpy()), *stats_real)
              for name, x in (("reconstructed", rec.clamp(-1, 1)), ("input", images))}
    return {"n": n, "size": size, "fd": fd["reconstructed"], "fd_input": fd["input"], **metrics,
            "extractor": extractor.name}


def budget_for(out: Path, given: dict[str, int]) -> Budget:
    """The folder's budget (OUT/budget.json), or a new one from the defaults and `given`; a conflict is refused."""
    path = out / "budget.json"
    saved = _read_json(path)
    if saved is None:
        budget = Budget(**given).check()
        _write_json(path, dataclasses.asdict(budget))
        return budget
    budget = Budget(**saved).check()
    clash = {k: (v, saved[k]) for k, v in given.items() if saved.get(k) != v}
    if clash:
        what = ", ".join(f"{k}: given {a}, saved {b}" for k, (a, b) in clash.items())
        raise ValueError(f"{path} holds another budget ({what}): resume with the same flags (or none), or choose "
                         "another --out")
    return budget


def run_cells(out: Path, cells: Sequence[Cell], budget: Budget, runner: Runner = run_command,
              say: Callable[[str], None] = print) -> bool:
    """Run every task not yet done, cell by cell; True when all are done, False at the first failure."""
    for cell in cells:
        d = out / cell.name
        _write_json(d / "cell.json", {"cell": cell.name, "dataset": cell.dataset, "regularizer": cell.regularizer,
                                      "f": cell.f, "latent": list(cell.latent()), **cell.rate(budget)})
        for task in cell_tasks(cell, budget, out):
            if task.output.exists():
                continue
            say(f"{cell.name}: {task.name}")
            log = d / "logs" / f"{task.name.replace('@', '_')}.log"
            status, cpu, wall = runner(task.command, log)
            add_time(d, task.name, cpu, wall, done=status == 0 and task.output.exists())
            if status != 0 or not task.output.exists():
                say(f"{cell.name}: {task.name} stopped (exit status {status}); its log: {log}")
                return False
            if task.name == "vae":
                _write_json(d / "vae_metrics.json", vae_metrics(task.output))
    return True


# --- results ----------------------------------------------------------------------------------------------------

def adherence(report: dict[str, Any]) -> float | None:
    """The fraction right by each prompt kind's main criterion, averaged over the kinds (daguerre eval)."""
    values = [entry[MAIN_CRITERION[k]] for k, entry in report.get("adherence", {}).items()
              if k in MAIN_CRITERION and MAIN_CRITERION[k] in entry]
    return sum(values) / len(values) if values else None


def collect(out: Path, cells: Sequence[Cell], budget: Budget) -> list[dict[str, Any]]:
    """One row per cell with what is measured so far (missing values are None)."""
    rows = []
    for cell in cells:
        d = out / cell.name
        timing = _read_json(d / "timing.json") or {}
        vae = _read_json(d / "vae_metrics.json")
        ldm_time = timing.get("ldm", {})
        ldm_cpu = ldm_time.get("cpu_s") if ldm_time.get("done") else None
        evals = []
        for step in budget.eval_steps():
            report = _read_json(d / "eval" / f"step_{step}" / "report.json")
            if report is None:
                continue
            dist = report["distribution"]
            evals.append({"step": step, "fd": dist["fd"], "fd_floor": dist["fd_floor"], "adherence": adherence(report),
                          "seconds_per_image": report["timing"]["seconds_per_image"],
                          "ldm_cpu_s": ldm_cpu * step / budget.ldm_steps if ldm_cpu is not None else None})
        hold = (vae or {}).get("holdout", {})
        recon = _read_json(d / "recon.json") or {}
        rows.append({
            "cell": cell.name, "dataset": cell.dataset, "regularizer": cell.regularizer, "f": cell.f,
            "latent": list(cell.latent()), **cell.rate(budget),
            "psnr": hold.get("psnr"), "ssim": hold.get("ssim"), "codes_used": hold.get("codes_used"),
            "recon_fd": recon.get("fd"), "recon_fd_input": recon.get("fd_input"),
            "vae_cpu_s": timing.get("vae", {}).get("cpu_s") if vae is not None else None,
            "ldm_cpu_s": ldm_cpu, "evals": evals,
        })
    return rows


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of the study: one line per cell, the last evaluated LDM step's scores."""
    lines = ["| cell | latent | values / pixel value | PSNR dB | SSIM | codes used | recon. FD (input) | VAE CPU min | "
             "LDM step | FD (floor) | adherence | LDM CPU min | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        last = r["evals"][-1] if r["evals"] else {}
        fd = f"{last['fd']:.2f} ({last['fd_floor']:.2f})" if last else "-"
        recon = (f"{r['recon_fd']:.2f} ({r['recon_fd_input']:.2f})" if r.get("recon_fd") is not None else "-")
        lines.append(
            f"| {r['cell']} | {'x'.join(str(n) for n in r['latent'])} | {r['values_per_pixel_value']:.3g} | "
            f"{_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | {_fmt(r['codes_used'], '.1%')} | "
            f"{recon} | {_fmt(r['vae_cpu_s'], '.1f', 1 / 60)} | "
            f"{last.get('step', '-')} | {fd} | {_fmt(last.get('adherence'), '.0%')} | "
            f"{_fmt(r['ldm_cpu_s'], '.1f', 1 / 60)} | {_fmt(last.get('seconds_per_image'), '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], png_dir: Path) -> list[Path]:
    """rate_distortion.png, quality_vs_steps.png and quality_vs_cpu.png of the measured cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    style = {"kl": "-", "vq": "--"}
    marker = {"kl": "o", "vq": "s"}
    colours = {f: plt.get_cmap("viridis")(i / max(1, len(FACTORS) - 1)) for i, f in enumerate(FACTORS)}
    written = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for reg in REGULARIZERS:
            pts = sorted((r["values_per_pixel_value"], r["psnr"], r["f"]) for r in rows
                         if r["dataset"] == ds and r["regularizer"] == reg and r["psnr"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style[reg], marker=marker[reg], label=reg.upper())
                for x, y, f in pts:
                    ax.annotate(f"f{f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{ds}: reconstruction vs rate", xlabel="latent values per pixel value",
               ylabel="held-out PSNR (dB)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    written.append(png_dir / "rate_distortion.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    for name, xkey, xlabel, xscale in (("quality_vs_steps.png", "step", "LDM training step", 1.0),
                                       ("quality_vs_cpu.png", "ldm_cpu_s", "LDM training CPU-hours", 1 / 3600)):
        fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False)
        for col, ds in enumerate(datasets):
            for r in (r for r in rows if r["dataset"] == ds and r["evals"]):
                pts = [e for e in r["evals"] if e[xkey] is not None]
                if not pts:
                    continue
                x = [e[xkey] * xscale for e in pts]
                reg = r["regularizer"]
                kw = {"color": colours[r["f"]], "linestyle": style[reg], "marker": marker[reg],
                      "label": f"{reg.upper()} f{r['f']}"}
                axes[0][col].plot(x, [e["fd"] / e["fd_floor"] for e in pts], **kw)
                axes[1][col].plot(x, [math.nan if e["adherence"] is None else 100 * e["adherence"] for e in pts], **kw)
            axes[0][col].set(title=f"{ds}: Frechet distance / floor (lower is better)", yscale="log")
            axes[1][col].set(title=f"{ds}: adherence (%)", xlabel=xlabel, ylim=(0, 100))
            for ax in axes[:, col]:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(png_dir / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def report(out: Path, cells: Sequence[Cell], budget: Budget, png_dir: Path) -> list[dict[str, Any]]:
    rows = collect(out, cells, budget)
    _write_json(out / "results.json", {"budget": dataclasses.asdict(budget), "cells": rows})
    (out / "results.md").write_text(table(rows))
    plot(rows, png_dir)
    return rows


RECORDED = ("cell.json", "timing.json", "vae_metrics.json", "recon.json")  # + eval/step_S/report.json


def record(out: Path, cells: Sequence[Cell], budget: Budget, to: Path) -> list[Path]:
    """Copy what `report` reads (the budget, each cell's small JSON files and evaluation reports, without the
    samples' per-image lists) from the study folder `out` to `to`, which `report --out TO` then reads alone:
    the measurements in a few hundred kB, beside gigabytes of checkpoints and latent caches."""
    written = []

    def copy(src: Path, dst: Path, slim: bool = False) -> None:
        data = _read_json(src)
        if data is None:
            return
        if slim:
            data = {k: v for k, v in data.items() if k not in ("samples", "grid")}
        _write_json(dst, data)
        written.append(dst)

    _write_json(to / "budget.json", dataclasses.asdict(budget))
    written.append(to / "budget.json")
    for cell in cells:
        for name in RECORDED:
            copy(out / cell.name / name, to / cell.name / name)
        for step in budget.eval_steps():
            rel = Path(cell.name) / "eval" / f"step_{step}" / "report.json"
            copy(out / rel, to / rel, slim=True)
    return written


def status(out: Path, cells: Sequence[Cell], budget: Budget) -> str:
    lines = []
    for cell in cells:
        tasks = cell_tasks(cell, budget, out)
        done = [t.name for t in tasks if t.output.exists()]
        todo = [t.name for t in tasks if not t.output.exists()]
        lines.append(f"{cell.name}: {len(done)}/{len(tasks)} done" + (f"; next {todo[0]}" if todo else ""))
    return "\n".join(lines)


def step_seconds(cell: Cell, budget: Budget, repeats: int = 3) -> dict[str, float]:
    """CPU seconds of one training step of the cell's autoencoder (its config's batch) and of its U-Net (the
    budget's LDM batch) on the current thread count, bf16 autocast as the configs train, after one warm-up step: the
    numbers the budget is planned from. Random weights and inputs; the text context random too."""
    import torch

    from daguerre.models.autoencoder import AutoencoderKL
    from daguerre.models.unet import UNetModel
    from daguerre.training.config import derive_model_config, load_run_config

    ds = DATASETS[cell.dataset]
    vae_cfg = load_run_config(ds.vae_config, "vae", vae_sets(cell, budget))
    vae = AutoencoderKL(derive_model_config(vae_cfg, ds.channels, None).vae)
    batch = vae_cfg.train.batch_size
    ldm_cfg = derive_model_config(load_run_config(ds.ldm_config, "ldm", ldm_sets(cell, budget)), ds.channels, None)
    unet = UNetModel(ldm_cfg.unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ds.channels, ds.size, ds.size, generator=gen)
    c, h, w = cell.latent()
    z = torch.randn(budget.ldm_batch, c, h, w, generator=gen)
    context = torch.randn(budget.ldm_batch, ldm_cfg.text_encoder.max_length, ldm_cfg.text_encoder.width,
                          generator=gen)
    t = torch.full((budget.ldm_batch,), 500.0)

    def vae_step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            posterior = vae.encode(x)
            rec = vae.decode(posterior.mode())
        (rec.float() - x).abs().mean().backward()

    def unet_step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            out = unet(z, t, context=context)
        out.float().pow(2).mean().backward()

    def seconds(step: Callable[[], None]) -> float:
        step()
        start = time.process_time()
        for _ in range(repeats):
            step()
        return (time.process_time() - start) / repeats

    return {"vae_step_s": seconds(vae_step), "unet_step_s": seconds(unet_step)}


# --- command line -----------------------------------------------------------------------------------------------

def parse_cells(spec: str) -> list[Cell]:
    return all_cells() if spec == "all" else [Cell.parse(s) for s in spec.split(",") if s]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["run", "report", "status", "steptimes", "record", "recon"])
    p.add_argument("--out", type=Path, default=Path("runs/compression"), help="the study's folder")
    p.add_argument("--cells", default="all", help="comma-separated DATASET-REG-fN (e.g. fashion-kl-f4), or all")
    p.add_argument("--png-dir", type=Path, default=None, help="report: where the plots go (default: OUT)")
    p.add_argument("--to", type=Path, default=None, help="record: the folder that keeps the measurements")
    p.add_argument("--vae", type=Path, help="recon: the autoencoder file")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="recon: its data set")
    p.add_argument("--n", type=int, default=100, help="recon: images reconstructed")
    p.add_argument("--json", type=Path, help="recon: where its result goes")
    for f in dataclasses.fields(Budget):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None, help=f"budget (default {f.default})")
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget) if getattr(args, f.name) is not None}
    if args.action == "recon":  # one cell's task (run calls it as a command, for its CPU time and its log)
        if args.vae is None or args.dataset is None or args.json is None:
            p.error("recon needs --vae, --dataset and --json")
        result = reconstruction_fd(args.vae, args.dataset, args.n)
        _write_json(args.json, result)
        print(json.dumps(result))
        return 0
    try:
        cells = parse_cells(args.cells)
        if args.action == "run":
            budget = budget_for(args.out, given)
        else:
            saved = _read_json(args.out / "budget.json")
            budget = Budget(**(saved or given)).check()
    except ValueError as e:
        print(f"compression_study: error: {e}", file=sys.stderr)
        return 2
    if args.action == "status":
        print(status(args.out, cells, budget))
        return 0
    if args.action == "steptimes":  # one thread, as the configs train (OMP_NUM_THREADS=1)
        import torch

        torch.set_num_threads(1)
        print(f"cell  VAE step s (its config's batch)  U-Net step s (batch {budget.ldm_batch})")
        for cell in cells:
            times = step_seconds(cell, budget)
            print(f"{cell.name}  {times['vae_step_s']:.3f}  {times['unet_step_s']:.3f}", flush=True)
        return 0
    if args.action == "record":
        if args.to is None:
            p.error("record needs --to (e.g. bench/results/compression)")
        print(f"recorded {len(record(args.out, cells, budget, args.to))} files in {args.to}")
        return 0
    if args.action == "report":
        rows = report(args.out, cells, budget, args.png_dir or args.out)
        print(table(rows), end="")
        return 0
    signal.signal(signal.SIGTERM, _forward_sigterm)
    finished = run_cells(args.out, cells, budget)
    if _stopping:
        print("stopped; continue with the same command", file=sys.stderr)
        return 130
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
