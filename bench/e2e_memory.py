"""Peak memory of Stable Diffusion 1.5 text to image, phase by phase: what issue 15's memory targets measure.

The SD 1.5 architecture with random weights, written once as an fp16 diffusers folder (bench/e2e.py's
`make_model`, the same cache), loaded by `daguerre.load(folder, **options)` and run once at --size with
--steps steps of DPM++ 2M, CFG 7, to a PNG. Every variant runs in a fresh process (`--worker`), one thread,
`nice`-friendly; the process's peak resident set (VmHWM, loading included) is the figure the targets name.

Beside it, a sampling thread reads VmRSS every few milliseconds and keeps the largest value per phase:
`import` (torch and daguerre), `load` (`daguerre.load`), `text` (the text encoder's calls), `sample` (the
U-Net's), `decode` (the VAE decoder's), `png` (to the file). Phases start at the networks' first forward
calls (forward pre-hooks), so a phase's peak includes what the previous one left allocated. `loaded` is
VmRSS right after the load, `weights` the bytes the three networks hold.

    python bench/e2e_memory.py                               # bf16 and int8 at 512x512, 2 steps
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
# variant -> daguerre.load options
VARIANTS: dict[str, dict] = {
    "bf16": {"dtype": "bf16"},
    "int8": {"dtype": "bf16", "quantize": "int8"},
    "fp32": {"dtype": "fp32"},
}
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
    from daguerre.quantize import weight_bytes

    torch.set_num_threads(1)
    imported = status("VmRSS")
    peaks.enter("load")
    t0 = time.perf_counter()
    pipe = daguerre.load(args.folder, **VARIANTS[args.worker])
    load_s = time.perf_counter() - t0
    loaded, load_hwm = status("VmRSS"), status("VmHWM")
    comps = pipe.components
    nets = [m for m in (comps.unet, comps.vae, comps.text_encoder) if m is not None]
    for module, phase in ((comps.text_encoder, "text"), (comps.unet, "sample"), (comps.vae.decoder, "decode")):
        module.register_forward_pre_hook(lambda *_, phase=phase: peaks.enter(phase))
    image = pipe(PROMPT, steps=args.steps, sampler="DPM++ 2M", cfg_scale=CFG, width=args.size, height=args.size,
                 seed=SEED)[0].image
    peaks.enter("png")
    image.save(args.out)
    by_phase = peaks.stop()
    print(json.dumps({"load_s": load_s, "imported": imported, "loaded": loaded, "load_hwm": load_hwm,
                      "hwm": status("VmHWM"), "weights": sum(weight_bytes(m) for m in nets), "phases": by_phase}))


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
    p.add_argument("--variants", nargs="+", default=["bf16", "int8"], choices=list(VARIANTS))
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
          + " | ".join(PHASES) + " | load s | image sha256 |")
    print("|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|")
    for steps in args.steps:
        for variant in args.variants:
            out = args.cache / f"memory-{variant}-{args.size}-{steps}.png"
            r = spawn(variant, folder, args.size, steps, out)
            import hashlib

            digest = hashlib.sha256(out.read_bytes()).hexdigest()[:12]
            cols = " | ".join(f"{r['phases'].get(ph, 0) / MIB:.0f}" for ph in PHASES)
            print(f"| {variant} | {steps} | **{r['hwm'] / MIB:.0f}** | {r['load_hwm'] / MIB:.0f} | "
                  f"{r['loaded'] / MIB:.0f} | {r['weights'] / MIB:.0f} | {cols} | {r['load_s']:.1f} | {digest} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
