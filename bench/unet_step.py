"""One Stable Diffusion 1.5 U-Net step: daguerre against diffusers on the same random weights, side by side.

Batch 2 (a classifier-free-guidance pair), a 77-token context, 32x32 and 64x64 latents (256 and 512
pixels), in float32, bfloat16 (the model cast to bf16) and bfloat16 with channels_last weights and
input. In bf16 daguerre's attention takes its chunked matmul form on a CPU without AMX and torch's fused kernel
with AMX (daguerre.nn.attention, `chunked_pays`); the mode "bf16 channels_last sdpa" forces the fused kernel
(without AMX: the form before the chunked one, to show its gain) and
"bf16 channels_last compile" runs daguerre's U-Net through daguerre.compile (inductor freezing; the first,
untimed call compiles, minutes) against diffusers in eager mode. In bf16 daguerre's Conv2d and Linear layers
compute with oneDNN-packed weights (daguerre.nn.conv, as daguerre.load sets them up); the mode
"bf16 channels_last unpacked" keeps torch's layers instead (the form before them). Both U-Nets share one set of tensors
(diffusers' is loaded through daguerre's key mapping) and run in one process, one warm-up call each, then
in back-to-back pairs (alternating which goes first).
The table gives medians (and minima) and, as "ratio", the median over the pairs of daguerre /
diffusers, so that machine-load drift hits both alike: compare ratios. Peak memory is the resident-set
high-water mark (VmHWM in /proc/self/status; `ru_maxrss` would carry over the parent's peak through
fork and exec) of a fresh subprocess per cell and implementation, which builds that one model
directly in the cell's dtype and layout and runs one step; "+act" is that peak minus the high-water
mark after building the model (activations and workspace).

    python bench/unet_step.py --repeats 5          # the full table (~5-20 minutes on 2 cores)
    python bench/unet_step.py --sizes 32 --repeats 2 --no-memory
    python bench/unet_step.py --sizes 64 --modes "bf16 channels_last" "bf16 channels_last sdpa"   # issue 15's target
    python bench/unet_step.py --sizes 32 --modes "bf16 channels_last compile" --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daguerre.checkpoints.unet_keys import unet_config_to_diffusers, unet_state_dict_to_diffusers  # noqa: E402
from daguerre.config import preset  # noqa: E402
from daguerre.models.unet import UNetModel  # noqa: E402
from daguerre.nn.conv import pack_for_inference_, unpack_  # noqa: E402
from daguerre.precision import uses_packed_weights  # noqa: E402
from sd15 import random_sd15_unet  # noqa: E402  (bench/sd15.py)
from test_unet import randomize_  # noqa: E402  (one weight randomiser for tests and benchmarks)
from timing import alternating_times  # noqa: E402  (bench/timing.py)

attention_module = importlib.import_module("daguerre.nn.attention")  # the package exports the function

THREADS = 2
BATCH = 2
CONTEXT_TOKENS = 77
TIMESTEPS = (999, 500)
MODES = {  # name -> (dtype, memory format, daguerre variant)
    "fp32": (torch.float32, torch.contiguous_format, None),
    "bf16": (torch.bfloat16, torch.contiguous_format, None),
    "bf16 channels_last": (torch.bfloat16, torch.channels_last, None),
    "bf16 channels_last sdpa": (torch.bfloat16, torch.channels_last, "sdpa"),
    "bf16 channels_last compile": (torch.bfloat16, torch.channels_last, "compile"),
    "bf16 channels_last unpacked": (torch.bfloat16, torch.channels_last, "unpacked"),
}
DEFAULT_MODES = ["fp32", "bf16", "bf16 channels_last", "bf16 channels_last sdpa"]  # compile: opt-in (slow to build)
KIB = 1024


def build(impl: str, dtype: torch.dtype, memory_format: torch.memory_format, seed: int = 0) -> torch.nn.Module:
    """A random-weight SD 1.5 U-Net of one implementation, allocated directly in `dtype` and `memory_format` (the
    memory cells: no float32 copy first, which would raise the peak; the timed cells share `random_sd15_unet`'s)."""
    cfg = preset("sd15").unet
    with torch.device("meta"):
        if impl == "daguerre":
            model = UNetModel(cfg)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg, 64))
    model = model.to(dtype).to_empty(device="cpu")
    randomize_(model, seed)
    return model.to(memory_format=memory_format).eval()


