"""Tests for benchmarks._timing: alternating run order and the throughput ratio."""

import pytest
import torch

from benchmarks._timing import Comparison, autocast, time_alternating


def test_time_alternating_swaps_order_each_run():
    calls = []
    cases = {"florence": lambda: calls.append("florence"), "peer": lambda: calls.append("peer")}

    seconds = time_alternating(cases, runs=3, device=torch.device("cpu"), warmup=1)

    assert calls[:2] == ["florence", "peer"]
    assert calls[2:] == ["florence", "peer", "peer", "florence", "florence", "peer"]
    assert [len(values) for values in seconds.values()] == [3, 3]


def test_time_alternating_rejects_zero_runs():
    with pytest.raises(ValueError, match="runs must be at least 1, got 0"):
        time_alternating({"florence": lambda: None}, runs=0, device=torch.device("cpu"))


def test_comparison_ratio_uses_medians():
    comparison = Comparison("figure", "a", "b", items=8, florence_s=[1.0, 2.0, 100.0], peer_s=[4.0, 4.0, 0.1])

    assert comparison.florence_per_s == 4.0
    assert comparison.peer_per_s == 2.0
    assert comparison.ratio == 2.0


def test_autocast_rejects_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast(torch.device("cpu"), "fp8")
