"""What this machine's CPU has, for the choices that depend on it: the bfloat16 units `--dtype auto` looks for
(precision.py) and the AMX tiles that decide the attention form at inference (nn/attention.py, `chunked_pays`).

torch's own probe (`torch.cpu.get_capabilities`, torch >= 2.6) is asked first, then the flags of /proc/cpuinfo
(Linux); a machine that says neither has none of them.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
AMX_BF16 = "amx_bf16"  # the flag (and torch capability key) of AMX's bf16 tiles


def has_any(flags: tuple[str, ...], cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has any of `flags`: torch's probe where it knows them, else the `flags` line of `cpuinfo`."""
    import torch

    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        try:
            caps = probe()
        except (RuntimeError, AttributeError):
            caps = None
        if isinstance(caps, dict) and any(flag in caps for flag in flags):
            return any(bool(caps.get(flag)) for flag in flags)
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in flags)
    return False


_AMX: bool | None = None  # has_amx's answer, once known


def has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later): there torch's fused CPU attention
    runs its bf16 products on the tiles and beats daguerre's chunked matmuls. Read once per process (the
    attention asks at every call)."""
    global _AMX
    if _AMX is None:
        _AMX = has_any((AMX_BF16,))
    return _AMX
