"""What each fewer-network-calls setting saves: one SD 1.5 U-Net call of each kind, timed side by side.

The SD 1.5 U-Net (random weights) in bfloat16 at 64x64 latents (512 pixels) with a 77-token context:
- "guided": batch 2, the exact path's call (a classifier-free guidance pair);
- "cut off": batch 1, a call of the CFG cutoff or of guidance truncation (the conditional half alone);
- "DeepCache depth D": batch 2, a call that reuses the deep features (`FeatureCache`), so only the shallow
  path of D input and D output blocks runs;
- with `--tome R`: "ToMe R", batch 2 with token merging at ratio R, and the DeepCache calls with it too.
One warm-up call each, then the kinds alternate in every repeat (medians), so load drift hits them alike.
The cost of a sampling run follows: with DeepCache at interval N, (1 full + (N-1) shallow) / N per call.

    python bench/fewer_calls.py --depths 1 2 3 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daguerre.config import preset  # noqa: E402
from daguerre.models.unet import FeatureCache, UNetModel  # noqa: E402
from test_unet import randomize_  # noqa: E402

SIZE = 64
CONTEXT_TOKENS = 77


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tome", type=float, default=0.0, help="also time token merging at this ratio")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset("sd15").unet
    unet = randomize_(UNetModel(cfg)).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIZE, SIZE, generator=g)
    ctx = torch.randn(2, CONTEXT_TOKENS, cfg.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])

    def shallow(depth: int, tome: float = 0.0):
        cache = FeatureCache(2, depth)
        unet(x, t, ctx, cache=cache, tome=tome)  # fills the cache (not timed)
        return lambda: unet(x, t, ctx, cache=cache, tome=tome)  # the next call reuses

    kinds = {"guided (batch 2)": lambda: unet(x, t, ctx), "cut off (batch 1)": lambda: unet(x[:1], t[:1], ctx[:1])}
    names = [*kinds, *(f"DeepCache depth {d}" for d in args.depths)]
    if args.tome > 0:
        kinds[f"ToMe {args.tome:g}"] = lambda: unet(x, t, ctx, tome=args.tome)
        names += [f"ToMe {args.tome:g}", *(f"DeepCache depth {d} + ToMe {args.tome:g}" for d in args.depths)]
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for rep in range(args.repeats + 1):
            for name in times:
                if name.startswith("DeepCache"):
                    call = shallow(int(name.split()[2]), args.tome if "ToMe" in name else 0.0)
                else:
                    call = kinds[name]
                t0 = time.perf_counter()
                call()
                if rep:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["guided (batch 2)"])
    print(f"SD 1.5 U-Net call, bf16, {SIZE}x{SIZE} latents, {args.threads} threads, {args.repeats} repeats")
    print("| call | median s | min s | / guided call |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {statistics.median(ts) / base:.3f} |")


if __name__ == "__main__":
    main()
