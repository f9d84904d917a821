"""Attention at inference: torch's fused kernel (SDPA) against daguerre's chunked matmul form, at the shapes of SD 1.5.

One attention call (no gradients) at each shape of a Stable Diffusion 1.5 U-Net step at 512x512 px (batch 2,
8 heads: 4096 tokens x 40 dims, 1024 x 80, 256 x 160, 64 x 160; self-attention, and cross-attention to the
77-token prompt) and the VAE's single-head 512-dim middle attention at 4096 tokens, in float32 and bfloat16.
The two forms alternate (which goes first alternates too), one warm-up call each; the table gives the median
seconds of each (and the minimum, the nearest to an idle machine) and, as "sdpa / chunked", the median of
the per-pair ratios, so that machine-load drift hits both
alike. "max abs diff" is between the two forms' outputs (float32: the chunked form against SDPA; bfloat16: both
against the float32 SDPA of the same inputs, as "sdpa err / chunked err"). The crossover rule in
daguerre.nn.attention (`chunked_pays`) is read off this table.

    python bench/attention_inference.py                 # ~2-4 minutes on 2 idle cores
    python bench/attention_inference.py --repeats 3 --dtypes bf16 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

from daguerre.nn.attention import CHUNK_ELEMENTS, chunked_attention, chunked_pays
from timing import alternating_times  # bench/timing.py: the script's own folder is on the path

BATCH = 2
CONTEXT_TOKENS = 77
# name -> (batch, heads, query tokens, key tokens, head dim)
SHAPES = {
    "self 64x64 (4096 x 8x40)": (BATCH, 8, 4096, 4096, 40),
    "cross 64x64 (4096 x 77, 8x40)": (BATCH, 8, 4096, CONTEXT_TOKENS, 40),
    "self 32x32 (1024 x 8x80)": (BATCH, 8, 1024, 1024, 80),
    "cross 32x32 (1024 x 77, 8x80)": (BATCH, 8, 1024, CONTEXT_TOKENS, 80),
    "self 16x16 (256 x 8x160)": (BATCH, 8, 256, 256, 160),
    "cross 16x16 (256 x 77, 8x160)": (BATCH, 8, 256, CONTEXT_TOKENS, 160),
    "self 8x8 (64 x 8x160)": (BATCH, 8, 64, 64, 160),
    "cross 8x8 (64 x 77, 8x160)": (BATCH, 8, 64, CONTEXT_TOKENS, 160),
    "VAE mid (4096 x 1x512, batch 1)": (1, 1, 4096, 4096, 512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as the networks pass them: (B, heads, T, d) views of (B, T, heads*d) projections."""
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, h, d, generator=g).transpose(1, 2) for t in (tq, tk, tk))


def flops(shape: tuple[int, ...]) -> float:
    b, h, tq, tk, d = shape
    return 4.0 * b * h * tq * tk * d  # q k^T and p v, 2 FLOP per multiply-add


def time_pair(fns: dict, repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    return alternating_times(fns, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per form and cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS, help="scores per query chunk")
    parser.add_argument("--shapes", nargs="+", type=int, help="indices into the shape list (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, median of "
          f"{args.repeats} after 1 warm-up, chunks of <= {args.chunk_elements} scores", flush=True)
    print()
    print("| shape | dtype | SDPA ms median (min) | chunked ms median (min) | sdpa / chunked "
          "| chunked GFLOP/s (at min) | max abs diff | rule picks |")
    print("|---|---|---|---|---|---|---|---|")
    names = list(SHAPES)
    for idx in args.shapes if args.shapes else range(len(names)):
        name = names[idx]
        shape = SHAPES[name]
        q32, k32, v32 = inputs(shape)
        with torch.inference_mode():
            ref = F.scaled_dot_product_attention(q32, k32, v32)
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                q, k, v = (t.to(dtype) for t in (q32, k32, v32))
                fns = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                       "chunked": lambda q=q, k=k, v=v: chunked_attention(q, k, v,
                                                                          chunk_elements=args.chunk_elements)}
                times = time_pair(fns, args.repeats)
                s, c = (statistics.median(times[n]) for n in ("sdpa", "chunked"))
                smin, cmin = (min(times[n]) for n in ("sdpa", "chunked"))
                ratio = statistics.median(a / b for a, b in zip(times["sdpa"], times["chunked"], strict=True))
                out_s, out_c = (fns[n]().float() for n in ("sdpa", "chunked"))
                if dtype == torch.float32:
                    diff = f"{(out_c - out_s).abs().max().item():.1e}"
                else:
                    diff = f"{(out_s - ref).abs().max().item():.1e} / {(out_c - ref).abs().max().item():.1e}"
                picks = "chunked" if chunked_pays(dtype, "cpu") else "sdpa"
                print(f"| {name} | {dname} | {s * 1e3:.1f} ({smin * 1e3:.1f}) | {c * 1e3:.1f} ({cmin * 1e3:.1f}) | "
                      f"{ratio:.2f} | {flops(shape) / cmin / 1e9:.0f} | {diff} | {picks} |", flush=True)


if __name__ == "__main__":
    main()
