"""Timing helpers shared by the speed benchmarks: device choice, alternating runs, medians.

Every comparison runs its cases in one process and alternates them run by run (A B, then B A),
so that background load and thermal drift hit both sides alike. Results are medians.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Comparison:
    """Median seconds per run of florence and its peer on the same work of ``items`` items per run."""

    figure: str
    florence: str
    peer: str
    items: int
    florence_s: list[float]
    peer_s: list[float]
    goal: float | None = None

    @property
    def florence_per_s(self) -> float:
        return self.items / statistics.median(self.florence_s)

    @property
    def peer_per_s(self) -> float:
        return self.items / statistics.median(self.peer_s)

    @property
    def ratio(self) -> float:
        """Throughput of florence over the peer's (above 1: florence is faster)."""
        return statistics.median(self.peer_s) / statistics.median(self.florence_s)


def pick_device() -> torch.device:
    """Return CUDA device 0 when CUDA is available, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Return the autocast context of ``precision`` ("fp32" or "bf16") on ``device``."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; valid values: 'fp32', 'bf16'")


def time_alternating(
    cases: dict[str, Callable[[], object]], runs: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each case ``warmup`` times, then ``runs`` timed times in alternating order.

    Run ``r`` goes through the cases in their given order when ``r`` is even and in reverse
    when it is odd. Returns the wall-clock seconds of every timed run, per case.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    synchronize(device)

    seconds: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs):
        order = names if run % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
