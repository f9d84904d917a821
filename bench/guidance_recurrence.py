"""A harness for issue 16: CLIP guidance's self-recurrence (`--clip-repeats`, guidance.self_recurrent; Bansal et
al. 2023, "Universal Guidance", sec. 3.3) over another sigma range than the shipped limits.RECURRENCE_SIGMAS.

Each sampler step whose starting sigma lies in [--low, --high] is taken `--repeats` times: after the step from
sigma_i to sigma_{i+1}, fresh noise of variance sigma_i^2 - sigma_{i+1}^2 takes x back to sigma_i and the step
is taken again (the guidance acting anew at the level where the object is decided). The range is set for this
process only (where the pipeline and a request's validation read it), then `daguerre eval` runs with
`--clip-repeats` and the remaining arguments, e.g.

    python bench/guidance_recurrence.py --repeats 4 --low 1 --high 10 -- \
        --model shapes --prompts single --n 48 --seed 1000 --cfg 0 --clip-guidance --out ev-rec4

A measurement harness, not a shipped option: the range was chosen with it.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--low", type=float, default=1.0)
    p.add_argument("--high", type=float, default=10.0)
    args = p.parse_args(argv[:split])
    import daguerre.pipelines.common as common
    import daguerre.pipelines.request as request
    from daguerre.cli import main as cli

    common.RECURRENCE_SIGMAS = request.RECURRENCE_SIGMAS = (args.low, args.high)
    torch.set_num_threads(1)
    return cli(["eval", *argv[split + 1:], "--clip-repeats", str(args.repeats)])


if __name__ == "__main__":
    sys.exit(main())
