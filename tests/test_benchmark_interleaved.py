"""The benchmarks' interleaving helper: every path once per round, the first one rotating and every other round
reversed, medians recorded."""

from __future__ import annotations

import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from interleaved import record_interleaved  # noqa: E402


class FakeBenchmark:
    """What ``record_interleaved`` uses of pytest-benchmark's fixture: ``pedantic`` and ``extra_info``."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        assert iterations == 1
        for _ in range(warmup_rounds + rounds):
            target()


def test_paths_alternate_with_the_first_rotating_every_other_round_reversed_and_medians_are_recorded():
    calls = []
    paths = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    benchmark = FakeBenchmark()
    times = record_interleaved(benchmark, paths, rounds=6, baselines=["a"], warmup_rounds=2)
    warmup, timed = calls[:6], calls[6:]
    assert warmup == ["a", "b", "c"] * 2
    rounds = [timed[i:i + 3] for i in range(0, 18, 3)]
    assert rounds == [list("abc"), list("cba"), list("bca"), list("acb"), list("cab"), list("bac")]
    # within rounds, every path follows every other one equally often (a path can pay for the one before it)
    successions = Counter((r[i], r[i + 1]) for r in rounds for i in range(2))
    assert set(successions.values()) == {2} and len(successions) == 6
    assert {name: len(spent) for name, spent in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert benchmark.extra_info["backend"] == "interleaved" and benchmark.extra_info["rounds"] == 6
    assert benchmark.extra_info["baselines"] == ["a"]
    assert benchmark.extra_info["paths"] == {name: statistics.median(spent) for name, spent in times.items()}


def test_a_baseline_must_be_one_of_the_paths():
    with pytest.raises(ValueError, match=r"baselines \['d'\] are not among the paths \['a', 'b'\]"):
        record_interleaved(FakeBenchmark(), {"a": lambda: None, "b": lambda: None}, rounds=1, baselines=["d"])


def test_between_runs_untimed_before_every_timed_call_and_not_in_warmup():
    calls = []
    paths = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    record_interleaved(FakeBenchmark(), paths, rounds=3, baselines=["a"], warmup_rounds=1,
                       between=lambda: calls.append("evict"))
    assert calls == ["a", "b"] + ["evict", "a", "evict", "b", "evict", "b", "evict", "a", "evict", "b", "evict", "a"]


def test_last_level_cache_size_and_eviction(monkeypatch):
    import bandwidth

    monkeypatch.setattr(bandwidth, "cache_bytes", lambda: {1: 48 << 10, 2: 2 << 20, 3: 300 << 20})
    assert bandwidth.last_level_cache_bytes() == 300 * 2**20
    monkeypatch.setattr(bandwidth, "cache_bytes", dict)  # an OS that says nothing
    assert bandwidth.last_level_cache_bytes() == 0
    evict = bandwidth.last_level_cache_eviction(limit=2**22)
    assert evict() is None  # pytest-benchmark would take a pedantic setup's return value as the call's arguments
