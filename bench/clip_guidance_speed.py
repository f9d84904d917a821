"""Seconds per CLIP-guided image on the shapes model, CLIP files side by side (alternating rounds, medians).

    python bench/clip_guidance_speed.py CLIP [CLIP ...] [--n 8] [--rounds 3]

Each round times, for every CLIP in turn, one batch of `n` images at `--cfg 0 --clip-guidance 500` (Euler a,
the model's 25 steps, bf16 at one thread as eval runs), then the unguided batch; prints medians per image and
each CLIP's median ratio to the unguided run of its round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import daguerre


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("clips", nargs="+")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = daguerre.load("shapes")
    fields = {"cfg_scale": 0.0, "sampler": "Euler a", "n": args.n, "batch_size": args.n, "seed": 1000}
    pipe("a red circle", **{**fields, "n": 1, "batch_size": 1, "clip_guidance": 500.0, "clip_model": args.clips[0]})
    times: dict[str, list[float]] = {c: [] for c in [*args.clips, "unguided"]}
    ratios: dict[str, list[float]] = {c: [] for c in args.clips}
    for _ in range(args.rounds):
        for clip in [*args.clips, "unguided"]:
            extra = {} if clip == "unguided" else {"clip_guidance": 500.0, "clip_model": clip}
            began = time.perf_counter()
            pipe("a red circle", **fields, **extra)
            times[clip].append((time.perf_counter() - began) / args.n)
        for clip in args.clips:
            ratios[clip].append(times[clip][-1] / times["unguided"][-1])
    for clip, ts in times.items():
        ratio = f", {statistics.median(ratios[clip]):.2f}x unguided" if clip in ratios else ""
        print(f"{clip}: {statistics.median(ts):.2f} s / image (min {min(ts):.2f}){ratio}")


if __name__ == "__main__":
    main()
