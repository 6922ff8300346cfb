"""Evaluation: teacher-forced argmax per length, and the per-length accuracy bar.

Why teacher-forced: the model is fed the true sequence and each scored position's
argmax is compared with the true next token, so one forward pass scores a whole batch.
An item counts as solved only if
*every* scored token is right (``TaskBatch.answer_targets``: for doublethink the overt
reasoning, the second newline and the hidden result; for direct every hidden value).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hcr.doublethink.data import IGNORE_INDEX, TaskBatch, encode_tasks
from hcr.doublethink.tasks import TaskGenerator

__all__ = ["SHADES", "accuracy_bar", "evaluate_lengths", "items_solved", "solve_batch"]

#: accuracy bar characters: index ``min(4, floor(4 * accuracy))``, so ``█`` is 100%,
#: ``▓`` [75%, 100%), ``▒`` [50%, 75%), ``░`` [25%, 50%) and a blank below 25%.
SHADES = " ░▒▓█"


def accuracy_bar(accuracies) -> str:
    """``«██▓ »``: one character per task length (1, 2, …), shaded by accuracy (see ``SHADES``)."""
    chars = []
    for accuracy in accuracies:
        if not 0.0 <= float(accuracy) <= 1.0:
            raise ValueError(f"accuracies must be in [0, 1], got {accuracy}")
        chars.append(SHADES[min(len(SHADES) - 1, int(np.floor(float(accuracy) * (len(SHADES) - 1))))])
    return "«" + "".join(chars) + "»"


def items_solved(logits: torch.Tensor, answer_targets: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: every scored position's argmax equals its target (``-100`` = not scored)."""
    correct = (logits.argmax(dim=-1) == answer_targets) | (answer_targets == IGNORE_INDEX)
    return correct.all(dim=1)


@torch.no_grad()
def solve_batch(model: torch.nn.Module, batch: TaskBatch, *, chunk: int = 256) -> torch.Tensor:
    """``items_solved`` of a whole batch, ``chunk`` rows per forward; the model's train/eval mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        solved = []
        for start in range(0, len(batch), chunk):
            rows = slice(start, start + chunk)
            mask = batch.attention_mask[rows]
            width = int(mask.sum(dim=1).max())
            logits = model(
                input_ids=batch.input_ids[rows, :width].to(device), attention_mask=mask[:, :width].to(device)
            ).logits
            solved.append(items_solved(logits, batch.answer_targets[rows, :width].to(device)).cpu())
        return torch.cat(solved)
    finally:
        model.train(was_training)


def evaluate_lengths(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    max_length: int,
    per_length: int,
    generator: TaskGenerator,
) -> np.ndarray:
    """Accuracy at each task length ``1 … max_length`` on ``per_length`` fresh tasks each."""
    if per_length < 1:
        raise ValueError(f"per_length must be >= 1, got {per_length}")
    lengths = np.repeat(np.arange(1, max_length + 1), per_length)
    batch = encode_tasks(tokenizer, generator.tasks(lengths), kind)
    solved = solve_batch(model, batch).numpy()
    return np.bincount(lengths - 1, weights=solved, minlength=max_length) / per_length
