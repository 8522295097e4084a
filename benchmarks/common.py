"""Timing and memory helpers shared by the benchmarks.

Every benchmark runs our op and its peer in the same process, alternating, and
reports medians; the thread count is fixed and printed because this kind of
machine is shared and noisy.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch


def setup_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmHWM: peak resident, VmRSS: resident) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(fn: Callable[[], object], device: str) -> int:
    """Peak memory above the starting point while ``fn`` runs (GPU allocator or process RSS)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - start
    if not _reset_peak_rss():
        return -1
    start = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return max(0, peak - start)


def _seconds_per_call(fn: Callable[[], object], calls: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def compare(ours: Callable[[], object], peer: Callable[[], object], device: str, repeats: int = 5,
            warmup: int = 1, block_seconds: float = 2e-3) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and ``peer``, run alternately.

    Each sample times a block of back-to-back calls between two syncs: as many
    calls as take about ``block_seconds`` (one, for a call that takes longer),
    as a training loop issues them. So a GPU's launch and sync latency, tens of
    microseconds, is not charged to every call of a sub-millisecond op, while
    host-side work that outlasts the device's still is.
    """
    for _ in range(warmup):
        ours(); peer()
    calls = [max(1, min(1000, math.ceil(block_seconds / max(_seconds_per_call(fn, 1, device), 1e-9))))
             for fn in (ours, peer)]
    times_ours, times_peer = [], []
    for _ in range(repeats):
        times_ours.append(_seconds_per_call(ours, calls[0], device))
        times_peer.append(_seconds_per_call(peer, calls[1], device))
    return statistics.median(times_ours), statistics.median(times_peer)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:.0f} MiB"
