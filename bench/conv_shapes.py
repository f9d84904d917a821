"""Every distinct convolution and linear layer of one SD 1.5 U-Net step (and of the VAE decoder), each form timed.

The shapes are read off the real networks: the SD 1.5 U-Net (batch 2, a 77-token context, `--size` latents)
and, with `--vae`, the VAE decoder (batch 1, the same latent), run on the meta device with hooks on every
Conv2d and Linear. Each distinct (input, weight, stride, padding) is then timed in `--dtype` with random
values, channels_last as daguerre runs it, in every form that applies (daguerre.nn.conv):

- convolutions: `conv2d` (F.conv2d channels_last: what runs today), `contiguous` (F.conv2d on NCHW input and
  weight), `packed` (oneDNN with the weight reordered once for this input size), `im2col` (patches in bands
  of <= 2^22 elements, one GEMM per band), `shifted` (k*k shifted GEMMs; stride 1), `linear1x1` (1x1 as a
  GEMM over the NHWC view);
- linear layers: `linear` (F.linear: today), `packed`, `pretransposed` (addmm with a contiguous (in, out)
  weight).

The forms of a shape run in turn, alternating the order each round, `--repeats` rounds after one warm-up
call each, interleaved with a 2048^2 bf16 matmul (the reference speed, "peak" below). Printed per shape:
medians in ms, GFLOP/s, each form's median per-round time ratio to the first (today's) form, and its error:
max |out - fp32 reference| / max |fp32 reference|, the reference being F.conv2d / F.linear in float32 on the
same (rounded) inputs; "=" marks a form equal to today's bit for bit. Then the step totals: each shape's
median times its count.

    python bench/conv_shapes.py --threads 2 --size 64 --repeats 5
    python bench/conv_shapes.py --threads 1 --size 64 --vae --kinds conv
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import conv_forms  # bench/: the forms tried besides packing (run as a script, bench/ is on sys.path)
from daguerre.config import preset
from daguerre.models.autoencoder import AutoencoderKL
from daguerre.models.unet import UNetModel
from daguerre.nn import conv as kernels

Shape = tuple  # (kind, input shape, weight shape, stride, padding, groups, has bias)
FORMS = {"conv": ("conv2d", "contiguous", "packed", "im2col", "shifted", "linear1x1"),
         "linear": ("linear", "packed", "pretransposed")}


def network_shapes(net: str, size: int) -> collections.Counter:
    """Counter of the distinct Conv2d / Linear calls of one forward of `net` ("unet" or "vae"), on meta."""
    cfg = preset("sd15")
    seen: collections.Counter = collections.Counter()

    def hook(mod: nn.Module, inputs, out) -> None:
        x = inputs[0]
        if isinstance(mod, nn.Conv2d):
            seen[("conv", tuple(x.shape), tuple(mod.weight.shape), mod.stride, mod.padding, mod.groups,
                  mod.bias is not None)] += 1
        else:
            seen[("linear", tuple(x.shape), tuple(mod.weight.shape), None, None, 1, mod.bias is not None)] += 1

    with torch.device("meta"):
        model = UNetModel(cfg.unet) if net == "unet" else AutoencoderKL(cfg.vae)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(hook)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    with torch.inference_mode():
        if net == "unet":
            model(torch.empty(2, 4, size, size, **meta), torch.tensor([999, 500], device="meta"),
                  torch.empty(2, 77, 768, **meta))
        else:
            model.decode(torch.empty(1, cfg.vae.latent_channels, size, size, **meta))
    return seen


def flops(shape: Shape) -> float:
    kind, xs, ws, stride, padding, groups, _ = shape
    if kind == "linear":
        return 2.0 * torch.Size(xs[:-1]).numel() * ws[0] * ws[1]
    ho = (xs[2] + 2 * padding[0] - ws[2]) // stride[0] + 1
    wo = (xs[3] + 2 * padding[1] - ws[3]) // stride[1] + 1
    return 2.0 * xs[0] * ho * wo * ws[0] * ws[1] * ws[2] * ws[3]


def forms(shape: Shape, dtype: torch.dtype, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """{form name: call} for one shape on random inputs, and the float32 reference output."""
    kind, xs, ws, stride, padding, groups, has_bias = shape
    fan_in = torch.Size(ws[1:]).numel()
    x = torch.randn(xs, generator=g).to(dtype)
    w = (torch.randn(ws, generator=g) / fan_in**0.5).to(dtype)
    b = torch.randn(ws[0], generator=g).to(dtype) if has_bias else None
    bf = None if b is None else b.float()
    if kind == "linear":
        ref = F.linear(x.float(), w.float(), bf)
        packed = kernels.pack_linear_weight(w, torch.Size(xs[:-1]).numel()) if dtype == torch.bfloat16 else None
        wt = w.t().contiguous()
        x2 = x.reshape(-1, xs[-1])
        fns = {"linear": lambda: F.linear(x, w, b),
               "pretransposed": lambda: (x2 @ wt if b is None else torch.addmm(b, x2, wt)).view(*xs[:-1], -1)}
        if packed is not None:
            fns["packed"] = lambda: kernels.packed_linear(x, packed, b)
        return fns, ref
    cl = torch.channels_last
    x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
    xc, wc = x.contiguous(), w.contiguous()
    ref = F.conv2d(x.float(), w.float(), bf, stride, padding, 1, groups)
    fns = {"conv2d": lambda: F.conv2d(x, w, b, stride, padding, 1, groups),
           "contiguous": lambda: F.conv2d(xc, wc, b, stride, padding, 1, groups)}
    if dtype == torch.bfloat16:
        packed = kernels.pack_conv_weight(w, stride, padding, groups, xs)
        fns["packed"] = lambda: kernels.packed_conv2d(x, packed, b, stride, padding, groups)
    if groups == 1 and ws[2] > 1:
        fns["im2col"] = lambda: conv_forms.im2col_conv2d(x, w, b, stride, padding)
        if stride == (1, 1):
            fns["shifted"] = lambda: conv_forms.shifted_conv2d(x, w, b, padding)
    if groups == 1 and ws[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0):
        fns["linear1x1"] = lambda: conv_forms.conv1x1_as_linear(x, w, b)
    return fns, ref


def time_shape(fns: dict, repeats: int, peak_fn) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per call of each form, alternating order per round; and the reference matmul's per round."""
    for fn in fns.values():
        fn()
    peak_fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    peak = []
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        peak_fn()
        peak.append(time.perf_counter() - t0)
    return times, peak


