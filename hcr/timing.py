"""Wall time per named stage, for the reports of long jobs (the demo, generation)."""

from __future__ import annotations

import contextlib
import time


class StageClock:
    """Exclusive wall time of each stage: ``with clock("name"): ...``.

    A stage opened inside another counts only for itself (the outer stage is charged
    what is left), so the figures are disjoint and add up to the time spent in stages:
    a generation step's pooling is not also counted as its re-encode.
    ``names`` lists stages reported as 0.0 when they never ran.
    """

    def __init__(self, names=()):
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._nested: list[float] = []  # per open stage: the time its inner stages took

    @contextlib.contextmanager
    def __call__(self, name: str):
        began = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - began
            inner = self._nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed
