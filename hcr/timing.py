"""Wall time per named stage, for the reports of long jobs (the demo, generation)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable


class StageClock:
    """Exclusive wall time of each stage: ``with clock("name"): ...``.

    A stage opened inside another counts only for itself (the outer stage is charged
    what is left), so the figures are disjoint and add up to the time spent in stages:
    a generation step's pooling is not also counted as its re-encode.
    ``names`` lists stages reported as 0.0 when they never ran.

    ``set_aside=(name, counter)``: ``counter()`` reads seconds spent on one-time work that may run
    inside any stage (``hcr_kernels.autotune.measuring_seconds``: measuring which kernel wins);
    what it advances during a stage is charged to ``name`` instead of that stage, so a first run's
    measurements do not pass for the cost of decoding.
    """

    def __init__(self, names=(), set_aside: tuple[str, Callable[[], float]] | None = None):
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._set_aside = set_aside
        if set_aside is not None:
            self.seconds.setdefault(set_aside[0], 0.0)
        self._nested: list[list[float]] = []  # per open stage: its inner stages' time, and what was set aside in it

    @contextlib.contextmanager
    def __call__(self, name: str):
        counter = self._set_aside[1] if self._set_aside is not None else None
        began, aside_began = time.perf_counter(), counter() if counter is not None else 0.0
        self._nested.append([0.0, 0.0])
        try:
            yield
        finally:
            elapsed = time.perf_counter() - began
            aside = counter() - aside_began if counter is not None else 0.0
            inner, inner_aside = self._nested.pop()
            own_aside = aside - inner_aside  # set aside while this stage, not an inner one, was innermost
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner - own_aside
            if own_aside:
                self.seconds[self._set_aside[0]] += own_aside
            if self._nested:
                self._nested[-1][0] += elapsed
                self._nested[-1][1] += aside
