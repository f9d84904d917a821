"""Peak memory of Stable Diffusion 1.5 text to image, phase by phase: what issue 15's memory targets measure.

The SD 1.5 architecture with random weights, written once as an fp16 diffusers folder (bench/e2e.py's
`make_model`, the same cache), run once at --size with --steps steps of DPM++ 2M, CFG 7, seed 0, to a PNG:
- `bf16`, `int8`, `fp32`: `daguerre.load(folder, **options)` (the networks kept loaded, as a script or the
  server holds them) and `pipe(...)`, the image saved by PIL;
- `cli-bf16`, `cli-int8`: `daguerre generate` itself (`daguerre.cli.main` in the worker, with `--dtype bf16
  [--quantize int8] --threads 1`): its default one-shot path, which reads each network when the run needs
  it and frees it after (`Components.release`). This is what the issue's targets are measured on.
Every variant runs in a fresh process (`--worker`), one thread, `nice`-friendly; the process's peak resident
set (VmHWM, loading included) is the figure the targets name. The image column is the sha256 of the pixels
(the CLI's PNG also holds the parameters text), so equal values mean the same image.

Beside it, a sampling thread reads VmRSS every few milliseconds and keeps the largest value per phase:
`import` (torch and daguerre), `load` (`open_model`), `text` (the text encoder read, if released, and
called), `sample` (the U-Net's), `decode` (the VAE decoder's), `png` (to the file). A phase starts when a
pipeline acquires its network (`Components.acquire`, which reads a released one) or the network's first
forward call, whichever comes first, so a phase's peak includes what the previous one left allocated.
`loaded` is VmRSS right after `open_model`, `weights` the bytes the three networks hold then (0 for the
one-shot path: nothing is read yet), `run s` the time from the open to the PNG.

    python bench/e2e_memory.py                               # cli-bf16, cli-int8, bf16 and int8 at 512x512
    python bench/e2e_memory.py --variants bf16 --steps 2 8   # does the peak depend on the step count?
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/e2e_memory.py  # glibc: blocks >= 1 MiB mapped, not heap
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from daguerre.memory import resident_bytes  # noqa: E402
from e2e import CFG, PROMPT, SEED, make_model  # noqa: E402

MIB = 2**20
# variant -> daguerre.load options (the cli- variants: the same as `daguerre generate` flags)
VARIANTS: dict[str, dict] = {
    "cli-bf16": {"dtype": "bf16"},
    "cli-int8": {"dtype": "bf16", "quantize": "int8"},
    "bf16": {"dtype": "bf16"},
    "int8": {"dtype": "bf16", "quantize": "int8"},
    "fp32": {"dtype": "fp32"},
}
DEFAULT_VARIANTS = ["cli-bf16", "cli-int8", "bf16", "int8"]
PHASES = ("import", "load", "text", "sample", "decode", "png")
SAMPLE_EVERY_S = 0.002


def status(key: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM, RssAnon, ...): `daguerre.memory.resident_bytes`,
    required (this bench measures nothing without it)."""
    value = resident_bytes(key)
    if value is None:
        raise KeyError(key)
    return value


