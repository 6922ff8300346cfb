"""StageClock: exclusive, disjoint stage times."""

from __future__ import annotations

import pytest

import hcr.timing
from hcr.timing import StageClock


@pytest.fixture
def now(monkeypatch):
    """A clock the test moves by hand."""
    reading = [0.0]
    monkeypatch.setattr(hcr.timing.time, "perf_counter", lambda: reading[0])
    return reading


def test_a_nested_stage_counts_only_for_itself(now):
    clock = StageClock(("outer", "inner", "never"))
    with clock("outer"):
        now[0] += 1.0
        with clock("inner"):
            now[0] += 2.0
        now[0] += 3.0
    with clock("inner"):
        now[0] += 4.0
    assert clock.seconds == {"outer": 4.0, "inner": 6.0, "never": 0.0}
    assert sum(clock.seconds.values()) == now[0]


def test_a_stage_that_raises_is_still_counted(now):
    clock = StageClock()
    with pytest.raises(KeyError), clock("failing"):
        now[0] += 2.5
        raise KeyError("x")
    with clock("after"):
        now[0] += 1.0
    assert clock.seconds == {"failing": 2.5, "after": 1.0}


def test_set_aside_time_is_charged_to_its_own_name(now):
    """Time a counter (the autotuner's measuring) advances inside a stage leaves that stage, nested or not."""
    measured = [0.0]

    def measure(seconds):
        now[0] += seconds
        measured[0] += seconds

    clock = StageClock(("outer", "inner"), set_aside=("autotune", lambda: measured[0]))
    with clock("outer"):
        now[0] += 1.0
        measure(0.5)
        with clock("inner"):
            now[0] += 2.0
            measure(0.25)
        now[0] += 3.0
    with clock("inner"):
        measure(4.0)
    assert clock.seconds == {"outer": 4.0, "inner": 2.0, "autotune": 4.75}
    assert sum(clock.seconds.values()) == now[0]
