"""Tokenizing reasoning traces in the R1-Distill-Qwen chat layout.

    <｜begin▁of▁sentence｜><｜User｜>QUESTION<｜Assistant｜><think>\\nREASONING</think>ANSWER<｜end▁of▁sentence｜>

Each part is tokenized on its own and the ids are concatenated, so the ids and
the content kinds agree by construction (tokenizing the whole string and
assuming the part lengths add up breaks wherever BPE merges across a boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from hcr.compression.tokens import THINK_END, THINK_START, CompressionTokens


class Content(IntEnum):
    """What a position of a tokenized trace holds."""

    TEMPLATE = 0
    QUESTION = 1
    REASONING = 2
    ANSWER = 3


class MissingThinkEndError(ValueError):
    """The answer has no ``</think>``: there is no reasoning part to compress."""


@dataclass(frozen=True)
class TokenizedTrace:
    """One trace: ``ids`` and ``kinds`` (a Content per position), and the part boundaries.

    ``ids[reasoning_start:reasoning_end]`` is the reasoning, ``ids[reasoning_end]`` is
    ``</think>``, ``ids[answer_start:answer_end]`` the answer, then EOS. Everything from
    ``reasoning_start`` on is written by the model (what training supervises).
    """

    ids: np.ndarray
    kinds: np.ndarray
    reasoning_start: int
    reasoning_end: int
    answer_start: int
    answer_end: int


def split_answer(answer: str) -> tuple[str, str]:
    """``"<think>\\nREASONING</think>ANSWER"`` -> (reasoning, answer); ``<think>`` is optional."""
    if THINK_END not in answer:
        raise MissingThinkEndError(f"the answer has no {THINK_END!r}: {answer[:80]!r}")
    reasoning, final = answer.split(THINK_END, 1)
    reasoning = reasoning.strip(" ")
    if reasoning.startswith(THINK_START):
        reasoning = reasoning[len(THINK_START) :]
    if reasoning.startswith("\n"):
        reasoning = reasoning[1:]
    return reasoning, final


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_traces_batch(tokenizer, tokens: CompressionTokens, questions: list[str], answers: list[str]):
    """Tokenize many traces at once; rows without ``</think>`` become None (the caller counts them)."""
    split = []
    for answer in answers:
        try:
            split.append(split_answer(answer))
        except MissingThinkEndError:
            split.append(None)
    keep = [i for i, parts in enumerate(split) if parts is not None]
    question_ids = _encode(tokenizer, [questions[i] for i in keep])
    reasoning_ids = _encode(tokenizer, [split[i][0] for i in keep])
    answer_ids = _encode(tokenizer, [split[i][1] for i in keep])
    newline = _encode(tokenizer, ["\n"])[0]
    head = [tokens.bos, tokens.user]
    results: list[TokenizedTrace | None] = [None] * len(answers)
    for row, q, r, a in zip(keep, question_ids, reasoning_ids, answer_ids):
        prompt_tail = [tokens.assistant, tokens.think_start] + newline
        parts = [
            (head, Content.TEMPLATE),
            (q, Content.QUESTION),
            (prompt_tail, Content.TEMPLATE),
            (r, Content.REASONING),
            ([tokens.think_end], Content.TEMPLATE),
            (a, Content.ANSWER),
            ([tokens.eos], Content.TEMPLATE),
        ]
        ids = np.fromiter((t for part, _ in parts for t in part), dtype=np.int64)
        kinds = np.concatenate([np.full(len(part), kind, dtype=np.int8) for part, kind in parts])
        reasoning_start = len(head) + len(q) + len(prompt_tail)
        reasoning_end = reasoning_start + len(r)
        answer_start = reasoning_end + 1
        results[row] = TokenizedTrace(ids, kinds, reasoning_start, reasoning_end, answer_start, answer_start + len(a))
    return results


def tokenize_trace(tokenizer, question: str, answer: str, tokens: CompressionTokens | None = None) -> TokenizedTrace:
    """Tokenize one (question, answer-with-think) pair; raises MissingThinkEndError without ``</think>``."""
    tokens = tokens or CompressionTokens.from_tokenizer(tokenizer)
    split_answer(answer)  # raises with the message when </think> is missing
    (trace,) = tokenize_traces_batch(tokenizer, tokens, [question], [answer])
    return trace


TRACE_COLUMNS = ("input_ids", "content_kinds", "reasoning_start", "reasoning_end", "answer_start", "answer_end")


def tokenize_dataset(dataset, tokenizer, *, question_column="question", answer_column="answer", num_proc=None):
    """Tokenize a ``datasets.Dataset`` of traces; returns (tokenized dataset, rows skipped for lack of ``</think>``)."""
    for column in (question_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no column {column!r}; it has {dataset.column_names}")
    tokens = CompressionTokens.from_tokenizer(tokenizer)

    def tokenize(batch):
        traces = tokenize_traces_batch(tokenizer, tokens, batch[question_column], batch[answer_column])
        kept = [t for t in traces if t is not None]
        return {
            "input_ids": [t.ids for t in kept],
            "content_kinds": [t.kinds for t in kept],
            "reasoning_start": [t.reasoning_start for t in kept],
            "reasoning_end": [t.reasoning_end for t in kept],
            "answer_start": [t.answer_start for t in kept],
            "answer_end": [t.answer_end for t in kept],
        }

    tokenized = dataset.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names, desc="tokenizing traces"
    )
    return tokenized, len(dataset) - len(tokenized)
