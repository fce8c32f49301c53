"""Timing a call on a device, as ``moco-bench`` does: medians of synchronised calls, paired
medians of two calls timed in alternation, peak memory, and torch.profiler's table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_medians(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int,
                   device: torch.device) -> tuple[float, float, float]:
    """Median seconds of ``a()`` and of ``b()``, and the median of the per-round ratios b / a.

    The two are timed in alternation (a, b, a, b, …), so a machine whose speed drifts (shared
    cores, clock changes) slows both alike and the ratio stays honest; timing all of ``a`` and
    then all of ``b`` let a 2-core machine's drift move the ratio by ±20%.
    """
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    ratios = [tb / ta for ta, tb in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def peak_memory(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak device memory (GiB) of one call of ``fn``; None on CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def profile(fn: Callable[[], object], device: torch.device, steps: int = 5) -> str:
    """torch.profiler's table of the most expensive ops over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)
