"""The shipped small models end to end in fp32 and bf16, contiguous and channels_last, on one thread.

What `--dtype auto` decides for small U-Nets on a CPU with bf16 units (daguerre.precision,
BF16_MIN_UNET_PARAMETERS) rests on this table: the default generation of each shipped model
(its recommended sampler and steps), timed in each setting in turn, `--repeats` rounds, medians.

    OMP_NUM_THREADS=1 python bench/precision_small.py [--models shapes fashion] [--n 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import daguerre

SETTINGS = (("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True))  # (dtype, channels_last)
PROMPTS = {"shapes": "a red circle above a blue square", "fashion": "a photo of an ankle boot"}


def set_layout(pipe, dtype: str, channels_last: bool) -> None:
    from daguerre.precision import named_dtype

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in (pipe.components.unet, pipe.components.vae, pipe.components.text_encoder):
        if module is not None:
            module.to(named_dtype(dtype))
            module.to(memory_format=fmt)


def bench(model: str, n: int, repeats: int) -> dict[tuple[str, bool], list[float]]:
    pipe = daguerre.load(model, dtype="fp32")
    prompt = PROMPTS.get(model, "a cat")
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        for dtype, cl in SETTINGS:
            set_layout(pipe, dtype, cl)
            pipe(prompt, seed=1, n=n, batch_size=n, steps=3)  # warm-up
            t = time.perf_counter()
            pipe(prompt, seed=1, n=n, batch_size=n)
            times.setdefault((dtype, cl), []).append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["shapes", "fashion"])
    ap.add_argument("--n", type=int, default=1, help="images per call (one batch)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the automatic choice for small models
    print("| model | U-Net params | n | " + " | ".join(f"{d}{' channels_last' if c else ''} s" for d, c in SETTINGS)
          + " | bf16 / fp32 |")
    print("|---" * (len(SETTINGS) + 4) + "|")
    for model in args.models:
        times = bench(model, args.n, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        size = sum(p.numel() for p in daguerre.load(model, dtype="fp32").components.unet.parameters())
        cells = " | ".join(f"{med[k]:.3f}" for k in SETTINGS)
        print(f"| {model} | {size / 1e6:.1f}M | {args.n} | {cells} | {med['bf16', False] / med['fp32', False]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
