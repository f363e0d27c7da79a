"""Best-of-N wall time of a loop: the figure the micro-benchmarks report (least disturbed by a shared machine)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def best_seconds(fn: Callable, items: Sequence, repeats: int) -> float:
    """Fastest of ``repeats`` passes of ``fn`` over ``items``, after one warm-up call."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best
