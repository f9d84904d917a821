"""Where the time of one chunked bf16 attention call goes, part by part, at the SD 1.5 U-Net's widest shape.

The shape: batch 2 x 8 heads, 4096 query and key tokens, head width 40 (the self-attention of a 512x512 image's
64x64 latents), in the query chunks `daguerre.nn.attention.chunked_attention` uses (2^22 scores: 64 rows).
Each part runs over all 64 chunks of one call, as that function runs it, after one warm-up; medians of 5.
Also: the same first product with the head width zero-padded to 64 (the same scores, a width oneDNN's bf16
kernels prefer), to see whether padding pays; and, against the whole chunked call, torch's `flex_attention`
compiled by inductor (`--flex`: a fused CPU kernel from a template, compiled once for about 10 s).

    python bench/attention_parts.py [--flex]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from daguerre.nn.attention import CHUNK_ELEMENTS, chunked_attention

THREADS = 2
BATCH_HEADS, TOKENS, WIDTH = 16, 4096, 40


def per_call_ms(fn, chunks: int, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(chunks):
            fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flex", action="store_true", help="also time inductor's compiled flex_attention")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    rows = CHUNK_ELEMENTS // (BATCH_HEADS * TOKENS)
    chunks = TOKENS // rows
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH_HEADS, rows, WIDTH, generator=g).bfloat16()
    k = torch.randn(BATCH_HEADS, TOKENS, WIDTH, generator=g).bfloat16()
    v = torch.randn(BATCH_HEADS, TOKENS, WIDTH, generator=g).bfloat16()
    scores = torch.empty(BATCH_HEADS, rows, TOKENS, dtype=torch.bfloat16)
    probs = torch.empty_like(scores)
    kt = k.transpose(1, 2)
    pad = 64 - WIDTH
    q64, kt64 = torch.nn.functional.pad(q, (0, pad)), torch.nn.functional.pad(k, (0, pad)).transpose(1, 2)
    flop = 2.0 * BATCH_HEADS * TOKENS * TOKENS * WIDTH  # one product over the whole call
    parts = {
        "q k^T (baddbmm, bf16)": (lambda: torch.baddbmm(scores, q, kt, beta=0, alpha=WIDTH**-0.5, out=scores), flop),
        "softmax (float32 inside, bf16 out)": (lambda: torch.ops.aten._softmax.out(scores, -1, False, out=probs), 0),
        "probabilities @ v (bmm, bf16)": (lambda: torch.bmm(probs, v), flop),
        "q k^T, width padded to 64": (lambda: torch.baddbmm(scores, q64, kt64, beta=0, alpha=WIDTH**-0.5, out=scores),
                                      flop),
    }
    print(f"# one call: {BATCH_HEADS} batch x heads, {TOKENS} tokens, width {WIDTH}, {chunks} chunks of {rows} rows, "
          f"{THREADS} threads, torch {torch.__version__}")
    print("| part | ms per call | GFLOP/s (of the unpadded work) |")
    print("|---|---|---|")
    for name, (fn, work) in parts.items():
        ms = per_call_ms(fn, chunks)
        rate = f"{work / ms / 1e6:.0f}" if work else ""
        print(f"| {name} | {ms:.1f} | {rate} |")
    whole = [torch.randn(2, BATCH_HEADS // 2, TOKENS, WIDTH, generator=g).bfloat16() for _ in range(3)]
    calls = {"the whole chunked call (daguerre)": lambda: chunked_attention(*whole)}
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        calls["the whole call, inductor's flex_attention"] = lambda: compiled(*whole)
    with torch.no_grad():
        for name, fn in calls.items():
            ms = per_call_ms(fn, 1)
            print(f"| {name} | {ms:.1f} | {2 * flop / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