def diffusers_twin(model: UNetModel, memory_format: torch.memory_format) -> torch.nn.Module:
    """diffusers' U-Net holding the very tensors of `model`, through daguerre's weight mapping."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_config_to_diffusers(model.cfg, 64))
    ref.load_state_dict(unet_state_dict_to_diffusers(model.state_dict(), model.cfg), strict=True, assign=True)
    return ref.to(memory_format=memory_format).eval()  # a no-op on tensors already in that format


def make_inputs(size: int, dtype: torch.dtype, memory_format: torch.memory_format) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, size, size, generator=g).to(dtype).contiguous(memory_format=memory_format)
    context = torch.randn(BATCH, CONTEXT_TOKENS, 768, generator=g).to(dtype)
    return x, torch.tensor(TIMESTEPS), context


@contextlib.contextmanager
def fused_attention():
    """daguerre's attention rule patched to keep torch's fused kernel (its form before the chunked one)."""
    real = attention_module.chunked_pays
    attention_module.chunked_pays = lambda *args: False
    try:
        yield
    finally:
        attention_module.chunked_pays = real


def packs(model: torch.nn.Module, variant: str | None) -> None:
    """daguerre's layers as `daguerre.load` sets them up (registry.prepare_for_inference_): packed where
    `precision.uses_packed_weights` says so, except for the compiled and "unpacked" variants."""
    if variant not in ("compile", "unpacked") and uses_packed_weights(next(model.parameters()).dtype, "cpu"):
        pack_for_inference_(model)
    else:
        unpack_(model)


def step_fns(model: UNetModel, ref: torch.nn.Module, x, t, context, variant: str | None = None):
    """The two calls of a cell; daguerre's as the mode's variant says (a compiled copy: its first call compiles)."""
    ours = model
    packs(model, variant)
    if variant == "compile":
        from daguerre.compile import compile_for_inference_

        ours = compile_for_inference_(copy.deepcopy(model))
    scope = fused_attention if variant == "sdpa" else contextlib.nullcontext

    def daguerre_step():
        with scope():
            return ours(x, t, context)

    return {
        "daguerre": daguerre_step,
        "diffusers": lambda: ref(x, t, encoder_hidden_states=context, return_dict=False)[0],
    }


def time_cell(fns: dict, repeats: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per call of each function after one warm-up call each, in pairs run back to back (in alternating
    order, so that neither always runs first); and the max abs difference of their outputs."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    diff = (outs["daguerre"].float() - outs["diffusers"].float()).abs().max().item()
    return alternating_times(fns, repeats), diff


def peak_rss_gib() -> float:
    """This process's resident-set high-water mark in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB / 2**30  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux (or pass --no-memory)")


def memory_cell(impl: str, mode: str, size: int) -> dict[str, float]:
    """Run in a fresh process: build one model, run one step, report the RSS high-water marks."""
    torch.set_num_threads(THREADS)
    dtype, memory_format, variant = MODES[mode]
    model = build(impl, dtype, memory_format)
    if impl == "daguerre":
        packs(model, variant)
    loaded = peak_rss_gib()
    x, t, context = make_inputs(size, dtype, memory_format)
    with torch.inference_mode():
        if impl == "daguerre":
            if variant == "compile":  # the peak includes compiling and the frozen graph's copy of the weights
                from daguerre.compile import compile_for_inference_

                compile_for_inference_(model)
            with fused_attention() if variant == "sdpa" else contextlib.nullcontext():
                model(x, t, context)
        else:
            model(x, t, encoder_hidden_states=context)
    peak = peak_rss_gib()
    return {"peak": peak, "act": peak - loaded}


def measure_memory(impl: str, mode: str, size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-cell", json.dumps([impl, mode, size])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation and cell")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-cell memory subprocesses")
    parser.add_argument("--memory-cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_cell:
        print(json.dumps(memory_cell(*json.loads(args.memory_cell))))
        return

    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"median of {args.repeats} after 1 warm-up, batch {BATCH}, {CONTEXT_TOKENS}-token context", flush=True)
    rows = []
    model = random_sd15_unet(torch.float32, torch.contiguous_format)
    for mode in args.modes:
        dtype, memory_format, variant = MODES[mode]
        model = model.to(dtype=dtype, memory_format=memory_format)  # daguerre first, then diffusers shares it
        ref = diffusers_twin(model, memory_format)
        for size in args.sizes:
            x, t, context = make_inputs(size, dtype, memory_format)
            with torch.inference_mode():
                secs, diff = time_cell(step_fns(model, ref, x, t, context, variant), args.repeats)
            row = {"size": size, "mode": mode, "secs": secs, "diff": diff}  # secs: impl -> every timed call
            if not args.no_memory:
                row["mem"] = {impl: measure_memory(impl, mode, size) for impl in secs}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ref

    mem = not args.no_memory
    print()
    print("| latent | precision | daguerre s median (min) | diffusers s median (min) | ratio | max abs diff |"
          + (" daguerre peak GiB (+act) | diffusers peak GiB (+act) |" if mem else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if mem else ""))
    for r in rows:
        d, h = (statistics.median(r["secs"][impl]) for impl in ("daguerre", "diffusers"))
        dmin, hmin = (min(r["secs"][impl]) for impl in ("daguerre", "diffusers"))
        ratio = statistics.median(a / b for a, b in zip(r["secs"]["daguerre"], r["secs"]["diffusers"], strict=True))
        line = f"| {r['size']}x{r['size']} | {r['mode']} | {d:.2f} ({dmin:.2f}) | {h:.2f} ({hmin:.2f}) | {ratio:.2f} |"
        line += f" {r['diff']:.1e} |"
        if mem:
            for impl in ("daguerre", "diffusers"):
                line += f" {r['mem'][impl]['peak']:.2f} (+{r['mem'][impl]['act']:.2f}) |"
        print(line)
    print("\nissue 15's target: ratio <= 0.6 at 64x64 in bf16 (daguerre bf16 channels_last, its default attention "
          "form, against diffusers bf16 channels_last)")


if __name__ == "__main__":
    main()
