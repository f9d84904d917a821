"""One SD 1.5 U-Net step with oneDNN-packed weights against torch's layers, alternating in one process.

Two copies of the SD 1.5 U-Net with the same random weights, bf16 channels_last, batch 2 with a 77-token
context: one as `daguerre.load` sets it up in bf16 on a CPU (`daguerre.nn.conv.pack_for_inference_`), one with
torch's Conv2d / Linear layers. One warm-up call each (the packed copy packs its weights there), then calls in
back-to-back pairs, alternating which goes first; medians (minima), the median per-pair ratio packed / plain,
and whether the outputs are equal bit for bit. Holds two U-Nets (~3.4 GiB).

    python bench/packed_step.py --threads 2 --sizes 32 64 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from daguerre.nn.conv import pack_for_inference_
from sd15 import random_sd15_unet  # bench/sd15.py: the script's own folder is on the path
from timing import alternating_times  # bench/timing.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plain = random_sd15_unet(torch.bfloat16, torch.channels_last)
    packed = copy.deepcopy(plain)
    layers = pack_for_inference_(packed)
    print(f"torch {torch.__version__}, {args.threads} threads, {layers} packed layers, median of {args.repeats}",
          flush=True)
    print("| latent | packed s median (min) | torch's layers s median (min) | packed / torch's | equal |\n"
          "|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for size in args.sizes:
        x = torch.randn(2, 4, size, size, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        t, ctx = torch.tensor([999, 500]), torch.randn(2, 77, 768, generator=g).to(torch.bfloat16)
        args_ = (x, t, ctx)
        fns = {"packed": lambda a=args_: packed(*a), "plain": lambda a=args_: plain(*a)}
        with torch.inference_mode():
            outs = {name: fn() for name, fn in fns.items()}  # warm-up (packs)
            secs = alternating_times(fns, args.repeats)
        ratio = statistics.median(a / b for a, b in zip(secs["packed"], secs["plain"], strict=True))
        cells = " | ".join(f"{statistics.median(secs[n]):.2f} ({min(secs[n]):.2f})" for n in fns)
        print(f"| {size}x{size} | {cells} | {ratio:.2f} | {torch.equal(outs['packed'], outs['plain'])} |",
              flush=True)


if __name__ == "__main__":
    main()
