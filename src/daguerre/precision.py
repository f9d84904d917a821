"""The compute precision of a run, chosen for the machine: what `--dtype auto` (the default) means.

Precision is decided here and nowhere else (docs/design.md, "The contracts"); the CLI, the Python API
and the server all call `resolve_dtype` (through `registry.open_model`):

- on a CUDA device: bfloat16 where the GPU supports it (`torch.cuda.is_bf16_supported()`), else float16;
- on a CPU with bfloat16 units (AVX512-BF16 or AMX-BF16, `cpu_has_bf16`): bfloat16, about twice the speed
  of float32 for Stable Diffusion (docs/benchmarks.md), except for U-Nets of fewer than
  `BF16_MIN_UNET_PARAMETERS`: on their one thread the casts cost more than bfloat16 saves (measured:
  the shipped `fashion` model, 3.5M U-Net parameters, is as fast or up to 1.5x slower in bf16; `shapes`,
  10M, 12-31% faster: docs/benchmarks.md, "Precision of the small models");
- anywhere else: float32.

float16 on a CPU is never chosen automatically: its CPU kernels are about 25x slower than bfloat16's, so
asking for it warns (`warn_if_slow`). Schedules stay float64 and sampler state float32 in every case
(diffusion/denoisers.py): only the networks run in the compute dtype. The convolutions of the U-Net and
the VAE run channels_last on CUDA and in bfloat16/float16 for U-Nets that are not small
(`SMALL_MODEL_PARAMETERS`): measured faster there, slower for the small models (`uses_channels_last`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import cpu

if TYPE_CHECKING:  # keep `import daguerre` free of torch
    import torch

AUTO = "auto"
# --dtype / dtype= names -> torch dtype attribute names
DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch name -> what users type
CLI_CHOICES = (AUTO, "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("none", "int8")  # --quantize: weight-only int8 (daguerre.quantize)
SMALL_MODEL_PARAMETERS = 100_000_000  # U-Nets below this are small: one CPU thread, contiguous convolutions
BF16_MIN_UNET_PARAMETERS = 5_000_000  # auto keeps float32 below this on a CPU (measured, module docstring)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags (and torch capability keys) of bf16 units
CPUINFO = cpu.CPUINFO  # what cpu_has_bf16 reads when torch cannot say (tests point it elsewhere)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX-BF16): torch's own CPU probe
    (`torch.cpu.get_capabilities`, torch >= 2.6), else the flags of /proc/cpuinfo (Linux; `daguerre.cpu`). The
    one capability probe of `auto`, so that tests can replace it."""
    return cpu.has_any(CPU_BF16_FLAGS, CPUINFO)


