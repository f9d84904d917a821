"""What each fewer-network-calls setting saves: one SD 1.5 U-Net call of each kind, timed side by side.

The SD 1.5 U-Net (random weights) in bfloat16 at 64x64 latents (512 pixels) with a 77-token context:
- "guided": batch 2, the exact path's call (a classifier-free guidance pair);
- "cut off": batch 1, a call of the CFG cutoff or of guidance truncation (the conditional half alone);
- "DeepCache depth D": batch 2, a call that reuses the deep features (`FeatureCache`), so only the shallow
  path of D input and D output blocks runs;
- with `--tome R`: "ToMe R", batch 2 with token merging at ratio R, and the DeepCache calls with it too.
One warm-up call each, then the kinds alternate in every repeat (medians), so load drift hits them alike.
Then `--fast`'s run of 20 DPM++ 2M steps at 512x512 (the settings `GenerationRequest(fast=True)` resolves to
for SD 1.5) is replayed call by call through the same `FeatureCache` and cutoff rule the pipeline uses, and
its U-Net time estimated from the measured calls (a batch-1 call costs the "cut off" fraction of its batch-2
kind), as a fraction of the exact run's 20 guided calls.

    python bench/fewer_calls.py --depths 1 2 3 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from daguerre.config import preset
from daguerre.models.unet import FeatureCache
from sd15 import random_sd15_unet  # bench/sd15.py: the script's own folder is on the path

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
    unet = random_sd15_unet(torch.bfloat16, torch.contiguous_format)
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
    rel = {k: statistics.median(v) / base for k, v in times.items()}
    print(f"SD 1.5 U-Net call, bf16, {SIZE}x{SIZE} latents, {args.threads} threads, {args.repeats} repeats")
    print("| call | median s | min s | / guided call |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {statistics.median(ts) / base:.3f} |")
    if args.tome > 0 and 1 in args.depths:
        fast_run(rel, args.tome)


def fast_run(rel: dict[str, float], tome: float) -> None:
    """Replay `--fast` at SD 1.5's 20 DPM++ 2M steps and estimate its U-Net time (module docstring)."""
    from daguerre.diffusion.denoisers import Denoiser
    from daguerre.pipelines.request import GenerationRequest

    cfg = preset("sd15")
    req = GenerationRequest(prompt="a", steps=20, sampler="DPM++ 2M", fast=True).validate(cfg)
    if (req.tome_ratio, req.deepcache_depth) != (tome, 1):
        print(f"(--fast uses ToMe {req.tome_ratio:g} at depth {req.deepcache_depth}: run with those to estimate it)")
        return
    denoiser = Denoiser(lambda *a, **k: None, cfg.schedule)
    max_t = float(denoiser.sigma_to_t(torch.tensor([req.deepcache_max_sigma]))[0]) if req.deepcache_max_sigma else None
    cache = FeatureCache(req.deepcache_interval, req.deepcache_depth, max_t)
    full, shallow = rel[f"ToMe {tome:g}"], rel[f"DeepCache depth 1 + ToMe {tome:g}"]
    half = rel["cut off (batch 1)"]
    kinds: dict[str, int] = {}
    cost = 0.0
    for sigma in req.sigmas[:-1]:
        rows = 1 if float(sigma) < req.cfg_cutoff_sigma else 2
        t = denoiser.sigma_to_t(sigma.reshape(1))
        reused = cache.reuse((rows,), t)
        if not reused:
            cache.features = torch.zeros(())  # what the U-Net's full call stores
        kind = f"{'shallow' if reused else 'full'} batch {rows}"
        kinds[kind] = kinds.get(kind, 0) + 1
        cost += (shallow if reused else full) * (half if rows == 1 else 1.0)
    print(f"\n--fast at 20 steps of DPM++ 2M (cutoff {req.cfg_cutoff_sigma:g}, DeepCache {req.deepcache_interval} "
          f"below sigma {req.deepcache_max_sigma:g}, ToMe {req.tome_ratio:g}): calls {kinds}; U-Net time {cost:.2f} of "
          f"20 guided calls = {cost / 20:.3f} of the exact run")


if __name__ == "__main__":
    main()
