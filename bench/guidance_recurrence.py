"""A harness for issue 16: does per-step self-recurrence (Bansal et al. 2023, "Universal Guidance", sec. 3.3)
help CLIP guidance draw the asked object?

Each sampler step whose starting sigma lies in [--low, --high] is taken `--repeats` times: after the step from
sigma_i to sigma_{i+1}, fresh noise of variance sigma_i^2 - sigma_{i+1}^2 takes x back to sigma_i and the step
is taken again (the guidance acting anew at the level where the object is decided). It wraps the chosen
sampler one step at a time (so a multistep sampler runs first order), patched into the pipeline for this
process only, then runs `daguerre eval` with the remaining arguments, e.g.

    python bench/guidance_recurrence.py --repeats 4 --low 1 --high 10 -- \
        --model shapes --prompts single --n 48 --seed 1000 --cfg 0 --clip-guidance --out ev-rec4

A measurement harness, not a shipped option.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def recurrent(sampler, repeats: int, low: float, high: float):
    from daguerre.diffusion.noise import randn_like

    def run(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **kwargs):
        sig = sigmas.detach().cpu()
        for i in range(len(sig) - 1):
            hi, lo = float(sig[i]), float(sig[i + 1])
            reps = repeats if low <= hi <= high else 1
            for r in range(reps):
                x = sampler(denoiser, x, sigmas[i:i + 2], extra_args=extra_args, callback=callback,
                            generator=generator, **kwargs)
                if r < reps - 1:
                    x = x + randn_like(x, generator) * math.sqrt(max(hi * hi - lo * lo, 0.0))
        return x

    return run


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--low", type=float, default=1.0)
    p.add_argument("--high", type=float, default=10.0)
    args = p.parse_args(argv[:split])
    import daguerre.pipelines.common as common
    from daguerre.cli import main as cli

    patched = {k: recurrent(v, args.repeats, args.low, args.high) for k, v in common.SAMPLERS.items()}
    common.SAMPLERS = patched
    torch.set_num_threads(1)
    return cli(["eval", *argv[split + 1:]])


if __name__ == "__main__":
    sys.exit(main())
