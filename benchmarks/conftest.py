"""Benchmark helpers: side-by-side ratios at the end of the run.

Each benchmark records ``extra_info["backend"]`` (``reference``, ``native``,
``copy``, ...), optionally ``extra_info["bytes"]`` (bytes the op must read and
write), ``extra_info["count"]`` with ``extra_info["unit"]`` (work items per call,
e.g. tokens or examples, printed as a rate) and ``extra_info["peak_mb"]`` (peak memory).
At the end, per group, the summary prints every backend's median, its speedup
over ``reference`` and, where the group has a ``copy`` entry (a plain tensor copy
of the same bytes) or a ``read`` entry (a sum of them), the fraction of its bandwidth
it achieves. Ratios
taken within one run are what to report: this machine is shared and noisy; an
``interleaved`` entry (``interleaved.py``) holds paths timed in alternation, each
printed with its ratios to the entry's baselines. An entry whose median is far above
its fastest round is flagged as disturbed (``disturbed_rounds.py``).

Every benchmark records the CPU and the ISA the native kernels ran with
(``extra_info["cpu"]``, ``["cpu_isa"]``), and the summary names them: figures from
an AVX2 machine and an AVX-512 one are not comparable. ``HCR_CPU_ISA=avx2`` (or
``baseline``) runs the suite with another ISA's kernels on the same machine.

Freed memory is kept for reuse for the whole session (``page_faults.keep_freed_memory``:
otherwise ops returning hundreds of MiB time page faults), and benchmarks that
allocate large outputs record ``extra_info["faults_per_call"]``, printed in the summary.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from disturbed_rounds import disturbed_rounds_note
from hcr_kernels import cpu_isa
from hcr_kernels.cpu_identity import cpu_identity
from page_faults import keep_freed_memory

MEMORY_REUSED = keep_freed_memory()
# Paths that only move the bytes an op must move: other paths are given as a share of their bandwidth.
BANDWIDTH_YARDSTICKS = ("copy", "read")


def machine() -> str:
    isas = ", ".join(cpu_isa.supported_cpu_isas()) or "-"
    return (f"{cpu_identity()}, native kernels on {cpu_isa.active_cpu_isa()} (CPU has: {isas}), "
            f"{torch.get_num_threads()} CPU threads")


def pytest_report_header(config):
    memory = "freed memory kept for reuse" if MEMORY_REUSED else "freed memory returned as usual (not glibc)"
    return f"torch {torch.__version__}, {machine()}, {memory}"


@pytest.fixture(autouse=True)
def _record_machine(request):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(cpu=cpu_identity(),
                                                               cpu_isa=cpu_isa.active_cpu_isa())


@pytest.fixture
def one_thread():
    """torch on one thread for this benchmark only: the previous count comes back after it, so the
    benchmarks that run later in the same session keep theirs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, tuple[float, dict]]] = defaultdict(dict)
    disturbed: dict[tuple[str, str], str] = {}
    for bench in session.benchmarks:
        backend = bench.extra_info.get("backend")
        if backend and bench.stats:
            groups[bench.group][backend] = (bench.stats.median, bench.extra_info)
            note = disturbed_rounds_note(bench.stats.median, bench.stats.min, bench.stats.rounds)
            if note:
                disturbed[bench.group, backend] = note
    if not groups:
        return
    write = terminalreporter.write_line
    write("")
    write(f"hcr benchmark ratios (medians of this run; {machine()})")
    for group, entries in sorted(groups.items()):
        write(f"  {group}")
        reference = entries.get("reference", (None, None))[0]
        # the bandwidth yardstick: a copy of the same bytes, or a read of them (decode_attention)
        yardstick = next((name for name in BANDWIDTH_YARDSTICKS if name in entries), "read")
        copy = entries.get(yardstick, (None, None))[0]
        for backend, (median, info) in sorted(entries.items()):
            if info.get("paths"):
                write(f"    {backend:<10} a round of {len(info['paths'])} paths: median {median * 1e3:9.2f} ms, "
                      f"{info['rounds']} rounds")
                for line in _interleaved_lines(info):
                    write(line)
                continue
            parts = [f"    {backend:<10} median {median * 1e3:9.2f} ms", *_rates(info, median)]
            if reference and backend != "reference":
                parts.append(f"{reference / median:5.2f}x vs reference")
            if info.get("peak_mb") is not None:
                peak = f"peak {info['peak_mb']:,.0f} MiB"
                reference_peak = entries.get("reference", (None, {}))[1].get("peak_mb")
                if reference_peak and backend != "reference":
                    peak += f" (1/{reference_peak / info['peak_mb']:.1f} of the reference's)"
                parts.append(peak)
            if info.get("faults_per_call") is not None:
                parts.append(f"{info['faults_per_call']:,} page faults/call")
            if copy and backend != yardstick:
                parts.append(f"{copy / median:5.0%} of {yardstick} bandwidth")
            if (group, backend) in disturbed:
                parts.append(disturbed[group, backend])
            write(", ".join(parts))


def _rates(info: dict, median: float) -> list[str]:
    """Bandwidth (``bytes``) and work rate (``count``, ``unit``) of a call that took ``median`` seconds."""
    rates = []
    if info.get("bytes"):
        rates.append(f"{info['bytes'] / median / 1e9:6.1f} GB/s")
    if info.get("count"):
        rates.append(f"{info['count'] / median:,.0f} {info.get('unit', 'items')}/s")
    return rates


def _interleaved_lines(info: dict) -> list[str]:
    """An ``interleaved.record_interleaved`` entry's paths: median, rate and ratios to its baselines."""
    lines = []
    for name, median in info.get("paths", {}).items():
        parts = [f"      {name:<12} median {median * 1e3:9.2f} ms", *_rates(info, median)]
        for baseline in info.get("baselines", ()):
            if baseline != name:
                ratio = info["paths"][baseline] / median
                parts.append(f"{ratio:5.0%} of {baseline} bandwidth" if baseline in BANDWIDTH_YARDSTICKS
                             else f"{ratio:5.2f}x vs {baseline}")
        lines.append(", ".join(parts))
    return lines