def auto_dtype(device: torch.device | str | None = None, unet_parameters: int | None = None) -> torch.dtype:
    """The compute dtype `auto` picks for `device` (default cpu) and a U-Net of `unet_parameters`
    parameters (None: not known, taken as large); the rule of the module docstring."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu" or not cpu_has_bf16():
        return torch.float32
    tiny = unet_parameters is not None and unet_parameters < BF16_MIN_UNET_PARAMETERS
    return torch.float32 if tiny else torch.bfloat16


def is_auto(dtype: object) -> bool:
    return dtype is None or (isinstance(dtype, str) and dtype.lower() == AUTO)


def named_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name ("fp32", "bf16", "fp16", "float16", ...); ValueError otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported compute dtype {dtype}: use auto, fp32, bf16 or fp16")
        return dtype
    name = DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}: use auto or one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def resolve_dtype(
    dtype: torch.dtype | str | None, device: torch.device | str | None = None, unet_parameters: int | None = None
) -> torch.dtype:
    """The torch dtype a run computes in: `auto` (or None) decided by `auto_dtype`, anything else by name;
    a float16 request on a CPU warns (`warn_if_slow`)."""
    chosen = auto_dtype(device, unet_parameters) if is_auto(dtype) else named_dtype(dtype)
    warn_if_slow(chosen, device)
    return chosen


def warn_if_slow(dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """One warning when float16 is asked for on a CPU (about 25x slower than bfloat16 there)."""
    import torch

    if dtype == torch.float16 and torch.device(device or "cpu").type == "cpu":
        warnings.warn("fp16 on a CPU is very slow (about 25x slower than bf16 here): use --dtype auto or bf16",
                      stacklevel=3)


def short_name(dtype: torch.dtype) -> str:
    """'fp32', 'bf16' or 'fp16': how the CLI, the PNG parameters and `daguerre info` name a dtype."""
    name = str(dtype).removeprefix("torch.")
    return SHORT_NAMES.get(name, name)


def uses_channels_last(
    dtype: torch.dtype, device: torch.device | str | None = None, unet_parameters: int | None = None
) -> bool:
    """Whether the convolutions run channels_last: on CUDA, and on a CPU in bfloat16 and float16 for U-Nets
    that are not small (None: not known, taken as large); float32 on a CPU keeps the contiguous layout (bit
    for bit what it always was), and so do the small models, measured slower channels_last (module doc)."""
    import torch

    if torch.device(device or "cpu").type == "cuda":
        return True
    small = unet_parameters is not None and unet_parameters < SMALL_MODEL_PARAMETERS
    return dtype in (torch.bfloat16, torch.float16) and not small


def uses_packed_weights(
    dtype: torch.dtype, device: torch.device | str | None = None, unet_parameters: int | None = None
) -> bool:
    """Whether the Conv2d and Linear layers of the U-Net compute with oneDNN-packed weights
    (`daguerre.nn.conv.pack_for_inference_`; equal results bit for bit, the same memory): where
    `nn.conv.packing_pays` (bfloat16 on a CPU with oneDNN), for U-Nets that are not small (None: not known,
    taken as large), the ones measured (docs/benchmarks.md, "Convolutions and linear layers")."""
    from .nn.conv import packing_pays

    small = unet_parameters is not None and unet_parameters < SMALL_MODEL_PARAMETERS
    return packing_pays(dtype, device or "cpu") and not small


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def attention_description(dtype: torch.dtype, device: torch.device | str | None = None) -> str:
    """How attention runs at inference for `dtype` on `device` (what `--verbose` and `daguerre info` print):
    `daguerre.nn.attention.attention_form`, the one place that chooses it."""
    from .nn.attention import attention_form

    return attention_form(dtype, device or "cpu")


def auto_threads(device: torch.device | str | None, unet_parameters: int) -> int | None:
    """CPU threads of the automatic choice (`--threads 0`): one for small U-Nets on the CPU, whose
    per-operation work is too small to share (extra threads mostly wait for each other, and on a busy
    machine a thread that is not scheduled stalls every step); None (torch's default, one per core) else."""
    import torch

    small = unet_parameters < SMALL_MODEL_PARAMETERS
    return 1 if small and torch.device(device or "cpu").type == "cpu" else None


def run_settings(dtype: torch.dtype, device: torch.device | str | None, unet_parameters: int,
                 threads: int | None = None, channels_last: bool | None = None) -> dict[str, object]:
    """{precision, attention, convolutions, threads} of a run in `dtype` on `device` for a U-Net of
    `unet_parameters` parameters: what `--verbose` and `daguerre info` report. `threads` defaults to the
    automatic choice, `channels_last` to `uses_channels_last`."""
    import torch

    device = torch.device(device or "cpu")
    if channels_last is None:
        channels_last = uses_channels_last(dtype, device, unet_parameters)
    if threads is None:
        threads = auto_threads(device, unet_parameters) or torch.get_num_threads()
    return {"precision": short_name(dtype), "attention": attention_description(dtype, device),
            "convolutions": "channels_last" if channels_last else "contiguous",
            "threads": threads if device.type == "cpu" else None, "device": str(device)}


def format_run(settings: dict[str, object]) -> str:
    threads = f"{settings['threads']} CPU thread(s)" if settings["threads"] else f"device {settings['device']}"
    weights = ", int8 weights" if settings.get("weights") == "int8" else ""  # `daguerre info --quantize int8`
    return (f"precision {settings['precision']}, attention: {settings['attention']}, "
            f"convolutions {settings['convolutions']}, {threads}{weights}")


def describe_run(unet: torch.nn.Module, device: torch.device | None = None) -> str:
    """One line: the precision, attention form, convolution layout and thread count a run of the loaded
    `unet` uses now (`--verbose`), on `device` (default: the U-Net's; a released U-Net's is meta)."""
    import torch

    conv = next((_stored_weight(m) for m in unet.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size[-1] > 1), None)
    channels_last = conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        and not conv.is_contiguous()
    from .compile import is_compiled
    from .quantize import is_quantized, weight_count

    line = format_run(run_settings(dtype_of(unet), device or device_of(unet), weight_count(unet),
                                   torch.get_num_threads(), channels_last))
    from .nn.conv import is_pack_ready

    extras = [what for what, on in (("int8 weights", is_quantized(unet)), ("compiled", is_compiled(unet)),
                                    ("oneDNN-packed weights", is_pack_ready(unet))) if on]
    return ", ".join([line, *extras])


def _stored_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as stored, without unpacking a packed one (reading `.weight` would unpack it)."""
    stored = getattr(layer, "stored_weight", None)
    return stored() if stored is not None else layer.weight
