"""Measured backend choices: the rule (faster by a margin, else the reference), the caches and the off switch."""

from __future__ import annotations

import json
import time

import pytest
import torch

from hcr_kernels import autotune, cpu_isa
from hcr_kernels.cpu_identity import cache_bytes


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder and no decisions in memory; ``timings`` sets what a measurement returns."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV_VAR, raising=False)
    autotune.forget()
    calls = []
    timings = {"value": (1.0, 1.0)}

    def fake_measure(fast, reference):
        calls.append((fast, reference))
        return timings["value"]

    monkeypatch.setattr(autotune, "measure", fake_measure)
    yield calls, timings
    autotune.forget()


def noop():
    return None


@pytest.mark.parametrize("fast_s,reference_s,expected", [
    (0.5, 1.0, True),
    (0.949, 1.0, True),
    (0.96, 1.0, False),  # within the margin: noise could have decided it, so the reference stays
    (1.0, 1.0, False),
    (2.0, 1.0, False),
])
def test_fast_path_only_when_clearly_faster(fresh, fast_s, reference_s, expected):
    calls, timings = fresh
    timings["value"] = (fast_s, reference_s)
    assert autotune.fast_path_wins("op", "shape", noop, noop) is expected
    assert len(calls) == 1


@pytest.mark.parametrize("fast_s,verdict", [(0.5, "faster"), (0.949, "faster"), (0.951, "tie"), (1.0, "tie"),
                                            (1.05, "tie"), (1.053, "slower"), (2.0, "slower")])
def test_verdicts_leave_a_margin_either_way(fresh, fast_s, verdict):
    calls, timings = fresh
    timings["value"] = (fast_s, 1.0)
    assert autotune.compare("op", "shape", noop, noop) == verdict
    autotune.forget()  # the file answers with the same verdict
    assert autotune.compare("op", "shape", noop, noop) == verdict and len(calls) == 1


def test_decisions_are_cached_in_memory_and_on_disk(fresh):
    calls, timings = fresh
    timings["value"] = (0.1, 1.0)
    assert autotune.fast_path_wins("op", "a", noop, noop)
    assert autotune.fast_path_wins("op", "a", noop, noop)
    assert len(calls) == 1
    autotune.forget()  # as a new process: the file answers
    timings["value"] = (5.0, 1.0)
    assert autotune.fast_path_wins("op", "a", noop, noop)
    assert len(calls) == 1
    assert not autotune.fast_path_wins("op", "b", noop, noop)  # another shape class is measured
    assert len(calls) == 2
    stored = json.loads(autotune.cache_path().read_text())[autotune.machine_key()]
    assert stored["op | a"] == {"fast": True, "fast_s": 0.1, "reference_s": 1.0}
    assert stored["op | b"]["fast"] is False
    assert autotune.cached_decisions() == stored


def test_each_isa_is_measured_for_itself(fresh):
    isas = cpu_isa.supported_cpu_isas()
    if len(isas) < 2:
        pytest.skip("this CPU (or build) runs one ISA only")
    calls, _ = fresh
    for isa in isas:
        with cpu_isa.use_cpu_isa(isa):
            assert f"isa {isa}" in autotune.machine_key()
            autotune.fast_path_wins("op", "a", noop, noop)
    assert len(calls) == len(isas)


@pytest.mark.parametrize("change", ["build", "method"])
def test_another_builds_decisions_are_measured_again_and_dropped(fresh, monkeypatch, change):
    """A rebuilt _C (a kernel change) or a new way of measuring is measured afresh: the old decisions for
    this machine leave the file, other machines' stay."""
    from hcr_kernels import _extension

    calls, timings = fresh
    timings["value"] = (0.1, 1.0)
    assert autotune.fast_path_wins("op", "a", noop, noop)
    old_key = autotune.machine_key()
    assert _extension.build_fingerprint() in old_key
    other_machine = "Another CPU | isa avx2 | 4 threads | torch 0 | hcr_kernels._C 000000000000"
    data = json.loads(autotune.cache_path().read_text())
    data[other_machine] = {"op | a": {"fast": True, "fast_s": 0.1, "reference_s": 1.0}}
    autotune.cache_path().write_text(json.dumps(data))

    if change == "build":
        monkeypatch.setattr(_extension, "build_fingerprint", lambda: "rebuilt00000")
    else:
        monkeypatch.setattr(autotune, "MEASURE_METHOD", autotune.MEASURE_METHOD + 1)
    autotune.forget()
    timings["value"] = (2.0, 1.0)
    assert not autotune.fast_path_wins("op", "a", noop, noop)  # measured again, with the new build's result
    assert len(calls) == 2
    stored = json.loads(autotune.cache_path().read_text())
    assert old_key not in stored and autotune.machine_key() in stored and other_machine in stored


def test_off_switch_takes_the_reference_without_measuring(fresh, monkeypatch):
    calls, timings = fresh
    timings["value"] = (0.1, 1.0)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV_VAR, "0")
    assert not autotune.fast_path_wins("op", "a", noop, noop)
    assert calls == [] and not autotune.cache_path().exists()


def test_a_damaged_cache_is_measured_again(fresh):
    calls, timings = fresh
    autotune.cache_path().write_text("{not json")
    timings["value"] = (0.1, 1.0)
    assert autotune.fast_path_wins("op", "a", noop, noop)
    assert len(calls) == 1
    assert json.loads(autotune.cache_path().read_text())[autotune.machine_key()]["op | a"]["fast"] is True


def test_measure_times_both_paths_interleaved_each_call_after_an_eviction(monkeypatch):
    order = []
    monkeypatch.setattr(autotune, "evict_core_caches", lambda: order.append("evict"))

    def fast():
        order.append("fast")
        time.sleep(0.001)

    def reference():
        order.append("reference")
        time.sleep(0.02)

    fast_s, reference_s = autotune.measure(fast, reference, rounds=3)
    assert fast_s < reference_s
    assert order == ["fast", "reference"] + [step for run in ["fast", "reference", "reference", "fast", "fast", "reference"]
                                             for step in ("evict", run)]


def test_the_eviction_writes_over_twice_every_cores_l2():
    autotune.evict_core_caches()
    l2 = cache_bytes().get(2, 0)
    buffer = autotune._eviction_buffer(torch.get_num_threads())
    assert buffer.numel() >= 2 * max(l2, 1 << 20) * torch.get_num_threads() and bool((buffer == 1).all())


def test_an_eviction_first_made_in_inference_mode_works_outside_it():
    """A generation (under inference mode) may be the first to measure; a later measurement outside it
    must still be able to write the buffer."""
    autotune._eviction_buffer.cache_clear()
    with torch.inference_mode():
        autotune.evict_core_caches()
    autotune.evict_core_caches()
    assert not autotune._eviction_buffer(torch.get_num_threads()).is_inference()


def test_measuring_time_is_counted_only_when_measured(fresh, monkeypatch):
    """``measuring_seconds`` advances by the wall time of a measurement, and not for a cached decision."""
    calls, timings = fresh
    real_measure = autotune.measure

    def slow_measure(fast, reference):
        time.sleep(0.05)
        return real_measure(fast, reference)

    monkeypatch.setattr(autotune, "measure", slow_measure)
    before = autotune.measuring_seconds()
    autotune.compare("op", "timed", noop, noop)
    measured = autotune.measuring_seconds() - before
    assert measured >= 0.05
    autotune.compare("op", "timed", noop, noop)  # remembered: nothing measured, nothing added
    autotune.forget()
    autotune.compare("op", "timed", noop, noop)  # read from the file
    assert autotune.measuring_seconds() - before == measured
