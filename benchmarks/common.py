"""Timing helpers shared by the benchmarks: medians over repeats, DP and plain steps in the same run."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List



def median_time(fn: Callable[[], None], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: Dict[str, Callable[[], None]], repeats: int = 20, warmup: int = 3) -> Dict[str, float]:
    """Medians of several step functions measured alternately, so drift hits them all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by torch on CPU during ``fn`` (via the CPU allocator's profiler)."""
    gc.collect()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = cur = 0
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)),
        key=lambda e: e.time_range.start,
    )
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def markdown_table(rows: List[Dict[str, object]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(out)
