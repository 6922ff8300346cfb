"""Benchmark helpers: side-by-side ratios at the end of the run.

Each benchmark records ``extra_info["backend"]`` (``reference``, ``native``,
``copy``, ...) and ``extra_info["bytes"]`` (bytes the op must read and write).
At the end, per group, the summary prints every backend's median, its speedup
over ``reference`` and, where the group has a ``copy`` entry (a plain tensor copy
of the same bytes), the fraction of the copy's bandwidth it achieves. Ratios
taken within one run are what to report: this machine is shared and noisy.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for bench in session.benchmarks:
        backend = bench.extra_info.get("backend")
        if backend and bench.stats:
            groups[bench.group][backend] = (bench.stats.median, bench.extra_info.get("bytes", 0))
    if not groups:
        return
    write = terminalreporter.write_line
    write("")
    write("hcr benchmark ratios (medians of this run)")
    for group, entries in sorted(groups.items()):
        write(f"  {group}")
        reference = entries.get("reference", (None, 0))[0]
        copy = entries.get("copy", (None, 0))[0]
        for backend, (median, moved) in sorted(entries.items()):
            parts = [f"    {backend:<10} median {median * 1e3:9.2f} ms"]
            if moved:
                parts.append(f"{moved / median / 1e9:6.1f} GB/s")
            if reference and backend != "reference":
                parts.append(f"{reference / median:5.2f}x vs reference")
            if copy and backend != "copy":
                parts.append(f"{copy / median:5.0%} of copy bandwidth")
            write(", ".join(parts))
