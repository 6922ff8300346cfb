"""gpu_check: the one-line exit without a GPU, the report from fake measurements, the call builders on CPU,
and (marked gpu) the real check end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hcr_kernels import bandwidth_model as bm
from hcr_kernels import gpu_check
from hcr_kernels.gpu_check import Measurement

CPU = torch.device("cpu")
# Round numbers, so the expected fractions are plain arithmetic.
TEST_PEAK = bm.DevicePeak("test GPU", bandwidth=1e12, tensor_flops=1e15, fp32_flops=1e14, exps_per_second=1e13)


def test_without_gpu_main_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.splitlines() == [gpu_check.NO_GPU_MESSAGE]
    assert not (tmp_path / "report").exists()


def test_without_gpu_the_command_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides a GPU where there is one
    result = subprocess.run([sys.executable, "-m", "hcr_kernels.gpu_check"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [gpu_check.NO_GPU_MESSAGE]


def test_bad_options_are_rejected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--repeats", "0"], ["--ops", "no_such_op"]):
        with pytest.raises(SystemExit):
            gpu_check.main(argv)


def _fake_measurements(workload, reference_seconds, fast_seconds):
    return [Measurement(workload.key, "reference", seconds=reference_seconds),
            Measurement(workload.key, "triton", seconds=fast_seconds)]


def test_report_fractions_from_fake_measurements():
    workload = next(w for w in bm.WORKLOADS if w.op == "pool_scatter")  # memory-bound
    at_half_bandwidth = workload.bytes_moved / (0.5 * TEST_PEAK.bandwidth)
    measurements = _fake_measurements(workload, 4 * at_half_bandwidth, at_half_bandwidth)
    reference, fast = gpu_check.report_rows([workload], measurements, TEST_PEAK)
    assert fast["backend"] == "triton"
    assert fast["bytes_per_second"] == pytest.approx(0.5e12)
    assert fast["fraction_of_peak_bandwidth"] == pytest.approx(0.5)
    assert fast["fraction_of_lower_bound"] == pytest.approx(0.5)  # memory-bound: the bound is the bandwidth's
    assert fast["speedup_vs_reference"] == pytest.approx(4.0)
    assert reference["fraction_of_peak_bandwidth"] == pytest.approx(0.125)


def test_compute_bound_rows_are_judged_against_their_compute_bound():
    workload = next(w for w in bm.WORKLOADS if w.op == "fused_linear_cross_entropy" and w.dtype == "bf16")
    bound = workload.lower_bound(TEST_PEAK)
    assert bound.limit == "tensor"
    (row,) = gpu_check.report_rows([workload], [Measurement(workload.key, "triton", seconds=2 * bound.seconds)],
                                   TEST_PEAK)
    assert row["fraction_of_lower_bound"] == pytest.approx(0.5)
    assert row["fraction_of_peak_bandwidth"] < 0.5  # it moves few bytes for its time
    assert row["speedup_vs_reference"] is None  # no reference measured


def test_errors_and_unknown_peak_leave_fractions_empty():
    workload = bm.WORKLOADS[0]
    rows = gpu_check.report_rows([workload], [Measurement(workload.key, "triton", error="RuntimeError: boom"),
                                              Measurement(workload.key, "native", seconds=1e-3)], None)
    assert rows[0]["seconds"] is None and rows[0]["error"] == "RuntimeError: boom"
    assert rows[1]["bytes_per_second"] == pytest.approx(workload.bytes_moved / 1e-3)
    assert rows[1]["fraction_of_peak_bandwidth"] is None and rows[1]["fraction_of_lower_bound"] is None
    with pytest.raises(ValueError, match="unknown workload"):
        gpu_check.report_rows([workload], [Measurement("nope", "triton", seconds=1.0)], None)


def test_measured_cell_is_the_fastest_non_reference_backend():
    workload = bm.WORKLOADS[0]
    rows = gpu_check.report_rows([workload], [
        Measurement(workload.key, "reference", seconds=1e-4),  # faster, but the reference
        Measurement(workload.key, "native", seconds=3e-3),
        Measurement(workload.key, "triton", seconds=2e-3),
    ], TEST_PEAK)
    assert gpu_check.best_rows(rows)[workload.key]["backend"] == "triton"
    only_reference = gpu_check.report_rows([workload], [Measurement(workload.key, "reference", seconds=1e-4)], None)
    assert gpu_check.best_rows(only_reference)[workload.key]["backend"] == "reference"


def test_report_is_written_as_markdown_and_json(tmp_path):
    workloads = bm.WORKLOADS
    measurements = [m for w in workloads[:3] for m in _fake_measurements(w, 2e-3, 1e-3)]
    tests = gpu_check.PytestRun(passed=40, failed=0, errors=0, skipped=3, returncode=0)
    report = gpu_check.build_report(workloads, measurements, TEST_PEAK, device_name="Test GPU", tests=tests,
                                    unavailable={("selective_scan", "cuda"): "needs mamba-ssm"},
                                    environment={"torch": torch.__version__}, timing="fake")
    markdown_path, json_path = gpu_check.write_report(report, workloads, tmp_path / "out")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["device"] == "Test GPU" and data["tests"]["passed"] == 40
    assert len(data["rows"]) == 6 and data["unavailable"][0]["reason"] == "needs mamba-ssm"
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "40 passed, 0 failed, 0 errors, 3 skipped" in markdown
    assert "- selective_scan `cuda`: needs mamba-ssm" in markdown
    # The first table has the README table's rows in its order, so its measured column can be pasted in.
    readme_rows = [row.split(" | ")[:4] for row in bm.markdown_table().splitlines()[2:len(workloads) + 2]]
    report_rows = [row.split(" | ")[:4] for row in markdown.splitlines() if row.startswith("| ")]
    assert report_rows[1:len(workloads) + 1] == readme_rows
    assert "1,000.0 µs triton, " in markdown and "% of bound" in markdown
    assert markdown.count("| — |") >= len(workloads) - 3  # the rest is not measured


def test_time_call_runs_warmup_then_repeats():
    calls = []
    seconds = gpu_check.time_call(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and len(seconds) == 5 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        gpu_check.time_call(lambda: None, CPU, repeats=0)


def test_runnable_backends_give_reasons_for_the_others():
    runnable, unavailable = gpu_check.runnable_backends("selective_scan", CPU)
    assert runnable[0] == "reference"
    assert "needs CUDA tensors" in unavailable["cuda"]
    with pytest.raises(ValueError, match="op must be one of"):
        gpu_check.runnable_backends("no_such_op", CPU)


TINY_WORKLOADS = [
    bm.pool_scatter_workload("t", (20, 30), 2, 8, "fp32", backward=True),
    bm.pool_scatter_workload("t", (20, 30), 3, 8, "bf16", backward=False),
    bm.weighted_cross_entropy_workload("t", 5, 11, "fp32"),
    bm.fused_linear_cross_entropy_workload("t", 5, 11, 4, "bf16"),
    bm.ragged_cache_write_workload("t", 2, 2, 1, 4, 16, 3, (3, 1), "fp32"),
    bm.selective_scan_workload("t", 2, 4, 5, 3, "fp32", backward=True),
    bm.causal_conv1d_workload("t", 2, 4, 5, 4, "fp32", backward=True),
    bm.decode_linear_workload("t", ((3, 2, True), (2, 3, False)), 2, "bf16"),
]


def test_tiny_workloads_cover_every_op_of_the_model():
    assert {w.op for w in TINY_WORKLOADS} == {w.op for w in bm.WORKLOADS} == set(gpu_check.CALL_BUILDERS)


@pytest.mark.parametrize("workload", TINY_WORKLOADS, ids=lambda w: f"{w.op}-{w.passes}")
def test_calls_are_built_and_run_on_cpu(workload):
    """The code that builds inputs on the GPU, run on CPU tensors with the CPU backends (the interpreter is slow)."""
    runnable, _ = gpu_check.runnable_backends(workload.op, CPU)
    for backend in [b for b in runnable if b != "triton"]:
        result = gpu_check.build_call(workload, backend, CPU)()
        if workload.passes == "forward+backward":
            assert all(grad is not None and torch.isfinite(grad).all() for grad in result), backend
    if workload.op == "pool_scatter" and workload.passes == "forward+backward":
        _, slots = bm.compressed_batch(workload.params["trace_lengths"], workload.params["window"])
        (grad_hidden,) = result
        assert grad_hidden.shape == (slots, workload.params["window"], workload.params["dim"])


def test_measure_records_times_and_errors(monkeypatch):
    workload = TINY_WORKLOADS[2]
    original = gpu_check.CALL_BUILDERS[workload.op]

    def failing_native(workload, backend, device):
        if backend == "native":
            raise RuntimeError("kernel crashed")
        return original(workload, backend, device)

    monkeypatch.setitem(gpu_check.CALL_BUILDERS, workload.op, failing_native)
    monkeypatch.setattr(gpu_check, "runnable_backends", lambda op, device: (["reference", "native"], {"triton": "no"}))
    measurements, unavailable = gpu_check.measure([workload], CPU, warmup=0, repeats=2, log=lambda line: None)
    assert [(m.backend, m.seconds is not None, m.error) for m in measurements] == [
        ("reference", True, None), ("native", False, "RuntimeError: kernel crashed")]
    assert unavailable == {(workload.op, "triton"): "no"}


def test_parse_junit(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="10" failures="1" errors="2" skipped="3"/>'
                     "</testsuites>")
    assert gpu_check.parse_junit(junit) == {"passed": 4, "failed": 1, "errors": 2, "skipped": 3}


def test_missing_tests_folder_is_reported_not_passed(tmp_path):
    run = gpu_check.run_gpu_tests(tmp_path / "missing")
    assert not run.ok and "no tests folder" in run.note
    assert gpu_check.PytestRun(passed=3, returncode=0).ok
    assert not gpu_check.PytestRun(passed=3, failed=1, returncode=1).ok


@pytest.mark.gpu
def test_gpu_check_end_to_end(tmp_path):
    out = tmp_path / "report"
    code = gpu_check.main(["--skip-tests", "--out", str(out), "--ops", "pool_scatter", "decode_linear",
                           "--warmup", "1", "--repeats", "3"])
    assert code == 0
    data = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    timed = {(row["key"], row["backend"]) for row in data["rows"] if row["seconds"]}
    for workload in bm.WORKLOADS:
        if workload.op in ("pool_scatter", "decode_linear"):
            assert (workload.key, "reference") in timed
            assert workload.key in data["measured_cells"]
    if data["peak"] is not None:
        assert all(0 < row["fraction_of_peak_bandwidth"] < 1.5 for row in data["rows"] if row["seconds"])
    assert (out / "gpu_check.md").read_text(encoding="utf-8").startswith("# gpu_check: ")
