"""Where one SD 1.5 U-Net step goes, by operator: seconds, share and GFLOP/s (torch.profiler).

The SD 1.5 architecture with random weights, bf16, channels_last, batch 2 (a guidance pair), a 77-token
context, daguerre's default attention form. Three timed steps after a warm-up, then one step under the
profiler; convolution FLOPs are counted by hooks (the profiler does not count them), matmul FLOPs by the
profiler. Run it on a quiet machine: it is the evidence for what a faster kernel of each kind could gain.

    python bench/unet_breakdown.py --threads 2 --size 64
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from sd15 import random_sd15_unet  # bench/sd15.py: the script's own folder is on the path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px)")
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = random_sd15_unet(torch.bfloat16, torch.channels_last)
    torch.manual_seed(0)  # the inputs
    x = torch.randn(2, 4, args.size, args.size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    t, ctx = torch.tensor([999, 500]), torch.randn(2, 77, 768, dtype=torch.bfloat16)
    conv_flops = [0]

    def count(mod: torch.nn.Conv2d, inputs, out: torch.Tensor) -> None:
        conv_flops[0] += 2 * out.numel() * mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(x, t, ctx)
        for h in hooks:
            h.remove()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(x, t, ctx)
            times.append(time.perf_counter() - t0)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            model(x, t, ctx)
    print(f"step: {', '.join(f'{s:.2f}' for s in times)} s ({args.threads} threads, {args.size}x{args.size} latents)")
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.key_averages():
        table[e.key][0] += e.self_cpu_time_total / 1e6
        table[e.key][1] += e.flops or 0
    table["aten::mkldnn_convolution"][1] = conv_flops[0]
    total = sum(v[0] for v in table.values())
    print("| operator | s | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for name, (s, f) in sorted(table.items(), key=lambda kv: -kv[1][0])[:args.rows]:
        rate = f"{f / 1e9 / s:.0f}" if f else ""
        print(f"| `{name}` | {s:.3f} | {100 * s / total:.1f}% | {f / 1e9:.1f} | {rate} |")
    print(f"| all | {total:.3f} | | {sum(v[1] for v in table.values()) / 1e9:.1f} | |")


if __name__ == "__main__":
    main()
