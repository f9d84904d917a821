"""Stable Diffusion 1.5 text to image, end to end: daguerre at its defaults beside diffusers in bfloat16.

The SD 1.5 architecture with random weights (`random:sd15`), written once as an fp16 diffusers folder
(the form SD files usually have) under --cache; both sides load that folder, so they run the same
weights. One image, 20 steps of DPM++ 2M, CFG 7, at 256x256 and 512x512: text encoding, sampling, VAE
decode and the PNG file, timed from the prompt to the file on disk.

- daguerre: `daguerre.load(folder, **load)` and `pipe(prompt, **fields)`; the variants add fields or
  load options (`--fast`, int8 weights; `daguerre one-shot`: `release_after_use=True`, the path of `daguerre
  generate`, whose timed image includes reading each network from the folder again).
- diffusers: `StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)`, its U-Net
  and VAE in channels_last, `DPMSolverMultistepScheduler` (DPM++ 2M).

Every run is a fresh process (`--worker`), which loads the model, makes one untimed 1-step image at the
size (oneDNN's kernels are chosen on first use), then the timed image, and reports the load time, the
generation time and its peak resident set (VmHWM). Runs alternate between the variants, round after
round, so that the machine's load drifts over all of them alike; the table gives medians, and the ratio
column the median over the rounds of variant / diffusers.

    python bench/e2e.py --repeats 3                              # the full table (~25 minutes on 2 cores)
    python bench/e2e.py --sizes 256 --repeats 1 --variants daguerre diffusers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse on the moon"
STEPS = 20
CFG = 7.0
SEED = 0
THREADS = 2
# variant -> (implementation, daguerre.load options, request fields)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "daguerre": ("daguerre", {}, {}),
    "daguerre fp32": ("daguerre", {"dtype": "fp32"}, {}),
    "daguerre --fast": ("daguerre", {}, {"fast": True}),
    "daguerre int8": ("daguerre", {"quantize": "int8"}, {}),
    "daguerre one-shot": ("daguerre", {"release_after_use": True}, {}),  # daguerre generate's path: reads per call
    "diffusers": ("diffusers", {}, {}),
}
DEFAULT_VARIANTS = ["daguerre", "daguerre --fast", "daguerre int8", "diffusers"]


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_model(folder: Path) -> None:
    """The random SD 1.5 model as an fp16 diffusers folder (kept: building it takes a minute)."""
    import torch

    import daguerre
    from daguerre.checkpoints import save_diffusers

    if (folder / "model_index.json").is_file():
        return
    pipe = daguerre.load("random:sd15", dtype="fp32")
    save_diffusers(pipe.components, folder, dtype=torch.float16)


def run_daguerre(folder: Path, size: int, load: dict, fields: dict, out: Path) -> tuple[float, float]:
    import daguerre

    t0 = time.perf_counter()
    pipe = daguerre.load(str(folder), **load)
    load_s = time.perf_counter() - t0
    settings = dict(steps=STEPS, sampler="DPM++ 2M", cfg_scale=CFG, width=size, height=size, seed=SEED, **fields)
    pipe(PROMPT, **{**settings, "steps": 1})  # warm-up: kernels chosen for these shapes
    t0 = time.perf_counter()
    image = pipe(PROMPT, **settings)[0].image
    image.save(out)
    return load_s, time.perf_counter() - t0


def run_diffusers(folder: Path, size: int, out: Path) -> tuple[float, float]:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=1, guidance_scale=CFG, height=size, width=size)
        t0 = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, height=size, width=size,
                     generator=torch.Generator().manual_seed(SEED)).images[0]
        image.save(out)
    return load_s, time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(THREADS)
    impl, load, fields = VARIANTS[args.worker]
    out = Path(args.out)
    if impl == "daguerre":
        load_s, gen_s = run_daguerre(Path(args.folder), args.size, load, fields, out)
    else:
        load_s, gen_s = run_diffusers(Path(args.folder), args.size, out)
    print(json.dumps({"load_s": load_s, "gen_s": gen_s, "peak_mib": peak_rss_mib(),
                      "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}))


def spawn(variant: str, folder: Path, size: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--size", str(size),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} at {size}: worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once, in turn")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "daguerre-bench-e2e")
    p.add_argument("--json", type=Path, help="also write every run's record here")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    folder = args.cache / "sd15-random-fp16"
    args.cache.mkdir(parents=True, exist_ok=True)
    make_model(folder)
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {THREADS} threads, "
          f"{STEPS} steps DPM++ 2M, CFG {CFG}, one image")
    records = []
    for size in args.sizes:
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for r in range(args.repeats):
            order = args.variants if r % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                out = args.cache / f"{variant.replace(' ', '_')}-{size}-{r}.png"
                rec = spawn(variant, folder, size, out)
                rec.update(variant=variant, size=size, round=r, image=str(out))
                runs[variant].append(rec)
                records.append(rec)
                print(f"  {size} round {r} {variant}: {rec['gen_s']:.1f} s, peak {rec['peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
        print(f"\n## {size}x{size}\n")
        print("| variant | median s (min) | ratio to diffusers | load s | peak RSS MiB | PSNR vs daguerre |")
        print("|---|---|---|---|---|---|")
        for variant, rs in runs.items():
            gen = [x["gen_s"] for x in rs]
            ratio = ""
            if "diffusers" in runs and variant != "diffusers":
                pairs = zip(rs, runs["diffusers"], strict=True)
                ratio = f"{statistics.median(x['gen_s'] / d['gen_s'] for x, d in pairs):.2f}"
            close = ""
            if "daguerre" in runs and variant != "daguerre":
                close = f"{psnr(Path(rs[0]['image']), Path(runs['daguerre'][0]['image'])):.1f} dB"
            load_s = statistics.median(x["load_s"] for x in rs)
            print(f"| {variant} | {statistics.median(gen):.1f} ({min(gen):.1f}) | {ratio} | {load_s:.1f} | "
                  f"{max(x['peak_mib'] for x in rs):.0f} | {close} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
