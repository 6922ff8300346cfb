"""The benchmarks' page-fault helper: faults of the timed calls only, results dropped within the call.

``keep_freed_memory`` itself is not called here: it changes how this whole test process
allocates (the benchmark session is where it belongs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import page_faults  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor faults via getrusage on Linux")


class FakeBenchmark:
    """What ``pedantic_counting_faults`` uses of pytest-benchmark's fixture: ``pedantic`` and ``extra_info``."""

    def __init__(self):
        self.extra_info = {}
        self.calls = []

    def pedantic(self, target, rounds, warmup_rounds):
        for _ in range(warmup_rounds + rounds):
            self.calls.append(target())


def test_faults_of_the_timed_calls_are_recorded_and_results_dropped():
    pages = (64 << 20) // 4096  # 64 MiB: above glibc's largest mmap threshold, so fresh pages on every call
    sizes = iter([1, 1, pages * 1024, pages * 1024, pages * 1024])  # two small warm-up calls, three large timed ones

    def touch_fresh_memory():
        return torch.ones(next(sizes), dtype=torch.float32)

    benchmark = FakeBenchmark()
    page_faults.pedantic_counting_faults(benchmark, touch_fresh_memory, rounds=3, warmup_rounds=2)
    assert benchmark.calls == [None] * 5  # nothing the next call's allocations could be kept out of
    assert benchmark.extra_info["faults_per_call"] >= pages // 2


def test_a_call_without_allocations_faults_little():
    benchmark = FakeBenchmark()
    page_faults.pedantic_counting_faults(benchmark, lambda: None, rounds=5, warmup_rounds=1)
    assert benchmark.extra_info["faults_per_call"] < 16
