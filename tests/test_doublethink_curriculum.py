"""Curriculum: rejection sampling follows 1 - f * recent accuracy; the limit moves to longest solved + 1."""

import numpy as np
import pytest

from hcr.doublethink.curriculum import Curriculum
from hcr.doublethink.evaluation import accuracy_bar


def test_sampling_follows_the_acceptance_probabilities():
    curriculum = Curriculum(flatten_factor=0.95, seed=123, max_length=10)
    for limit in range(1, 5):
        curriculum.update([1.0] * limit)
    assert curriculum.limit == 5
    recent = curriculum.recent_accuracy()
    # a length enters with one 0 entry: length 1 has seen [0, 1, 1, 1, 1], ..., length 5 [0]
    assert recent == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2, 0.0])
    expected = (1 - 0.95 * recent) / (1 - 0.95 * recent).sum()
    assert curriculum.distribution() == pytest.approx(expected)
    draws = 40_000
    counts = np.bincount(np.array(curriculum.sample(draws)) - 1, minlength=curriculum.limit)
    assert counts.sum() == draws and len(counts) == curriculum.limit  # nothing beyond the limit
    sigma = np.sqrt(draws * expected * (1 - expected))
    assert np.all(np.abs(counts - draws * expected) < 4 * sigma), (counts, draws * expected)


def test_flatten_factor_zero_is_uniform_and_seeds_reproduce():
    curriculum = Curriculum(flatten_factor=0.0, seed=5, max_length=4)
    curriculum.update([1.0])
    curriculum.update([1.0, 1.0])
    assert curriculum.distribution() == pytest.approx([1 / 3] * 3)
    again = Curriculum(flatten_factor=0.0, seed=5, max_length=4)
    again.update([1.0])
    again.update([1.0, 1.0])
    assert curriculum.sample(50) == again.sample(50)


def test_limit_moves_to_longest_solved_plus_one():
    curriculum = Curriculum(solved_threshold=0.9, max_length=4, seed=0)
    assert curriculum.limit == 1
    assert curriculum.update([0.5]) == 1
    assert curriculum.update([0.9]) == 2
    assert curriculum.update([1.0, 0.95]) == 3
    # the longest solved length counts even if a shorter one is not solved (as in the seed)
    assert curriculum.update([0.2, 1.0, 0.1]) == 3
    # nothing solved: back to the start, and the dropped lengths lose their history
    assert curriculum.update([0.0, 0.3, 0.0]) == 1
    assert curriculum.update([1.0]) == 2
    assert list(curriculum.histories[1]) == [0.0]
    # capped at max_length; solving max_length finishes the curriculum
    curriculum.update([1.0, 1.0])
    assert curriculum.limit == 3 and not curriculum.finished
    curriculum.update([1.0, 1.0, 1.0])
    assert curriculum.limit == 4
    curriculum.update([1.0, 1.0, 1.0, 1.0])
    assert curriculum.limit == 4 and curriculum.finished


def test_history_keeps_the_last_evaluations_only():
    curriculum = Curriculum(history=3, max_length=2)
    for accuracy in (0.1, 0.2, 0.3, 0.4):
        curriculum.update([accuracy])
    assert list(curriculum.histories[0]) == [0.2, 0.3, 0.4]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="flatten_factor"):
        Curriculum(flatten_factor=1.5)
    with pytest.raises(ValueError, match="solved_threshold"):
        Curriculum(solved_threshold=0.0)
    with pytest.raises(ValueError, match="one entry per length 1..1"):
        Curriculum().update([1.0, 1.0])


def test_accuracy_bar_shades():
    assert accuracy_bar([1.0, 0.8, 0.6, 0.3, 0.1, 0.0]) == "«█▓▒░  »"
    assert accuracy_bar([]) == "«»"
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        accuracy_bar([1.5])
