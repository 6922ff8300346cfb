"""The demo's task: chained arithmetic mod 10, solved one written step at a time.

A question names a start value and a list of lettered operations; the reasoning
writes, for each letter, its operation (copied from the question) and the value
after it:

    Start at 3, mod 10: a +4 b *3 c -2 d +7. Final value?
    <think>
    a +4 7 b *3 1 c -2 9 d +7 6
    </think>

    The final value is \\boxed{6}.

Each step needs the value written just before it, and nothing else the question
does not hold: when the last written value sits inside a compressed window, the
model has to read it from the pooled vector. Copying the operation into the trace
makes each step a local computation, which a tiny model learns in a few hundred
steps (with bare ``letter value`` steps it had not learned the lookup after 300).
With the tiny tokenizer a step is 4 tokens (`` b``, `` *``, ``3``, `` 1``), so the
share of steps written while their predecessor is compressed depends only on W
and keep_last (``needed_value_compressed``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

OPERATIONS = ("+", "-", "*")
MODULUS = 10


@dataclass(frozen=True)
class ChainTask:
    """One question: start value, (letter, operator, operand) steps, and the values after each step."""

    start: int
    steps: tuple[tuple[str, str, int], ...]

    @property
    def values(self) -> list[int]:
        value, out = self.start, []
        for _, op, operand in self.steps:
            value = apply(op, value, operand)
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    def question(self) -> str:
        ops = " ".join(f"{letter} {op}{operand}" for letter, op, operand in self.steps)
        return f"Start at {self.start}, mod {MODULUS}: {ops}. Final value?"

    def step_texts(self) -> list[str]:
        """What the reasoning writes for each step: its letter, its operation, the value after it."""
        return [f"{letter} {op}{operand} {value}" for (letter, op, operand), value in zip(self.steps, self.values)]

    def reasoning(self) -> str:
        return " ".join(self.step_texts())

    def value_offsets(self) -> list[int]:
        """Character offset, in ``reasoning()``, of each step's value (the last character of its step)."""
        offsets, position = [], 0
        for step in self.step_texts():
            offsets.append(position + len(step) - 1)
            position += len(step) + 1
        return offsets

    def response(self) -> str:
        """The assistant's text in the R1 layout: ``<think>`` reasoning ``</think>`` answer."""
        return f"<think>\n{self.reasoning()}\n</think>\n\nThe final value is \\boxed{{{self.answer}}}."

    def row(self) -> dict:
        return {"question": self.question(), "answer": self.response(), "gold": str(self.answer)}


def apply(op: str, value: int, operand: int) -> int:
    if op == "+":
        return (value + operand) % MODULUS
    if op == "-":
        return (value - operand) % MODULUS
    if op == "*":
        return (value * operand) % MODULUS
    raise ValueError(f"op must be one of {OPERATIONS}, got {op!r}")


def random_task(rng: random.Random, min_steps: int, max_steps: int) -> ChainTask:
    count = rng.randint(min_steps, max_steps)
    steps = []
    for letter in string.ascii_lowercase[:count]:
        op = rng.choice(OPERATIONS)
        steps.append((letter, op, rng.randint(2, 9) if op == "*" else rng.randint(1, 9)))
    return ChainTask(rng.randint(0, MODULUS - 1), tuple(steps))


def split_corpus(train: int, heldout: int, *, min_steps: int, max_steps: int, seed: int):
    """(train tasks, held-out tasks): distinct questions, none of the held-out ones in the training set."""
    if not 1 <= min_steps <= max_steps <= 26:
        raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 26, got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    seen: set[ChainTask] = set()
    tasks: list[ChainTask] = []
    attempts = 0
    while len(tasks) < train + heldout:
        attempts += 1
        if attempts > 20 * (train + heldout) + 1000:
            raise ValueError(f"cannot draw {train + heldout} distinct questions with {min_steps}-{max_steps} steps")
        task = random_task(rng, min_steps, max_steps)
        if task not in seen:
            seen.add(task)
            tasks.append(task)
    return tasks[:train], tasks[train:]


def windows_pooled(written: int, window: int, keep_last: int) -> int:
    """Reasoning windows the generator has pooled once ``written`` reasoning tokens exist.

    It pools the oldest W tokens as soon as W + keep_last are uncompressed, one window per step.
    """
    return max(0, (written - keep_last) // window)


def needed_value_compressed(value_positions: list[int], window: int, keep_last: int) -> tuple[int, int]:
    """(steps whose previous value was compressed when they were written, steps counted).

    ``value_positions``: indices, within the reasoning, of the tokens that write each
    step's value. Token j is written after ``windows_pooled(j, ...)`` windows were
    pooled, so the value at index i is inside the block when ``i < window * that``.
    """
    hidden = sum(previous < window * windows_pooled(current, window, keep_last)
                 for previous, current in zip(value_positions, value_positions[1:]))
    return hidden, max(0, len(value_positions) - 1)
