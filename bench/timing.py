"""The one timing loop the benchmarks share: functions run in turn, the order alternating each round."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` rounds after its warm-up call (made by the caller), each
    round running them back to back in alternating order, so that neither always runs first and the machine's
    load drifts over all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times
