"""Does token merging (ToMe for SD, Bolya & Hoffman 2023) pay on this CPU? One SD 1.5 U-Net step, timed.

The SD 1.5 U-Net (random weights, `random:sd15` shape) in bfloat16, batch 2 (a guidance pair), 64x64 latents
(512 pixels), a 77-token context. The self-attention of every transformer at the highest resolution (the
4096-token blocks: input_blocks 1-2, output_blocks 9-11) runs on the tokens `daguerre.nn.tome` leaves after
merging `ratio` of them, and is unmerged after (ToMe for SD's default: self-attention only, stride 2). The
ratios alternate within each repeat, after one warm-up call each, so load drift hits them alike; medians.
`--form sdpa` forces torch's fused attention kernel, `--form auto` keeps daguerre's choice (nn/attention.py).

    python bench/tome_step.py --ratios 0 0.5 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daguerre.config import preset  # noqa: E402
from daguerre.models.unet import BasicTransformerBlock, UNetModel  # noqa: E402
from daguerre.nn import attention as attention_module  # noqa: E402
from daguerre.nn.tome import bipartite_merge  # noqa: E402
from test_unet import randomize_  # noqa: E402

SIZE = 64
BATCH = 2
CONTEXT_TOKENS = 77


def tome_forward(ratio: list[float], hw: tuple[int, int]):
    """A BasicTransformerBlock.forward whose self-attention runs on merged tokens when ratio[0] > 0."""

    def forward(self, x, context):
        y = self.norm1(x)
        if ratio[0] > 0:
            plan = bipartite_merge(y, *hw, ratio[0])
            x = x + plan.unmerge(self.attn1(plan.merge(y)))
        else:
            x = x + self.attn1(y)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    return forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--form", choices=["auto", "sdpa"], default="auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.form == "sdpa":
        attention_module._form = lambda q, k, v: "sdpa"
    cfg = preset("sd15").unet
    unet = randomize_(UNetModel(cfg)).to(torch.bfloat16).eval()
    ratio = [0.0]
    full_res = [*unet.input_blocks[1:3], *unet.output_blocks[9:12]]
    patched = 0
    for block in full_res:
        for m in block.modules():
            if isinstance(m, BasicTransformerBlock):
                m.forward = types.MethodType(tome_forward(ratio, (SIZE, SIZE)), m)
                patched += 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, SIZE, SIZE, generator=g)
    ctx = torch.randn(BATCH, CONTEXT_TOKENS, cfg.context_dim, generator=g)
    t = torch.tensor([999.0, 999.0])
    times: dict[float, list[float]] = {r: [] for r in args.ratios}
    outs = {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):
            for r in args.ratios:
                ratio[0] = r
                t0 = time.perf_counter()
                outs[r] = unet(x, t, ctx).float()
                if rep:  # the first round warms up
                    times[r].append(time.perf_counter() - t0)
    base = args.ratios[0]
    print(f"SD 1.5 U-Net step, bf16, batch {BATCH}, {SIZE}x{SIZE} latents, {args.threads} threads, attention "
          f"form {args.form}, {patched} self-attention layers merged, {args.repeats} repeats")
    print(f"| ratio | median s | min s | vs ratio {base:g} | rel. diff of output |")
    print("|---|---|---|---|---|")
    for r in args.ratios:
        med = statistics.median(times[r])
        rel = float((outs[r] - outs[base]).norm() / outs[base].norm())
        print(f"| {r:g} | {med:.2f} | {min(times[r]):.2f} | {med / statistics.median(times[base]):.2f} | "
              f"{rel:.3f} |")


if __name__ == "__main__":
    main()
