"""Paths timed in alternation, for ratios that a shared machine's slow minutes cannot decide.

pytest-benchmark times a group's paths one after another, so a minute of another
tenant's load can fall on one path only: in a whole-suite run ``decode_linear``'s
automatic choice came out at 0.59x of a ``reference`` timed minutes apart, and at
1.63x with the two alternating. ``record_interleaved`` runs every path once per round
(the first path rotating, and every other round in reverse order, so each path follows
both of its neighbours in the list in turn: a path can pay for the one before it, e.g.
F.linear after the native ``decode_linear`` took 1.25x its time on an Intel Xeon, and a
rotation alone kept the order in which the paths follow each other) inside
``benchmark.pedantic``: the group's timed figure is a whole round, and each path's
median goes to ``extra_info["paths"]``, which the summary (``conftest.py``) prints
with the ratios to the paths named in ``extra_info["baselines"]``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def record_interleaved(benchmark, paths: dict[str, Callable[[], object]], *, rounds: int, baselines: list[str],
                       warmup_rounds: int = 1, between: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Time ``paths`` alternating for ``rounds`` rounds (after ``warmup_rounds`` untimed ones); returns each
    path's times in seconds and records their medians in ``benchmark.extra_info``. ``between``, if given,
    runs untimed before each timed call (e.g. ``bandwidth.last_level_cache_eviction``: otherwise a path
    finds in the cache what the path before it just read)."""
    unknown = [name for name in baselines if name not in paths]
    if unknown:
        raise ValueError(f"baselines {unknown} are not among the paths {list(paths)}")
    names = list(paths)
    for _ in range(warmup_rounds):
        for name in names:
            paths[name]()
    times: dict[str, list[float]] = {name: [] for name in names}

    def one_round():
        done = len(times[names[0]])
        first = done // 2 % len(names)
        order = names[first:] + names[:first]
        for name in (reversed(order) if done % 2 else order):
            if between is not None:
                between()
            began = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - began)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(backend="interleaved", rounds=rounds, baselines=list(baselines),
                                paths={name: statistics.median(spent) for name, spent in times.items()})
    return times
