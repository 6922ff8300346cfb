"""Tasks -> padded token tensors, the dataset and collator the trainer reads.

Why a separate module: the tasks are text and tokenizer-agnostic; the trainer and the
evaluation need tensors with one convention. Rows are right-padded; ``answer_targets``
(aligned with the logits: position ``j`` holds the token the logits at ``j`` must
predict, ``-100`` where nothing is scored) says what the evaluation checks:

* doublethink: every token after the answer marker (overt reasoning, the second
  newline, the hidden result), predicted from the previous position;
* direct: the hidden value after each operation, predicted at that operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from hcr.doublethink.tasks import Task, task_texts
from hcr.doublethink.tokenizer import answer_marker_id
from hcr_kernels import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "TaskBatch", "TaskDataset", "collate", "doublethink_answer_targets", "encode_tasks"]


@dataclass
class TaskBatch:
    """``input_ids``/``attention_mask`` ``[B, L]``, ``answer_targets`` ``[B, L]``, ``lengths`` ``[B]``.

    ``labels`` is the loss target of the direct task (the same as ``answer_targets``) and
    None for doublethink, whose loss reads the shifted ``input_ids``.
    """

    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_targets: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.labels is not None:
            inputs["labels"] = self.labels
        return inputs


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def doublethink_answer_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: int) -> torch.Tensor:
    """Targets aligned with the logits: token ``j + 1`` at ``j`` when it is real and after the first marker."""
    is_marker = input_ids == marker
    seen = is_marker.long().cumsum(dim=1)
    after_first_marker = (seen >= 1) & ~(is_marker & (seen == 1))
    scored = after_first_marker & attention_mask.bool()
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(scored[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return targets


def encode_tasks(tokenizer: PreTrainedTokenizerBase, tasks: list[Task], kind: str) -> TaskBatch:
    """Tokenize ``tasks`` of one kind into a right-padded ``TaskBatch``."""
    if not tasks:
        raise ValueError("tasks must not be empty")
    firsts, seconds = zip(*(task_texts(kind, task) for task in tasks))
    lengths = torch.tensor([len(task) for task in tasks])
    if kind == "doublethink":
        input_ids, mask = _tokenize(tokenizer, [a + b for a, b in zip(firsts, seconds)])
        targets = doublethink_answer_targets(input_ids, mask, answer_marker_id(tokenizer))
        return TaskBatch(kind, input_ids, mask, targets, lengths)
    input_ids, mask = _tokenize(tokenizer, list(firsts))
    label_ids, label_mask = _tokenize(tokenizer, list(seconds))
    if label_ids.shape != input_ids.shape or not torch.equal(label_mask, mask):
        raise ValueError("direct task: the tokenizer must give one token per operation and per value")
    labels = torch.where(label_mask.bool(), label_ids, IGNORE_INDEX)
    return TaskBatch(kind, input_ids, mask, labels, lengths, labels=labels)


class TaskDataset(torch.utils.data.Dataset):
    """Rows of a ``TaskBatch`` as dicts of model inputs, for ``transformers.Trainer``."""

    def __init__(self, batch: TaskBatch):
        self.inputs = batch.model_inputs()

    def __len__(self) -> int:
        return self.inputs["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: tensor[i] for name, tensor in self.inputs.items()}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows and drop the columns that are padding in every row."""
    batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {name: tensor[:, :width] for name, tensor in batch.items()}
