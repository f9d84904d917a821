"""int8 weights on the Stable Diffusion 1.5 U-Net: resident weight bytes and the relative error of one step's output.

The real SD 1.5 U-Net architecture with random weights (tests/test_unet.py's `randomize_`: uniform, std
1/sqrt(fan_in)), batch 2, a 77-token context, one timestep: the output of the bf16 model, of the same model with
`daguerre.quantize.quantize_int8_` applied, and of the float32 model, as relative errors ||a - b|| / ||b||.
Random uniform weights are the easy case for absmax scales (no outliers); trained weights have heavier tails,
which is why the shipped models' adherence is measured too (docs/benchmarks.md, "int8 weights").

    python bench/int8_unet.py --text-encoder   # 32x32 latent, ~1-2 minutes on 2 idle cores
    python bench/int8_unet.py --size 64 --timestep 200
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daguerre.config import preset  # noqa: E402
from daguerre.quantize import quantize_int8_, weight_bytes  # noqa: E402
from sd15 import random_sd15_unet  # noqa: E402  (bench/sd15.py: the script's own folder is on the path)
from test_unet import randomize_  # noqa: E402  (one weight randomiser for tests and benchmarks)

BATCH = 2
CONTEXT_TOKENS = 77


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--timestep", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each model")
    parser.add_argument("--text-encoder", action="store_true", help="also quantise and compare the text encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset("sd15")
    model = random_sd15_unet(torch.float32, torch.contiguous_format)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, args.size, args.size, generator=g)
    context = torch.randn(BATCH, CONTEXT_TOKENS, cfg.unet.context_dim, generator=g)
    t = torch.full((BATCH,), args.timestep)
    with torch.inference_mode():
        out32 = model(x, t, context)
        model = model.bfloat16()
        bytes16 = weight_bytes(model)
        out16 = model(x.bfloat16(), t, context.bfloat16())
        quantized = copy.deepcopy(model)
        t0 = time.perf_counter()
        layers = quantize_int8_(quantized)
        secs_q = time.perf_counter() - t0
        bytes8 = weight_bytes(quantized)
        out8 = quantized(x.bfloat16(), t, context.bfloat16())  # also the warm-up call
        secs: dict[str, list[float]] = {"bf16": [], "int8": []}
        for r in range(args.repeats):  # alternating, so that load drift hits both alike
            for name in ("bf16", "int8")[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                (model if name == "bf16" else quantized)(x.bfloat16(), t, context.bfloat16())
                secs[name].append(time.perf_counter() - t0)
        secs16, secs8 = (statistics.median(secs[n]) for n in ("bf16", "int8"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD 1.5 U-Net, random weights, batch {BATCH}, "
          f"{args.size}x{args.size} latent, timestep {args.timestep}")
    print(f"int8 layers: {layers} (quantised in {secs_q:.1f} s)")
    print()
    print("| | resident weights | one step (s, median) | rel. error vs bf16 | rel. error vs fp32 |")
    print("|---|---|---|---|---|")
    print(f"| bf16 | {bytes16 / 2**30:.3f} GiB | {secs16:.2f} | - | {relative_error(out16, out32):.2e} |")
    print(f"| bf16 + int8 weights | {bytes8 / 2**30:.3f} GiB | {secs8:.2f} | {relative_error(out8, out16):.2e} | "
          f"{relative_error(out8, out32):.2e} |")
    if args.text_encoder:
        from daguerre.models.text_encoder import CLIPTextEncoder

        with torch.device("meta"):
            text = CLIPTextEncoder(cfg.text_encoder)
        text = randomize_(text.to_empty(device="cpu"), 2).eval().bfloat16()
        tokens = torch.randint(0, cfg.text_encoder.vocab_size, (BATCH, CONTEXT_TOKENS), generator=g)
        with torch.inference_mode():
            ref, before = text(tokens).hidden, weight_bytes(text)
            n = quantize_int8_(text)
            err = relative_error(text(tokens).hidden, ref)
        after = weight_bytes(text)
        print(f"| text encoder bf16 -> int8 ({n} layers) | {before / 2**30:.3f} -> {after / 2**30:.3f} GiB | | "
              f"{err:.2e} | |")


if __name__ == "__main__":
    main()
