"""Attention in training on the CPU: torch's fused kernel against daguerre's two-matmul form.

Two tables. First, forward + backward of one attention call at the shapes a training step of the
`shapes` model makes (batch 32: the U-Net's 8x8 and 4x4 self- and cross-attention, the causal text
encoder), in bfloat16 and float32. Second, one whole optimizer step of that model (random weights at
the shipped shapes_ldm config's architecture, bf16 autocast, batch 32), with the dispatch of
`daguerre.nn.attention` forced to either form. Calls alternate between the two forms in back-to-back
rounds, so that machine-load drift hits both alike; the tables give medians and the ratio.

    python bench/attention_training.py                 # ~2 minutes on one core
    python bench/attention_training.py --rounds 5 --steps 4
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F

attn = importlib.import_module("daguerre.nn.attention")
BATCH = 32
# (name, heads, query length, key length, head dim, causal): what one training step of `shapes` calls
SHAPES = [("U-Net 8x8 self", 4, 64, 64, 32, False), ("U-Net 8x8 cross", 4, 64, 77, 32, False),
          ("U-Net 4x4 cross", 4, 16, 77, 32, False), ("text encoder", 4, 77, 77, 24, True)]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def call_table(rounds: int, repeats: int) -> None:
    print(f"{'attention call (fwd + bwd)':<28}{'dtype':<10}{'fused ms':>10}{'matmul ms':>11}{'fused / matmul':>16}")
    for name, heads, tq, tk, d, causal in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(BATCH, heads, tq, d, generator=g).to(dtype).requires_grad_()
            k, v = (torch.randn(BATCH, heads, tk, d, generator=g).to(dtype).requires_grad_() for _ in range(2))

            def fused(q=q, k=k, v=v, causal=causal):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).float().sum().backward()

            def matmul(q=q, k=k, v=v, causal=causal):
                attn.matmul_attention(q, k, v, causal=causal).float().sum().backward()

            a, b = [], []
            for _ in range(rounds):
                a.append(_time(fused, repeats))
                b.append(_time(matmul, repeats))
            fa, fb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"{name:<28}{str(dtype).replace('torch.', ''):<10}{fa:>10.2f}{fb:>11.2f}{fa / fb:>16.2f}")


def step_table(rounds: int, steps: int) -> None:
    from daguerre.models.text_encoder import CLIPTextEncoder
    from daguerre.models.tokenizer import CLIPTokenizer
    from daguerre.models.unet import UNetModel
    from daguerre.training.config import derive_model_config, load_run_config
    from daguerre.training.ldm import DiffusionModel

    cfg = derive_model_config(load_run_config("shapes_ldm", "ldm"), 3, None)
    torch.manual_seed(0)
    model = DiffusionModel(UNetModel(cfg.unet).train(), CLIPTextEncoder(cfg.text_encoder).train())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    x = torch.randn(BATCH, 4, 16, 16)
    t = torch.randint(0, 1000, (BATCH,)).float()
    ids = CLIPTokenizer()(["a large red circle above a small blue square on a black background"] * BATCH)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, ids=ids)
        ((out.float() - x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()

    real = attn._form  # with gradients in bf16 on the CPU it picks the matmul form; "fused" forces SDPA
    times = {"fused": [], "matmul": []}
    try:
        for _ in range(rounds):
            for name in times:
                attn._form = real if name == "matmul" else (lambda *a: "sdpa")
                times[name].append(_time(step, steps))
    finally:
        attn._form = real
    fa, fb = statistics.median(times["fused"]), statistics.median(times["matmul"])
    print(f"\nshapes training step (batch {BATCH}, bf16 autocast): fused {fa:.3f} s, matmul {fb:.3f} s, "
          f"{fa / fb:.2f}x ({BATCH / fa:.1f} -> {BATCH / fb:.1f} images/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="calls per timing of one attention call")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timing of the whole step")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    call_table(args.rounds, args.repeats)
    step_table(args.rounds, args.steps)


if __name__ == "__main__":
    main()
