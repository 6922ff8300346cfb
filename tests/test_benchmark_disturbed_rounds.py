"""The benchmark summary's flag for an entry whose rounds were disturbed (median far above the fastest)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from disturbed_rounds import DISTURBED_MEDIAN_OVER_FASTEST, disturbed_rounds_note  # noqa: E402


def test_the_disturbed_group_of_the_avx2_epyc_run_is_flagged_with_its_fastest_round():
    note = disturbed_rounds_note(median=24.3514e-3, fastest=9.3786e-3, rounds=7)
    assert note == "DISTURBED: median 2.6x its fastest round (9.38 ms), rerun this group"


def test_a_noisy_but_undisturbed_entry_is_not_flagged():
    # the widest undisturbed entry of that run: decode_linear auto, tiny fp32, 16 rows (1.32x)
    assert disturbed_rounds_note(median=1867.5e-6, fastest=1412.2e-6, rounds=20) is None
    assert disturbed_rounds_note(median=1.0, fastest=1.0, rounds=20) is None


def test_the_bound_itself_is_flagged_and_just_below_it_is_not():
    fastest = 2e-3
    assert disturbed_rounds_note(DISTURBED_MEDIAN_OVER_FASTEST * fastest, fastest, rounds=5) is not None
    assert disturbed_rounds_note(DISTURBED_MEDIAN_OVER_FASTEST * fastest * 0.999, fastest, rounds=5) is None


def test_too_few_rounds_or_no_time_say_nothing():
    assert disturbed_rounds_note(median=3.0, fastest=1.0, rounds=2) is None  # median of two: no spread to read
    assert disturbed_rounds_note(median=3.0, fastest=1.0, rounds=1) is None
    assert disturbed_rounds_note(median=3.0, fastest=0.0, rounds=7) is None
