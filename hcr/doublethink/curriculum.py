"""The length curriculum: sample task lengths the model has not mastered yet.

Its choices, made explicit:

* lengths ``1 … limit`` are candidates; a candidate length ``k`` drawn uniformly is
  accepted with probability ``1 - f * recent_accuracy(k)`` (rejection sampling), so
  ``P(k) ∝ 1 - f * recent_accuracy(k)``. ``recent_accuracy`` is the mean of the last
  ``history`` evaluations at that length (default 20); ``f`` (default 0.95) keeps
  mastered lengths in the mix at rate ``1 - f`` relative to unsolved ones;
* a length that enters the curriculum starts with one evaluation of accuracy 0, so it
  is sampled at full rate until evaluated;
* after each round every length up to the limit is evaluated; a length is **solved**
  when its accuracy is ``>= solved_threshold`` (default 0.9: with the experiment's 20
  items per length, at most two wrong; chance level for the hidden value is 0.2). One
  evaluation decides, so a lucky round can raise the limit early: the 20-evaluation
  history then keeps sampling that length until it is really learnt. The limit becomes
  ``longest solved length + 1`` (at least ``start_limit``, at most ``max_length``). The
  longest solved length counts even if a shorter one is not solved, and lengths beyond
  a lowered limit lose their history;
* the curriculum is ``finished`` once ``max_length`` is solved.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

__all__ = ["Curriculum"]


class Curriculum:
    def __init__(
        self,
        *,
        flatten_factor: float = 0.95,
        history: int = 20,
        solved_threshold: float = 0.9,
        start_limit: int = 1,
        max_length: int = 30,
        seed: int = 0,
    ):
        if not 0.0 <= flatten_factor <= 1.0:
            raise ValueError(f"flatten_factor must be in [0, 1], got {flatten_factor}")
        if history < 1:
            raise ValueError(f"history must be >= 1 evaluations, got {history}")
        if not 0.0 < solved_threshold <= 1.0:
            raise ValueError(f"solved_threshold must be in (0, 1], got {solved_threshold}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not 1 <= start_limit <= max_length:
            raise ValueError(f"start_limit must be in [1, max_length={max_length}], got {start_limit}")
        self.flatten_factor = float(flatten_factor)
        self.history = int(history)
        self.solved_threshold = float(solved_threshold)
        self.start_limit = int(start_limit)
        self.max_length = int(max_length)
        self.rng = np.random.default_rng(seed)
        self.histories: list[deque] = []
        self.longest_solved = 0
        self._resize(self.start_limit)

    @property
    def limit(self) -> int:
        """The longest task length sampled now."""
        return len(self.histories)

    @property
    def finished(self) -> bool:
        return self.longest_solved >= self.max_length

    def _resize(self, limit: int) -> None:
        del self.histories[limit:]
        while len(self.histories) < limit:
            self.histories.append(deque([0.0], maxlen=self.history))

    def recent_accuracy(self) -> np.ndarray:
        """Mean of the recent evaluations of each length ``1 … limit``."""
        return np.array([np.mean(h) for h in self.histories])

    def acceptance(self) -> np.ndarray:
        """Probability that a drawn candidate of each length is kept: ``1 - f * recent accuracy``."""
        return 1.0 - self.flatten_factor * self.recent_accuracy()

    def distribution(self) -> np.ndarray:
        """The distribution the sampler follows over lengths ``1 … limit`` (uniform if nothing is accepted)."""
        accept = self.acceptance()
        total = accept.sum()
        return accept / total if total > 0 else np.full(self.limit, 1.0 / self.limit)

    def sample(self, count: int) -> list[int]:
        """``count`` task lengths by rejection sampling (candidates in vectorised blocks)."""
        accept = self.acceptance()
        if accept.sum() <= 0:  # f = 1 and every length perfect: nothing would ever be accepted
            return (self.rng.integers(0, self.limit, size=count) + 1).tolist()
        kept: list[np.ndarray] = []
        need = count
        while need > 0:
            candidates = self.rng.integers(0, self.limit, size=max(2 * need, 16))
            chosen = candidates[self.rng.random(candidates.size) < accept[candidates]][:need]
            kept.append(chosen)
            need -= chosen.size
        return (np.concatenate(kept) + 1).tolist() if kept else []

    def update(self, accuracies: Sequence[float]) -> int:
        """Record one evaluation of lengths ``1 … limit`` and move the limit; returns the new limit."""
        accuracies = [float(a) for a in accuracies]
        if len(accuracies) != self.limit:
            raise ValueError(f"accuracies must have one entry per length 1..{self.limit}, got {len(accuracies)}")
        for past, accuracy in zip(self.histories, accuracies):
            past.append(accuracy)
        solved = [length for length, a in enumerate(accuracies, start=1) if a >= self.solved_threshold]
        self.longest_solved = max(solved, default=0)
        self._resize(min(max(self.longest_solved + 1, self.start_limit), self.max_length))
        return self.limit
