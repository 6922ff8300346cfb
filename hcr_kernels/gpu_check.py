"""One command for a GPU box: ``python -m hcr_kernels.gpu_check``.

On a machine with a CUDA GPU it (a) runs the GPU tests (``pytest -m gpu tests``),
(b) times every backend that can run on the GPU, and the reference, at the shapes of
the bandwidth model (``hcr_kernels.bandwidth_model``), and (c) reports each one's
achieved bandwidth as a fraction of the device's peak and of the model's lower
bound, as markdown (``gpu_check.md``, whose first table has the README table's rows,
so its measured column can be pasted in) and JSON (``gpu_check.json``). Without a
GPU it says so in one line and exits 0, so it can sit in any script.

Exit status with a GPU: 1 if a GPU test failed (or the tests could not run) or a backend raised, else 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hcr_kernels import (
    IGNORE_INDEX,
    _extension,
    bandwidth_model,
    causal_conv1d,
    decode_linear,
    fused_linear_cross_entropy,
    pool_scatter,
    ragged_cache_write_,
    selective_scan,
    weighted_cross_entropy,
)
from hcr_kernels.bandwidth_model import DTYPES, DevicePeak, Workload
from hcr_kernels.info import OPS
from hcr_kernels.kv_cache import check_write_bounds

NO_GPU_MESSAGE = "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check."
DEFAULT_OUT = "gpu_check_report"
# Written before each timed call so no input is still in L2 from the previous one (50 MB on an H100): the
# attention projections and the cache writes are small enough to be served from L2 otherwise.
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Measurement:
    """Median seconds of one backend on one workload (``Workload.key``), or the error it raised."""

    key: str
    backend: str
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class PytestRun:
    """Counts of the ``pytest -m gpu`` run; ``note`` says why it did not run when it did not."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    returncode: int | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode is not None and not self.failed and not self.errors and self.returncode in (0, 5)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
              before_each: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA, events around each call time the kernels, not their launch; ``before_each``
    (an L2 flush) runs outside the timed span. Elsewhere, ``time.perf_counter``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return seconds


def runnable_backends(op: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends of ``op`` whose check passes on ``device`` (reference first), and why each other one fails."""
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    runnable, unavailable = [], {}
    for backend, check in sorted(OPS[op].items(), key=lambda item: item[0] != "reference"):
        try:
            check(device)
        except RuntimeError as error:
            unavailable[backend] = str(error)
        else:
            runnable.append(backend)
    return runnable, unavailable


# ---------------------------------------------------------------------------------------------------------------
# One call of each op at a workload's shape, built on the device once


def _pass(forward: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor] | None = None,
          grad_out: torch.Tensor | None = None) -> Callable[[], object]:
    """The forward alone (no autograd graph) or forward + the gradients to ``wrt``."""
    if wrt is None:
        def call():
            with torch.no_grad():
                return forward()
    else:
        def call():
            return torch.autograd.grad(forward(), list(wrt), grad_out)
    return call


def _pool_scatter(workload: Workload, backend: str, device: torch.device):
    p, dtype = workload.params, DTYPES[workload.dtype]
    lengths, window, dim = p["trace_lengths"], p["window"], p["dim"]
    length, slots = bandwidth_model.compressed_batch(lengths, window)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool, device=device)
    for row, (trace, windows) in enumerate(zip(lengths, bandwidth_model.compression_windows(lengths, window))):
        first = trace // 10 + 1  # the slots form one block after a 10 % prefix, as in the benchmark
        mask[row, first:first + windows] = True
    template = torch.randn(len(lengths), length, dim, device=device, dtype=dtype)
    hidden = torch.randn(slots, window, dim, device=device, dtype=dtype, requires_grad=p["backward"])

    def forward():
        return pool_scatter(template, mask, hidden, backend=backend)

    if not p["backward"]:
        return _pass(forward)
    return _pass(forward, [hidden], torch.randn_like(template))


def _labels(tokens: int, vocab: int, device: torch.device) -> torch.Tensor:
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::7] = IGNORE_INDEX  # some ignored tokens, as in the benchmarks
    return labels


def _weighted_cross_entropy(workload: Workload, backend: str, device: torch.device):
    tokens, vocab = workload.params["tokens"], workload.params["vocab"]
    logits = (torch.randn(tokens, vocab, device=device) * 2).to(DTYPES[workload.dtype]).requires_grad_()
    labels, weights = _labels(tokens, vocab, device), torch.rand(tokens, device=device)
    return _pass(lambda: weighted_cross_entropy(logits, labels, weights, backend=backend), [logits])


def _fused_linear_cross_entropy(workload: Workload, backend: str, device: torch.device):
    p, dtype = workload.params, DTYPES[workload.dtype]
    hidden = torch.randn(p["tokens"], p["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(p["vocab"], p["hidden"], device=device) * p["hidden"] ** -0.5).to(dtype)
    labels = _labels(p["tokens"], p["vocab"], device)
    return _pass(lambda: fused_linear_cross_entropy(hidden, weight, labels, backend=backend), [hidden])


def _ragged_cache_write(workload: Workload, backend: str, device: torch.device):
    """A generation step: bounds checked once, then one write per layer (what the compressed generator does)."""
    p, dtype = workload.params, DTYPES[workload.dtype]
    batch, heads, head_dim, slots, steps = p["batch"], p["heads"], p["head_dim"], p["slots"], p["steps"]
    caches = [[torch.randn(batch, heads, slots, head_dim, device=device, dtype=dtype) for _ in "kv"]
              for _ in range(p["layers"])]
    # the attention layer's states: transposed views of [B, T, H, Dh]
    states = [torch.randn(batch, steps, heads, head_dim, device=device, dtype=dtype).transpose(1, 2) for _ in "kv"]
    count = torch.tensor(p["counts"], device=device)
    # rows at lengths from a quarter of the cache up; a row re-encoding after a compression crops back first
    lengths = torch.randint(slots // 4, slots - steps + 1, (batch,), device=device)
    start = (lengths - torch.where(count > 1, count - 2, 0)).clamp_min(0)

    def step():
        check_write_bounds(start, count, steps=steps, slots=slots)
        for key_cache, value_cache in caches:
            ragged_cache_write_(key_cache, value_cache, *states, start, count, check_bounds=False, backend=backend)

    return _pass(step)


def _selective_scan(workload: Workload, backend: str, device: torch.device):
    p, dtype = workload.params, DTYPES[workload.dtype]
    batch, channels, length, state = p["batch"], p["channels"], p["length"], p["state"]
    sequence = (batch, channels, length)
    inputs = dict(  # as benchmarks/test_bench_mamba.py's scan_inputs; A, D, delta_bias in fp32 as Mamba keeps them
        u=torch.randn(sequence, device=device, dtype=dtype),
        delta=torch.randn(sequence, device=device, dtype=dtype) * 0.5,
        A=-torch.rand(channels, state, device=device) * 2,
        B=torch.randn(batch, state, length, device=device, dtype=dtype),
        C=torch.randn(batch, state, length, device=device, dtype=dtype),
        D=torch.randn(channels, device=device),
        z=torch.randn(sequence, device=device, dtype=dtype),
        delta_bias=torch.randn(channels, device=device) * 0.3,
    )
    for tensor in inputs.values():
        tensor.requires_grad_(p["backward"])

    def forward():
        return selective_scan(**inputs, delta_softplus=True, backend=backend)

    if not p["backward"]:
        return _pass(forward)
    return _pass(forward, list(inputs.values()), torch.randn(sequence, device=device, dtype=dtype))


def _causal_conv1d(workload: Workload, backend: str, device: torch.device):
    p, dtype = workload.params, DTYPES[workload.dtype]
    x = torch.randn(p["batch"], p["channels"], p["length"], device=device, dtype=dtype)
    weight = torch.randn(p["channels"], p["width"], device=device, dtype=dtype)
    bias = torch.randn(p["channels"], device=device, dtype=dtype)
    for tensor in (x, weight, bias):
        tensor.requires_grad_(p["backward"])

    def forward():
        return causal_conv1d(x, weight, bias, activation="silu", backend=backend)

    if not p["backward"]:
        return _pass(forward)
    return _pass(forward, [x, weight, bias], torch.randn_like(x))


def _decode_linear(workload: Workload, backend: str, device: torch.device):
    p, dtype = workload.params, DTYPES[workload.dtype]
    layers = [(torch.randn(n, k, device=device, dtype=dtype) * k**-0.5,
               torch.randn(n, device=device, dtype=dtype) if bias else None) for n, k, bias in p["weights"]]
    inputs = {k: torch.randn(p["rows"], 1, k, device=device, dtype=dtype) for _, k, _ in p["weights"]}

    def step():
        for weight, bias in layers:  # one matrix after the other, as a decode step streams them
            decode_linear(inputs[weight.shape[1]], weight, bias, backend=backend)

    return _pass(step)


CALL_BUILDERS: dict[str, Callable[[Workload, str, torch.device], Callable[[], object]]] = {
    "pool_scatter": _pool_scatter,
    "weighted_cross_entropy": _weighted_cross_entropy,
    "fused_linear_cross_entropy": _fused_linear_cross_entropy,
    "ragged_cache_write_": _ragged_cache_write,
    "selective_scan": _selective_scan,
    "causal_conv1d": _causal_conv1d,
    "decode_linear": _decode_linear,
}


def build_call(workload: Workload, backend: str, device: torch.device) -> Callable[[], object]:
    """A call of ``workload.op`` with ``backend`` on inputs of the workload's shape, allocated on ``device`` now."""
    if workload.op not in CALL_BUILDERS:
        raise ValueError(f"no call builder for op {workload.op!r}; known: {tuple(CALL_BUILDERS)}")
    return CALL_BUILDERS[workload.op](workload, backend, device)


def measure(workloads: Sequence[Workload], device: torch.device, *, warmup: int = 3, repeats: int = 20,
            log: Callable[[str], None] = print) -> tuple[list[Measurement], dict[tuple[str, str], str]]:
    """Median time of every runnable backend on every workload, and why the others were not timed.

    A backend that raises becomes a measurement with ``error`` set; the run goes on.
    """
    flush = None
    if device.type == "cuda":
        buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        flush = buffer.zero_
    measurements, unavailable = [], {}
    for workload in workloads:
        runnable, reasons = runnable_backends(workload.op, device)
        unavailable.update({(workload.op, backend): reason for backend, reason in reasons.items()})
        for backend in runnable:
            try:
                call = build_call(workload, backend, device)
                median = statistics.median(time_call(call, device, warmup=warmup, repeats=repeats, before_each=flush))
                measurements.append(Measurement(workload.key, backend, seconds=median))
                log(f"  {workload.key} | {backend}: {median * 1e6:,.1f} µs")
            except Exception as error:  # noqa: BLE001 - recorded in the report, the other backends still run
                measurements.append(Measurement(workload.key, backend, error=f"{type(error).__name__}: {error}"))
                log(f"  {workload.key} | {backend}: ERROR {type(error).__name__}: {error}")
            finally:
                call = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return measurements, unavailable


# ---------------------------------------------------------------------------------------------------------------
# The report: pure functions of the measurements


def report_rows(workloads: Sequence[Workload], measurements: Sequence[Measurement],
                peak: DevicePeak | None) -> list[dict]:
    """One row per measurement: achieved bytes/s, fraction of the peak bandwidth and of the lower bound, speedup."""
    by_key = {workload.key: workload for workload in workloads}
    reference = {m.key: m.seconds for m in measurements if m.backend == "reference" and m.seconds}
    rows = []
    for m in measurements:
        if m.key not in by_key:
            raise ValueError(f"measurement of unknown workload {m.key!r}")
        workload = by_key[m.key]
        bound = workload.lower_bound(peak) if peak else None
        row = dict(key=m.key, op=workload.op, passes=workload.passes, shape=workload.shape, dtype=workload.dtype,
                   backend=m.backend, seconds=m.seconds, error=m.error, bytes_moved=workload.bytes_moved,
                   flops=workload.flops, lower_bound_seconds=bound.seconds if bound else None,
                   bound_by=bound.limit if bound else None, bytes_per_second=None, fraction_of_peak_bandwidth=None,
                   fraction_of_lower_bound=None, speedup_vs_reference=None)
        if m.seconds:
            row["bytes_per_second"] = workload.bytes_moved / m.seconds
            if peak:
                row["fraction_of_peak_bandwidth"] = row["bytes_per_second"] / peak.bandwidth
                row["fraction_of_lower_bound"] = bound.seconds / m.seconds
            if m.key in reference:
                row["speedup_vs_reference"] = reference[m.key] / m.seconds
        rows.append(row)
    return rows


def best_rows(rows: Sequence[dict]) -> dict[str, dict]:
    """Per workload, the fastest backend other than the reference (the reference where it is the only one)."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["seconds"] is None:
            continue
        current = best.get(row["key"])
        fast, current_fast = row["backend"] != "reference", current is not None and current["backend"] != "reference"
        if current is None or (fast and not current_fast) or (fast == current_fast and row["seconds"] < current["seconds"]):
            best[row["key"]] = row
    return best


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f} %"


def _measured_cell(row: dict) -> str:
    cell = f"{row['seconds'] * 1e6:,.1f} µs {row['backend']}"
    if row["fraction_of_lower_bound"] is not None:
        cell += f", {_percent(row['fraction_of_lower_bound'])} of bound"
    return cell


def build_report(workloads: Sequence[Workload], measurements: Sequence[Measurement], peak: DevicePeak | None, *,
                 device_name: str, tests: PytestRun | None, unavailable: dict[tuple[str, str], str],
                 environment: dict, timing: str) -> dict:
    """Everything the markdown shows, JSON-ready."""
    rows = report_rows(workloads, measurements, peak)
    return {
        "device": device_name,
        "peak": asdict(peak) if peak else None,
        "environment": environment,
        "timing": timing,
        "tests": asdict(tests) if tests else None,
        "rows": rows,
        "measured_cells": {key: _measured_cell(row) for key, row in best_rows(rows).items()},
        "unavailable": [{"op": op, "backend": backend, "reason": reason}
                        for (op, backend), reason in sorted(unavailable.items())],
    }


def _peak_line(peak: dict | None) -> str:
    if peak is None:
        return "unknown (not in the known-GPU table, and the device properties give no memory clock): no fractions"
    parts = [f"{peak['bandwidth'] / 1e12:.3g} TB/s"]
    for field, unit in (("tensor_flops", "TFLOP/s bf16 tensor"), ("fp32_flops", "TFLOP/s fp32")):
        if peak[field]:
            parts.append(f"{peak[field] / 1e12:.3g} {unit}")
    if peak["exps_per_second"]:
        parts.append(f"{peak['exps_per_second'] / 1e12:.3g} T exp/s")
    return f"{peak['name']}: {', '.join(parts)} ({peak['source']})"


def _tests_line(tests: dict | None) -> str:
    if tests is None:
        return "not run (--skip-tests)"
    if tests["returncode"] is None:
        return f"not run: {tests['note']}"
    return (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
            f"(pytest exit status {tests['returncode']})")


def render_markdown(report: dict, workloads: Sequence[Workload]) -> str:
    """The report as markdown; its first table is ``bandwidth_model.markdown_table`` with the measured cells."""
    peak = DevicePeak(**report["peak"]) if report["peak"] else None
    env = report["environment"]
    lines = [
        f"# gpu_check: {report['device']}",
        "",
        f"- peak: {_peak_line(report['peak'])}",
        "- " + ", ".join(f"{name} {value}" for name, value in env.items()),
        f"- GPU tests (`pytest -m gpu tests`): {_tests_line(report['tests'])}",
        f"- timing: {report['timing']}",
        "",
        "## The README's table, measured",
        "",
        "Measured: the fastest backend other than the reference, and its fraction of the lower bound.",
        "",
        bandwidth_model.markdown_table(workloads, peak, report["measured_cells"]),
        "",
        "## Every backend",
        "",
        "| op | pass | shape | dtype | backend | median (µs) | GB/s | of peak bandwidth | of bound | vs reference |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        if row["seconds"] is None:
            timing = f"error: {row['error']}"
            cells = ["—"] * 4
        else:
            timing = f"{row['seconds'] * 1e6:,.1f}"
            speedup = row["speedup_vs_reference"]
            cells = [f"{row['bytes_per_second'] / 1e9:,.1f}", _percent(row["fraction_of_peak_bandwidth"]),
                     _percent(row["fraction_of_lower_bound"]), f"{speedup:.2f}x" if speedup else "—"]
        lines.append(f"| {row['op']} | {row['passes']} | {row['shape']} | {row['dtype']} | {row['backend']} "
                     f"| {timing} | {' | '.join(cells)} |")
    if report["unavailable"]:
        lines += ["", "Not timed here:", ""]
        lines += [f"- {item['op']} `{item['backend']}`: {item['reason']}" for item in report["unavailable"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, workloads: Sequence[Workload], out: Path) -> tuple[Path, Path]:
    """``gpu_check.md`` and ``gpu_check.json`` in ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / "gpu_check.md", out / "gpu_check.json"
    markdown.write_text(render_markdown(report, workloads), encoding="utf-8")
    data.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return markdown, data


# ---------------------------------------------------------------------------------------------------------------
# The GPU tests


def parse_junit(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a pytest ``--junitxml`` file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {name: sum(int(suite.get(name, 0)) for suite in suites) for name in ("tests", "failures", "errors", "skipped")}
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}


def default_tests_dir() -> Path:
    """The repository's tests folder (next to the package in a source checkout or editable install)."""
    return Path(__file__).resolve().parents[1] / "tests"


def run_gpu_tests(tests_dir: Path) -> PytestRun:
    """``pytest -m gpu <tests_dir>`` in a subprocess, its output shown as it runs."""
    if not tests_dir.is_dir():
        return PytestRun(note=f"no tests folder at {tests_dir} (pass --tests DIR from a source checkout)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        junit = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", str(tests_dir)]
        completed = subprocess.run(command, cwd=tests_dir.parent, check=False)
        if not junit.exists():
            return PytestRun(returncode=completed.returncode, note="pytest wrote no report")
        return PytestRun(returncode=completed.returncode, **parse_junit(junit))


# ---------------------------------------------------------------------------------------------------------------


def _environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "CUDA": torch.version.cuda, "triton": triton_version,
            "hcr_kernels._C CUDA kernels": "yes" if _extension.build_info()["cuda"] else "no"}


def main(argv: list[str] | None = None) -> int:
    ops = sorted({workload.op for workload in bandwidth_model.WORKLOADS})
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                        help=f"folder for gpu_check.md and gpu_check.json (default: ./{DEFAULT_OUT}/)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    parser.add_argument("--tests", type=Path, default=None, help="the tests folder (default: the checkout's tests/)")
    parser.add_argument("--ops", nargs="+", choices=ops, default=ops, metavar="OP",
                        help=f"time only these ops (default: all of {', '.join(ops)})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls; the median is reported (default 20)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0

    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    peak = bandwidth_model.device_peak(device)
    tests = None if args.skip_tests else run_gpu_tests(args.tests or default_tests_dir())
    workloads = [workload for workload in bandwidth_model.WORKLOADS if workload.op in args.ops]
    print(f"gpu_check: timing {len(workloads)} workloads on {device_name}")
    torch.manual_seed(0)
    measurements, unavailable = measure(workloads, device, warmup=args.warmup, repeats=args.repeats)
    timing = (f"median of {args.repeats} calls after {args.warmup} warm-up calls, CUDA events, "
              f"L2 flushed ({L2_FLUSH_BYTES // 2**20} MiB written) before each call")
    report = build_report(workloads, measurements, peak, device_name=device_name, tests=tests,
                          unavailable=unavailable, environment=_environment(), timing=timing)
    markdown, data = write_report(report, workloads, args.out)
    print(markdown.read_text(encoding="utf-8"))
    print(f"gpu_check: wrote {markdown} and {data}")
    failed = (tests is not None and not tests.ok) or any(m.error for m in measurements)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