def describe(shape: Shape, count: int) -> str:
    kind, xs, ws, stride, padding, _, _ = shape
    if kind == "linear":
        rows = torch.Size(xs[:-1]).numel()
        return f"linear {rows}x{ws[1]} -> {ws[0]} (x{count})"
    extra = f" s{stride[0]}" if stride != (1, 1) else ""
    extra += f" p{padding[0]}" if padding != (ws[2] // 2, ws[3] // 2) else ""
    return f"conv{ws[2]}x{ws[3]}{extra} {xs[0]}x{xs[1]}x{xs[2]}x{xs[3]} -> {ws[0]} (x{count})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--vae", action="store_true", help="also the VAE decoder's shapes (batch 1)")
    p.add_argument("--kinds", nargs="+", default=["conv", "linear"], choices=["conv", "linear"])
    p.add_argument("--min-gflop", type=float, default=0.0, help="skip shapes below this many GFLOP per call")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    nets = ["unet", "vae"] if args.vae else ["unet"]
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    peak_flop = 2.0 * 2048**3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.size}x{args.size} "
          f"latents, median of {args.repeats}", flush=True)
    g = torch.Generator().manual_seed(0)
    for net in nets:
        shapes = network_shapes(net, args.size)
        totals: dict[tuple[str, str], float] = collections.defaultdict(float)
        best: dict[str, float] = collections.defaultdict(float)
        print(f"\n{net}: {len(shapes)} distinct shapes, {sum(shapes.values())} calls, "
              f"{sum(flops(s) * n for s, n in shapes.items()) / 1e9:.0f} GFLOP\n")
        print("| shape (calls) | GFLOP | form: ms, GFLOP/s, ratio, error | peak GFLOP/s |\n|---|---|---|---|")
        for shape, count in sorted(shapes.items(), key=lambda kv: -flops(kv[0]) * kv[1]):
            if shape[0] not in args.kinds or flops(shape) / 1e9 < args.min_gflop:
                continue
            fns, ref = forms(shape, dtype, g)
            outs = {name: fn() for name, fn in fns.items()}
            first = next(iter(fns))
            scale = ref.abs().max().item()
            times, peak = time_shape(fns, args.repeats, lambda: a @ a)
            cells = []
            for name, ts in times.items():
                med = statistics.median(ts)
                ratio = statistics.median(t / t0 for t, t0 in zip(ts, times[first], strict=True))
                err = (outs[name].float() - ref).abs().max().item() / scale
                same = "=" if name != first and torch.equal(outs[name], outs[first]) else ""
                cells.append(f"{name} {med * 1e3:.1f} ms {flops(shape) / med / 1e9:.0f} {ratio:.2f} {err:.1e}{same}")
                totals[(shape[0], name)] += med * count
            for other in FORMS[shape[0]]:  # a form that does not apply counts as today's
                if other not in times:
                    totals[(shape[0], other)] += statistics.median(times[first]) * count
            best[shape[0]] += min(statistics.median(ts) for ts in times.values()) * count
            print(f"| {describe(shape, count)} | {flops(shape) / 1e9:.2f} | {'; '.join(cells)} | "
                  f"{peak_flop / statistics.median(peak) / 1e9:.0f} |", flush=True)
        for kind in best:
            print(f"\n{net} {kind} totals (each shape's median x its calls; a form that does not apply counts as "
                  "today's): " + ", ".join(f"{form} {totals[(kind, form)]:.2f} s" for form in FORMS[kind])
                  + f", the best form per shape {best[kind]:.2f} s")


if __name__ == "__main__":
    main()
