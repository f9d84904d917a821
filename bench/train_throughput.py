"""Training throughput of `daguerre train` in images/s: fp32 against bf16 autocast, with and without
gradient checkpointing, for the shapes configs (stage 1: shapes_vae.toml; stage 2:
shapes_ldm.toml on a freshly initialised autoencoder of shapes_vae's architecture).

Each cell is a real training run (the code path of `daguerre train`, data loading included, latent
caching excluded) in a fresh subprocess for `--steps` optimizer steps; the rate is measured between
the metrics lines of step `--skip` and the last step (first steps warm up the allocator and oneDNN).
Machine load drifts on shared machines: cells run in alternation, `--rounds` times, median reported.

    python bench/train_throughput.py                  # both stages, 4 cells each (~10-20 minutes on 2 cores)
    python bench/train_throughput.py --stages ldm --steps 8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "daguerre" / "assets" / "configs"
CELLS = [("fp32", False, False), ("bf16", True, False), ("fp32 + ckpt", False, True), ("bf16 + ckpt", True, True)]
SMALL_DATA = ["data.n=600", "data.holdout=64"]  # enough images for the measured steps; fast latent caching
QUIET = ["train.progress=false", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0",
         "sample.latent_scale_images=16"]


def make_vae(folder: Path, threads: int) -> Path:
    """A freshly initialised shapes_vae autoencoder saved as a stage-1 output (its weights do not affect speed)."""
    code = f"""
import torch
from daguerre.training.config import load_run_config, derive_model_config
from daguerre.checkpoints.vae_file import save_vae
from daguerre.models.autoencoder import AutoencoderKL
cfg = derive_model_config(load_run_config({str(CONFIGS / 'shapes_vae.toml')!r}, 'vae'), 3, None)
torch.manual_seed(0)
save_vae(AutoencoderKL(cfg.vae), cfg, {str(folder / 'vae.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(threads))
    return folder / "vae.safetensors"


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))


def run_cell(stage: str, bf16: bool, ckpt: bool, args: argparse.Namespace, vae: Path | None, out: Path) -> float:
    """Images/s of one short training run."""
    sets = [*QUIET, *SMALL_DATA, f"train.steps={args.steps}", "train.log_every=1", f"train.bf16={str(bf16).lower()}",
            f"train.gradient_checkpointing={str(ckpt).lower()}", f"train.threads={args.threads}"]
    if stage == "ldm":
        sets.append(f"data.cache_dir='{out.parent / 'latents'}'")  # encode once, reuse in every cell
    cmd = [sys.executable, "-m", "daguerre.training", stage, "--config", str(CONFIGS / f"shapes_{stage}.toml"),
           "--out", str(out)]
    if stage == "ldm":
        cmd += ["--vae", str(vae)]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env=_env(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)}\nfailed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first = next(r for r in rows if r["step"] == args.skip)
    last = rows[-1]
    batch = json.loads((out / "config.json").read_text())["train"]["batch_size"]
    return (last["step"] - first["step"]) * batch / (last["time"] - first["time"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["vae", "ldm"], choices=["vae", "ldm"])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--skip", type=int, default=3, help="steps excluded from the rate as warm-up (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the cells (median; default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the shapes configs)")
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = make_vae(tmp, args.threads) if "ldm" in args.stages else None
        for stage in args.stages:
            rates: dict[str, list[float]] = {name: [] for name, _, _ in CELLS}
            for r in range(args.rounds):
                for name, bf16, ckpt in CELLS:
                    out = tmp / f"{stage}-{r}-{name.replace(' ', '')}"
                    rates[name].append(run_cell(stage, bf16, ckpt, args, vae, out))
            cfg = f"shapes_{stage}"
            print(f"\n{stage} ({cfg}, batch from the config, {args.threads} thread(s), median of {args.rounds})")
            print("| precision | images/s |\n|---|---|")
            for name, _, _ in CELLS:
                print(f"| {name} | {statistics.median(rates[name]):.1f} |")


if __name__ == "__main__":
    main()