class PhasePeaks:
    """The largest VmRSS seen per phase, read by a background thread every `SAMPLE_EVERY_S` seconds."""

    def __init__(self) -> None:
        self.phase = PHASES[0]
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open("/proc/self/statm") as f:
            page = os.sysconf("SC_PAGE_SIZE")
            while not self._stop.is_set():
                f.seek(0)
                rss = int(f.read().split()[1]) * page
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
                time.sleep(SAMPLE_EVERY_S)

    def enter(self, phase: str) -> None:
        if PHASES.index(phase) > PHASES.index(self.phase):
            self.phase = phase

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(args: argparse.Namespace) -> None:
    peaks = PhasePeaks()
    import torch

    import daguerre
    import daguerre.registry as registry
    from daguerre.components import Components
    from daguerre.models.autoencoder import Decoder
    from daguerre.models.text_encoder import CLIPTextEncoder
    from daguerre.models.unet import UNetModel
    from daguerre.quantize import weight_bytes

    torch.set_num_threads(1)
    imported = status("VmRSS")
    options = VARIANTS[args.worker]
    opened: dict = {}
    open_model, acquire = registry.open_model, getattr(Components, "acquire", None)

    def measured_open(*a, **kw):  # the load: what the columns after "load peak" describe
        peaks.enter("load")
        t0 = time.perf_counter()
        comps, model_hash = open_model(*a, **kw)
        nets = [m for m in (comps.unet, comps.vae, comps.text_encoder) if m is not None]
        opened.update(load_s=time.perf_counter() - t0, loaded=status("VmRSS"), load_hwm=status("VmHWM"),
                      weights=sum(weight_bytes(m) for m in nets if not any(t.is_meta for t in m.parameters())))
        return comps, model_hash

    phase_of = {"text_encoder": "text", "unet": "sample", "vae_decoder": "decode"}

    def measured_acquire(self, *parts):
        for part in parts:
            if part in phase_of:
                peaks.enter(phase_of[part])
        return acquire(self, *parts)

    classes = {CLIPTextEncoder: "text", UNetModel: "sample", Decoder: "decode"}

    def on_forward(module, _):
        phase = classes.get(type(module))
        if phase is not None:
            peaks.enter(phase)

    from PIL import Image

    save = Image.Image.save

    def measured_save(image, *a, **kw):
        peaks.enter("png")
        return save(image, *a, **kw)

    registry.open_model, Image.Image.save = measured_open, measured_save
    if acquire is not None:  # (a daguerre from before Components.acquire: its keep-loaded variants still run)
        Components.acquire = measured_acquire
    torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    t0 = time.perf_counter()
    if args.worker.startswith("cli-"):
        from daguerre.cli import main

        flags = ["--dtype", options["dtype"]] + (["--quantize", options["quantize"]] if "quantize" in options else [])
        code = main(["generate", PROMPT, "--model", args.folder, "--steps", str(args.steps), "--sampler", "DPM++ 2M",
                     "--cfg", str(CFG), "--size", f"{args.size}x{args.size}", "--seed", str(SEED), "--threads", "1",
                     "--out", args.out, "--overwrite", *flags])
        if code != 0:
            raise SystemExit(f"daguerre generate exited with {code}")
    else:
        pipe = daguerre.load(args.folder, **options)
        image = pipe(PROMPT, steps=args.steps, sampler="DPM++ 2M", cfg_scale=CFG, width=args.size, height=args.size,
                     seed=SEED)[0].image
        image.save(args.out)
    run_s = time.perf_counter() - t0
    by_phase = peaks.stop()
    print(json.dumps({**opened, "imported": imported, "hwm": status("VmHWM"), "phases": by_phase, "run_s": run_s}))


def spawn(variant: str, folder: Path, size: int, steps: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--size", str(size),
           "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, nargs="+", default=[2])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "daguerre-bench-e2e")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.steps = args.steps[0]
        worker(args)
        return 0
    folder = args.cache / "sd15-random-fp16"
    args.cache.mkdir(parents=True, exist_ok=True)
    make_model(folder)
    print(f"# SD 1.5 (random, fp16 diffusers folder), {args.size}x{args.size}, one thread; MiB "
          "(phase columns: the largest VmRSS seen in the phase)\n")
    print("| variant | steps | peak (VmHWM) | load peak | after load | weights | "
          + " | ".join(PHASES) + " | load s | image sha256 | run s |")
    print("|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|")
    for steps in args.steps:
        for variant in args.variants:
            out = args.cache / f"memory-{variant}-{args.size}-{steps}.png"
            r = spawn(variant, folder, args.size, steps, out)
            cols = " | ".join(f"{r['phases'].get(ph, 0) / MIB:.0f}" for ph in PHASES)
            print(f"| {variant} | {steps} | **{r['hwm'] / MIB:.0f}** | {r['load_hwm'] / MIB:.0f} | "
                  f"{r['loaded'] / MIB:.0f} | {r['weights'] / MIB:.0f} | {cols} | {r['load_s']:.1f} | "
                  f"{pixels_sha256(out)[:12]} | {r['run_s']:.0f} |", flush=True)
    return 0


def pixels_sha256(path: Path) -> str:
    """The sha256 of an image file's RGB pixels (not of the file: the CLI's PNG holds its parameters too)."""
    import hashlib

    from PIL import Image

    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
