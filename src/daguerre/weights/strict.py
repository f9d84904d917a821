"""Strict loading of a network from a state dict: every key and shape checked, dtype conversion, no partial loads.

Each network is first built on the `meta` device (no memory, no random init), its expected keys and
shapes are compared with what the state dict provides, and only when everything matches are the
tensors, converted to the requested dtype and device, assigned as the parameters. Every loader of
weights ends here: the checkpoint formats (`checkpoints/`), the VAE file of `daguerre train vae`, and
the frozen MiniLM text encoder of `models/bert.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..quantize import float_value, int8_layer_names, int8_weight, quantize_int8_

MAX_LISTED_KEYS = 4  # keys named in an error message before "... and N more"


def few(keys, n: int = MAX_LISTED_KEYS) -> str:
    """'a, b, c (and 7 more)' for an error message."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str, prefix: str = ""
) -> None:
    """ValueError naming missing / unexpected keys (with counts) and shape mismatches; keys shown with `prefix`."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {few(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {few(prefix + k for k in unexpected)}")
    bad = [
        f"{prefix}{k} is {tuple(given[k].shape)}, expected {tuple(t.shape)}"
        for k, t in expected.items()
        if k in given and tuple(given[k].shape) != tuple(t.shape)
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatches: {few(bad)}")
    if problems:
        raise ValueError(f"{what} weights do not match its config: {'; '.join(problems)}")


# torch.nn.init's in-place initialisers: nothing to compute on the meta device
_INITIALISERS = frozenset(getattr(torch.nn.init, name) for name in (
    "constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_", "normal_", "ones_", "orthogonal_", "sparse_",
    "trunc_normal_", "uniform_", "xavier_normal_", "xavier_uniform_", "zeros_"))


class _WithoutInitialisers(torch.overrides.TorchFunctionMode):
    """While a network is built on the meta device, its weight initialisers return their tensor untouched: there
    are no values to set, and torch runs some of them on meta tensors (`normal_`, an embedding's) through Python
    reference kernels whose first use imports torch._dynamo, ~75 MiB of resident memory that loading a model and
    generating never need otherwise (docs/benchmarks.md, "Peak memory of Stable Diffusion 1.5")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def instantiate(
    factory: Callable[[], nn.Module],
    sd: Mapping[str, torch.Tensor],
    what: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = "",
    quantize: bool = False,
) -> nn.Module:
    """Build `factory()` and load `sd` into it strictly; floating tensors become `dtype` (default float32).

    With `quantize` the network's Linear and Conv2d layers are built int8 on the meta device
    (`daguerre.quantize.quantize_int8_`) and filled from `sd`, whose weights may already have been quantised
    while read (`quantize.int8_loading`); equal to quantising the network after the float load. Meta tensors in `sd`
    (what a partial read left out, `weights.partial`) stay on the meta device: those weights are not loaded."""
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"), _WithoutInitialisers():
        model = factory()
    expected = model.state_dict()
    check_state_dict(expected, sd, what, prefix)
    if any(True for _ in model.buffers()) and set(dict(model.named_buffers())) - set(expected):
        # non-persistent buffers are computed in __init__: build the module for real so they exist
        model = factory().to(device)
    int8_layers = set()
    if quantize:
        quantize_int8_(model)
        int8_layers = int8_layer_names(model)
    converted = {}
    for k, v in sd.items():
        at = torch.device("meta") if v.is_meta else device  # a tensor a partial read skipped stays on meta
        layer, _, leaf = k.rpartition(".")
        if leaf == "weight" and layer in int8_layers:
            q, scale = int8_weight(v, dtype)
            converted[f"{layer}.weight_int8"], converted[f"{layer}.weight_scale"] = q.to(at), scale.to(at)
            continue
        v = float_value(v)
        converted[k] = v.to(device=at, dtype=dtype) if v.is_floating_point() else v.to(at)
    model.load_state_dict(converted, strict=True, assign=True)
    model.to(dtype=dtype)
    return model.eval()
