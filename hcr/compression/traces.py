"""Tokenizing reasoning traces in the R1-Distill-Qwen chat layout.

    <｜begin▁of▁sentence｜><｜User｜>QUESTION<｜Assistant｜><think>\\nREASONING</think>ANSWER<｜end▁of▁sentence｜>

Each part is tokenized on its own and the ids are concatenated, so the ids and
the content kinds agree by construction (tokenizing the whole string and
assuming the part lengths add up breaks wherever BPE merges across a boundary).

A trace whose text holds a compression token or a second ``</think>`` is skipped and
counted, like one without ``</think>``: its compressed views would have placeholder
slots (or a reasoning end) that no window fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from hcr.compression.tokens import COMPRESSION_TOKENS, THINK_END, THINK_START, CompressionTokens


class Content(IntEnum):
    """What a position of a tokenized trace holds."""

    TEMPLATE = 0
    QUESTION = 1
    REASONING = 2
    ANSWER = 3


class MissingThinkEndError(ValueError):
    """The answer has no ``</think>``: there is no reasoning part to compress."""


# Why a trace is skipped: the keys of ``tokenize_dataset``'s count.
NO_THINK_END = "no </think>"
COMPRESSION_TOKEN = "compression token"  # in the question, reasoning or answer, as text or as an id
SECOND_THINK_END = "second </think>"  # in the question or after the first one
SKIP_REASONS = (NO_THINK_END, COMPRESSION_TOKEN, SECOND_THINK_END)


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


def _text_skip_reason(question: str, answer: str) -> str | None:
    """Checked first: a skipped row is not even tokenized."""
    if THINK_END not in answer:
        return NO_THINK_END
    if any(token in text for token in COMPRESSION_TOKENS for text in (question, answer)):
        return COMPRESSION_TOKEN
    if THINK_END in question or answer.count(THINK_END) > 1:
        return SECOND_THINK_END
    return None


def _ids_skip_reason(tokens: CompressionTokens, parts) -> str | None:
    """The same check on the ids: a tokenizer may map other text to these tokens."""
    compression = {tokens.placeholder, tokens.block_start, tokens.block_end}
    if any(not compression.isdisjoint(part) for part in parts):
        return COMPRESSION_TOKEN
    if any(tokens.think_end in part for part in parts):
        return SECOND_THINK_END
    return None


def _tokenize_batch(tokenizer, tokens: CompressionTokens, questions: list[str], answers: list[str]):
    """(traces, reasons): a TokenizedTrace and None per usable row, None and its SKIP_REASONS entry per other."""
    reasons = [_text_skip_reason(q, a) for q, a in zip(questions, answers)]
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    split = {i: split_answer(answers[i]) for i in keep}
    question_ids = _encode(tokenizer, [questions[i] for i in keep])
    reasoning_ids = _encode(tokenizer, [split[i][0] for i in keep])
    answer_ids = _encode(tokenizer, [split[i][1] for i in keep])
    newline = _encode(tokenizer, ["\n"])[0]
    head = [tokens.bos, tokens.user]
    results: list[TokenizedTrace | None] = [None] * len(answers)
    for row, q, r, a in zip(keep, question_ids, reasoning_ids, answer_ids):
        reasons[row] = _ids_skip_reason(tokens, (q, r, a))
        if reasons[row] is not None:
            continue
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
    return results, reasons


def tokenize_traces_batch(tokenizer, tokens: CompressionTokens, questions: list[str], answers: list[str]):
    """Tokenize many traces at once; a row that cannot be trained on (one of SKIP_REASONS) becomes None."""
    return _tokenize_batch(tokenizer, tokens, questions, answers)[0]


def tokenize_trace(tokenizer, question: str, answer: str, tokens: CompressionTokens | None = None) -> TokenizedTrace:
    """Tokenize one (question, answer-with-think) pair; raises MissingThinkEndError without ``</think>``,
    a ValueError naming the reason for another trace that would be skipped."""
    for name, text in (("question", question), ("answer", answer)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be text (a str), got {type(text).__name__}")
    tokens = tokens or CompressionTokens.from_tokenizer(tokenizer)
    split_answer(answer)  # raises with the message when </think> is missing
    (trace,), (reason,) = _tokenize_batch(tokenizer, tokens, [question], [answer])
    if trace is None:
        raise ValueError(f"this trace cannot be trained on ({reason}): {question[:40]!r}, {answer[:80]!r}")
    return trace


def tokenize_dataset(dataset, tokenizer, *, question_column="question", answer_column="answer", num_proc=None):
    """Tokenize a ``datasets.Dataset`` of traces; returns (tokenized dataset, skipped rows by reason).

    The count has every one of SKIP_REASONS as a key (``format_skips`` words it); the map keeps a
    row per trace, marked with its reason, so that the count holds under ``num_proc`` too.
    """
    for column in (question_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no column {column!r}; it has {dataset.column_names}")
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    empty = np.zeros(0, dtype=np.int64)

    def tokenize(batch, rows):
        for column in (question_column, answer_column):
            _check_texts(batch[column], rows, column)
        traces, reasons = _tokenize_batch(tokenizer, tokens, batch[question_column], batch[answer_column])
        return {
            "input_ids": [empty if t is None else t.ids for t in traces],
            "content_kinds": [empty.astype(np.int8) if t is None else t.kinds for t in traces],
            "reasoning_start": [0 if t is None else t.reasoning_start for t in traces],
            "reasoning_end": [0 if t is None else t.reasoning_end for t in traces],
            "answer_start": [0 if t is None else t.answer_start for t in traces],
            "answer_end": [0 if t is None else t.answer_end for t in traces],
            "skipped": [reason or "" for reason in reasons],
        }

    tokenized = dataset.map(tokenize, batched=True, with_indices=True, num_proc=num_proc,
                            remove_columns=dataset.column_names, desc="tokenizing traces")
    reasons = tokenized["skipped"][:]  # a list at once (iterating a datasets Column goes row by row)
    skipped = {reason: 0 for reason in SKIP_REASONS}
    for reason in reasons:
        if reason:
            skipped[reason] += 1
    tokenized = tokenized.select([i for i, reason in enumerate(reasons) if not reason]).remove_columns("skipped")
    return tokenized, skipped


def _check_texts(values: list, rows: list[int], column: str) -> None:
    """A ValueError naming the row and column of a value that is not text: a null is what ``datasets``
    puts where a JSON row lacks the column."""
    for row, value in zip(rows, values):
        if not isinstance(value, str):
            what = "is null (missing from that row?)" if value is None else f"holds a {type(value).__name__}"
            raise ValueError(f"dataset row {row}: {column!r} {what}, not text")


def format_skips(skipped: dict[str, int]) -> str:
    """``tokenize_dataset``'s count in words: "none skipped" or "skipped: 2 no </think>, 1 compression token"."""
    counts = [f"{n} {reason}" for reason, n in skipped.items() if n]
    return "skipped: " + ", ".join(counts) if counts else "none skipped"
