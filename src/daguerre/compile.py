"""Opt-in compilation of a network for inference: `torch.compile` with inductor's freezing, in place.

Freezing (inductor's `freezing` option) treats the weights as constants of the compiled graph: it folds them into
pre-packed oneDNN layouts for the convolutions and matmuls, which is where the gain comes from on a CPU; plain
`torch.compile` without it ran about 20% slower than eager here. The speed-up measured so far is small (ratio to
diffusers 0.92 compiled against 0.94 eager at SD 1.5 32x32, on a loaded machine). The costs, stated
because they are the price of the speed:

- memory: the frozen graph holds pre-packed copies of the weights beside the module's own and inductor's
  workspace: the SD 1.5 U-Net in bf16 channels_last at a 32x32 latent peaked at 2.45 GiB compiled against
  2.15 GiB eager (+0.30 GiB, docs/benchmarks.md "torch.compile"); each new input shape (batch, resolution)
  compiles another graph, with its own copies;
- time: the first call at each shape compiles (minutes for the SD 1.5 U-Net on 2 cores; inductor caches
  the generated code under /tmp, so a later process compiles faster);
- it needs a C++ compiler (inductor generates and builds C++ kernels) and runs only without gradients.

int8-quantised networks (daguerre.quantize) are refused: freezing would fold each int8 weight and its scales
back into a bf16 constant, undoing the memory the quantisation saved.
"""

from __future__ import annotations

import shutil

import torch.nn as nn


def compile_for_inference_(module: nn.Module, *, dynamic: bool | None = False) -> nn.Module:
    """Compile `module` in place (`nn.Module.compile`: the object, its attributes and its `forward` stay; calls
    go through the compiled graph) with inductor freezing, and return it. `dynamic=False` specialises each graph
    to its input shapes (the fastest kernels; a new shape recompiles). Call it under `torch.no_grad()` or
    `torch.inference_mode()` (freezing applies to inference only); weights changed after the first call are
    not seen by the frozen graph."""
    from .quantize import Int8Conv2d, Int8Linear  # a leaf module: no cycle

    quantized = [name for name, m in module.named_modules() if isinstance(m, (Int8Linear, Int8Conv2d))]
    if quantized:
        raise ValueError(f"cannot compile a network with int8-quantised layers ({quantized[0]}, ...): freezing "
                         "folds int8 weights back into bf16 constants; use --compile or --quantize int8, not both")
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        raise ValueError("compiling needs a C++ compiler (torch inductor builds C++ kernels): install g++ "
                         "(e.g. `apt-get install g++`) or run without --compile")
    module.eval()
    module.compile(dynamic=dynamic, options={"freezing": True})
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_for_inference_` (or `nn.Module.compile`) was applied to `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None
