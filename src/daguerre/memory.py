"""Process memory: giving freed heap memory back to the system, and reading the resident set.

glibc's allocator keeps freed blocks inside its heap for reuse, and returns memory to the system only from the
top of the heap; blocks freed between live ones (the read buffers of a load between the tensors it keeps, the
float weights replaced by int8 ones) stay resident until `malloc_trim` releases their pages. `trim()` calls it
where the C library has it (glibc) and does nothing elsewhere (macOS, Windows, musl: their allocators return
memory by other means).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path


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
