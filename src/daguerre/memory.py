"""Process memory: giving freed heap memory back to the system, keeping a load's temporaries out of the heap,
and reading the resident set.

glibc's allocator keeps freed blocks inside its heap for reuse, and returns memory to the system only from the
top of the heap; blocks freed between live ones (the read buffers of a load between the tensors it keeps, the
float weights replaced by int8 ones) stay resident until `malloc_trim` releases their pages. `trim()` calls it
where the C library has it (glibc) and does nothing elsewhere (macOS, Windows, musl: their allocators return
memory by other means).

Trimmed holes still cost memory later: the next allocations land in them and touch their pages again, spread
over the whole hole, so an SD 1.5 U-Net read with int8 weights (each layer read as bf16, quantised, the bf16
copy freed: ~0.35 GiB of holes between the int8 weights) made its sampling peak ~0.12 GiB higher than the same
weights read without holes. `mapped_allocations()` gives every block of 1 MiB or more its own memory mapping
while a load runs (glibc's `M_MMAP_THRESHOLD`), so a freed temporary goes back to the system whole and the kept
weights sit outside the heap; the heap the sampler then uses starts small and dense.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LOAD_MMAP_THRESHOLD = 1 << 20  # bytes: blocks at least this large get their own mapping while a load runs
# glibc's DEFAULT_MMAP_THRESHOLD_MAX (4 MiB * sizeof(long): 32 MiB on 64-bit), where its dynamic threshold ends up
# once a large block has been freed (a model load frees many): the threshold after a load
RUN_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # a user's own setting of the threshold, which daguerre keeps


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library does not have it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


@functools.cache
def _mallopt():
    """glibc's `mallopt`, or None where the C library does not have it (or the user set the threshold)."""
    if _malloc_trim() is None or MMAP_THRESHOLD_ENV in os.environ:
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def mapped_allocations() -> Iterator[None]:
    """While the context lasts, blocks of `LOAD_MMAP_THRESHOLD` bytes or more get their own memory mappings
    (module docstring); after it, the threshold is `RUN_MMAP_THRESHOLD`, glibc's own once a load has run (its
    dynamic threshold stops moving: a fixed one is what mallopt sets). A process-wide allocator setting: what
    the weights of a released network are read again with (`components.Components.acquire`). Nothing happens
    where there is no glibc, or when the user set MALLOC_MMAP_THRESHOLD_ (their setting stays)."""
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
            mallopt(M_TRIM_THRESHOLD, 2 * RUN_MMAP_THRESHOLD)  # what glibc's dynamic threshold sets beside it


def trim() -> bool:
    """Return the C heap's free pages to the system (`malloc_trim(0)`); whether anything could be done."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def resident_bytes(key: str = "VmRSS") -> int | None:
    """A resident-set figure of this process in bytes from /proc/self/status ("VmRSS", "VmHWM": the peak),
    or None where there is no /proc (not Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None
