"""Seconds per CLIP-guided image on the shapes model, CLIP files side by side (alternating rounds, medians).

    python bench/clip_guidance_speed.py CLIP [CLIP ...] [--n 8] [--rounds 3] [--repeats 1 8]

Each round times, for every CLIP and every `--clip-repeats` value in turn (default: the recommended one), one
batch of `n` images at `--cfg 0 --clip-guidance 500` (Euler a, the model's 25 steps, bf16 at one thread as eval
runs), then the unguided batch; prints medians per image and each variant's median ratio to the unguided run of
its round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import daguerre
from daguerre.pipelines.request import CLIP_REPEATS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("clips", nargs="+")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, nargs="+", default=[CLIP_REPEATS])
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = daguerre.load("shapes")
    fields = {"cfg_scale": 0.0, "sampler": "Euler a", "n": args.n, "batch_size": args.n, "seed": 1000}
    pipe("a red circle", **{**fields, "n": 1, "batch_size": 1, "clip_guidance": 500.0, "clip_model": args.clips[0]})
    variants = {f"{clip} x{r}": {"clip_guidance": 500.0, "clip_model": clip, "clip_repeats": r}
                for clip in args.clips for r in args.repeats}
    times: dict[str, list[float]] = {v: [] for v in [*variants, "unguided"]}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name in [*variants, "unguided"]:
            began = time.perf_counter()
            pipe("a red circle", **fields, **variants.get(name, {}))
            times[name].append((time.perf_counter() - began) / args.n)
        for name in variants:
            ratios[name].append(times[name][-1] / times["unguided"][-1])
    for name, ts in times.items():
        ratio = f", {statistics.median(ratios[name]):.2f}x unguided" if name in ratios else ""
        print(f"{name}: {statistics.median(ts):.2f} s / image (min {min(ts):.2f}){ratio}")


if __name__ == "__main__":
    main()
