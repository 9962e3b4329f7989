"""Shared helpers for the benchmark scripts: timing by median of interleaved repeats."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dev}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], setup: Callable[[], object] | None = None, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()``; ``setup()`` runs before each call, untimed."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    sync()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
