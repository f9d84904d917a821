"""Partial reads of a weight file: inside `skipping(predicate)`, the safetensors reader (`weights.io`) leaves out
the large tensors `predicate(path, key)` names and gives meta tensors in their place (their names, shapes and
dtypes, no memory), so a load builds the networks it is not asked for on the meta device (`weights.strict`) and
never holds their weights. What a load skips is decided by the caller (`checkpoints.parts`: the parts of a
model a run needs now). Tensors of fewer than `SKIP_MIN_ELEMENTS` elements are always read: the norms and biases
whose values a format's detection looks at, so that a partial load detects the same model as a whole one.
Pickles (`.ckpt`) are unpickled whole and never skip anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

SKIP_MIN_ELEMENTS = 1 << 12  # smaller tensors are always read (a few MiB of an SD file in all)

SkipPredicate = Callable[[Path, str], bool]
_SKIP: ContextVar[SkipPredicate | None] = ContextVar("daguerre_skip_tensors", default=None)


@contextlib.contextmanager
def skipping(predicate: SkipPredicate) -> Iterator[None]:
    """While the context lasts, the large tensors for which `predicate(path, key)` is true are not read."""
    token = _SKIP.set(predicate)
    try:
        yield
    finally:
        _SKIP.reset(token)


def skips(path: Path, key: str, shape: list[int]) -> bool:
    """Whether the reader leaves out the tensor `key` of shape `shape` in the file `path` (module docstring)."""
    predicate = _SKIP.get()
    if predicate is None:
        return False
    numel = 1
    for n in shape:
        numel *= n
    return numel >= SKIP_MIN_ELEMENTS and predicate(path, key)
