"""Page faults out of the race: the benchmark session reuses freed memory, and large-output benchmarks count faults.

An op that returns hundreds of MiB gets fresh pages from glibc on every call (blocks
above its mmap threshold, at most 32 MiB, are mapped for each allocation and unmapped
when freed), and a page fault cost ~6.5 us on this project's VM. Such benchmarks timed
page faults, as many as the process's fragmentation made it by then: weighted CE
forward+backward was 3.72x its reference run alone and 0.91x late in the whole suite.
So ``keep_freed_memory`` (called when the benchmarks' conftest is imported) asks glibc
to serve every block from its heap and never give the heap back, and both paths of a
comparison then run in memory touched before: what is timed is the op, after warm-up,
as in a training loop that has reached its steady state. The heap still grows where
fragmentation leaves no free block large enough, so the benchmarks that allocate large
outputs record minor page faults per call (``pedantic_counting_faults``), printed in the summary:
a median call that still faults has not reached that state.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
from collections.abc import Callable

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory() -> bool:
    """glibc serves large blocks from its heap (no mmap) and keeps the heap's freed top (no trim); False
    where that is not available (not Linux with glibc), and the benchmarks then allocate as usual."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # glibc converts the trim threshold to a size_t: -1 is SIZE_MAX, never reached (INT_MAX, 2 GiB, was:
    # a reference whose freed top exceeded it still got fresh pages on some calls)
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def minor_faults() -> int:
    import resource  # Unix only: imported here, so the module (and the benchmarks' conftest) loads everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pedantic_counting_faults(benchmark, fn: Callable[[], object], *, rounds: int, warmup_rounds: int) -> None:
    """``benchmark.pedantic(fn, ...)``, recording the median minor page faults of the timed calls
    in ``extra_info["faults_per_call"]``. ``fn``'s result is dropped within the call: kept (as pedantic
    keeps the last one while the next call runs), an 811 MiB gradient sat where the next call's blocks
    would have gone, and the reference of weighted CE got fresh pages on every call."""
    counts: list[int] = []

    def run() -> None:
        before = minor_faults()
        fn()
        counts.append(minor_faults() - before)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds)
    benchmark.extra_info["faults_per_call"] = int(statistics.median(counts[warmup_rounds:]))
