"""Evaluation items: questions and gold answers from a jsonl file or a saved ``datasets`` folder."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from hcr.argtypes import POSITIVE_INT, check_values, optional
from hcr.evaluation.answers import extract_answer
from hcr.files import read_jsonl, require_fields

__all__ = ["EvalItem", "gold_answer", "load_items"]


@dataclass(frozen=True)
class EvalItem:
    index: int  # position in the dataset: the key of results.jsonl and of the sharding
    question: str
    gold: str


def gold_answer(answer) -> str:
    """The gold answer of a dataset row: its boxed answer when it is a whole R1 output, else the text itself."""
    text = str(answer).strip()
    if "\\boxed" in text or "\\fbox" in text:
        extracted = extract_answer(text)
        if extracted is not None:
            return extracted
    return text


def _dataset_rows(path: Path, split: str | None):
    from hcr.compression.train import load_traces

    dataset = load_traces(path)
    if hasattr(dataset, "keys"):  # a DatasetDict
        splits = list(dataset.keys())
        if split is None:
            split = "test" if "test" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise ValueError(f"dataset {path} has splits {splits}: choose one with --split")
        dataset = dataset[split]
    elif split is not None:
        raise ValueError(f"dataset {path} has no splits, but --split {split!r} was given")
    for index, row in enumerate(dataset):
        yield f"row {index}", row


def load_items(path, question_field: str = "question", answer_field: str = "answer", *, split: str | None = None,
               limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` items (all when None) of a ``.jsonl`` file or a dataset saved with ``save_to_disk``.

    Errors name the file and the line (or row) and, for a missing field, the fields the row has.
    """
    path = Path(path)
    check_values(limit=(limit, optional(POSITIVE_INT)))
    if not path.exists():
        raise FileNotFoundError(f"--dataset {path}: no such file or folder")
    if path.is_file() and path.suffix == ".jsonl":
        rows = ((f"line {number}", row) for number, row in read_jsonl(path))
    else:
        rows = _dataset_rows(path, split)
    items = []
    with contextlib.closing(rows):  # stopped at the limit, the reader's file is closed now, not at collection
        for index, (where, row) in enumerate(rows):
            if limit is not None and index >= limit:
                break
            require_fields(row, (question_field, answer_field), f"{path}, {where}",
                           " (choose others with --question-field / --answer-field)")
            items.append(EvalItem(index, str(row[question_field]), gold_answer(row[answer_field])))
    if not items:
        raise ValueError(f"--dataset {path}: no items (the file or dataset is empty)")
    return items
