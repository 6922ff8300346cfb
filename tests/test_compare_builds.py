"""benchmarks/compare_builds.py: cases checked with a clear error, and a build timed against itself in worker
processes (both start orders, every turn's ratio)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_builds import check_case, compare, main  # noqa: E402

BUILT_IN_PLACE = any((ROOT / "hcr_kernels").glob("_C*.so"))


@pytest.mark.parametrize("case,expected", [
    ("attention:tiny:64", "expected attention:MODEL:SLOTS:STEPS[:DTYPE]"),
    ("softmax:tiny:64:1", "expected attention:MODEL:SLOTS:STEPS[:DTYPE]"),
    ("attention:7B:64:1", "MODEL must be one of"),
    ("attention:tiny:64:0", "SLOTS and STEPS must be positive integers, STEPS <= SLOTS"),
    ("attention:tiny:4:8", "SLOTS and STEPS must be positive integers, STEPS <= SLOTS"),
    ("attention:tiny:64:1:int8", "DTYPE must be one of"),
    ("linear:7B:float32:1", "WEIGHTS must be one of"),
    ("linear:tiny:int8:1", "DTYPE must be one of"),
    ("linear:tiny:float32:-1", "ROWS must be a positive integer"),
])
def test_a_bad_case_names_itself_and_what_was_expected(case, expected):
    with pytest.raises(ValueError, match=re.escape(f"case '{case}': {expected}")):
        check_case(case)


def test_good_cases_pass_as_given():
    assert check_case("attention:1.5B-B1:2048:6") == "attention:1.5B-B1:2048:6"
    assert check_case("attention:tiny:1700:1:bfloat16") == "attention:tiny:1700:1:bfloat16"
    assert check_case("linear:1.5B:bfloat16:8") == "linear:1.5B:bfloat16:8"


@pytest.mark.parametrize("name", ["pairs", "turns", "calls", "threads"])
def test_counts_must_be_positive(name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        compare(ROOT, ROOT, ["linear:tiny:float32:1"], **{name: 0})


def test_the_command_line_refuses_a_count_below_one(capsys):
    with pytest.raises(SystemExit):
        main([str(ROOT), str(ROOT), "linear:tiny:float32:1", "--pairs", "0"])
    assert "--pairs" in capsys.readouterr().err


def test_the_command_line_refuses_a_root_without_a_build(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(ROOT), "linear:tiny:float32:1"])
    assert "no hcr_kernels/_C*.so there" in capsys.readouterr().err


@pytest.mark.skipif(not BUILT_IN_PLACE, reason="the workers import hcr_kernels from the checkout: _C built in place")
def test_a_build_against_itself_gives_a_ratio_per_pair_in_both_start_orders():
    cases = ["attention:tiny:64:2", "attention:tiny:64:1:bfloat16", "linear:tiny:float32:1"]
    seen = []
    results = compare(ROOT, ROOT, cases, pairs=2, turns=2, calls=1,
                      progress=lambda done, total, ratios: seen.append((done, total, sorted(ratios))))
    assert seen == [(1, 2, sorted(cases)), (2, 2, sorted(cases))]
    for case in cases:
        result = results[case]
        assert result.old_first == [True, False]
        assert len(result.ratios) == 2 and all(math.isfinite(r) and r > 0 for r in result.ratios)
        assert len(result.old_times) == len(result.new_times) == 4  # 2 pairs x 2 turns
        assert all(t > 0 for t in result.old_times + result.new_times)
        assert result.report(case).startswith(f"{case}: new / old ")
