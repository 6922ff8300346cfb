"""``ReasoningTrainer``: a ``transformers.Trainer`` with the doublethink losses.

Why a custom loss: the model is scored only on what it writes after the answer marker,
and the final (hidden) answer can be given its own weight ``c`` against the overt
reasoning (``1 - c``). The weights come from ``hcr_kernels.answer_loss_weights``
(vectorised over the batch; the final answer is each row's last *real* token, not the
padded last position) and the loss from ``hcr_kernels.weighted_cross_entropy``
(one pass over the logits on the native/Triton backends).

The direct task (no chain of thought) is scored on every hidden value with equal weight;
padding is never a target.
"""

from __future__ import annotations

import gc

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from hcr_kernels import answer_loss_weights, weighted_cross_entropy

from hcr.doublethink.data import IGNORE_INDEX, TaskBatch, TaskDataset, collate

__all__ = ["ReasoningTrainer", "direct_loss", "doublethink_loss", "make_training_arguments"]


def doublethink_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_token_id: int,
    answer_weight: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(1 - c) * mean CE(reasoning tokens) + c * mean CE(final answers)`` of a right-padded batch.

    ``logits`` ``[B, L, V]`` predict ``input_ids`` ``[B, L]`` shifted by one; see
    ``hcr_kernels.answer_loss_weights`` for the exact positions and normalisation.
    """
    weights = answer_loss_weights(input_ids, attention_mask, answer_token_id, answer_weight)
    vocab = logits.shape[-1]
    return weighted_cross_entropy(
        logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1), weights.reshape(-1), backend=backend
    )


def direct_loss(logits: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean CE over the labelled positions (``labels != -100``), logits and labels aligned (no shift)."""
    scored = labels != IGNORE_INDEX
    weights = scored.to(torch.float32) / scored.sum().clamp_min(1)
    vocab = logits.shape[-1]
    return weighted_cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), weights.reshape(-1), IGNORE_INDEX, backend=backend
    )


class ReasoningTrainer(Trainer):
    """Trains on batches from ``TaskDataset``: doublethink rows (no ``labels``) or direct rows (``labels``).

    ``answer_token_id``: the marker after which the doublethink loss starts;
    ``answer_weight``: the final answer's share ``c`` in ``[0, 1]``;
    ``loss_backend``: forwarded to ``weighted_cross_entropy`` (None: automatic).

    Rounds are short (by default one step of 64 examples between evaluations), so two
    per-call costs of ``Trainer.train`` matter: the printed metrics (the printer and
    progress callbacks are removed; the experiment has its own progress bar) and the
    ``gc.collect()`` that ``accelerate`` runs at the end of every ``train()``, which walks
    every object of the process: about 250 ms here, ten times a tiny model's step.
    ``freeze_gc=True`` calls ``gc.freeze()`` once, so the objects alive at construction
    (modules, the model) are left out of those collections. It changes the whole
    process (frozen objects are never collected), so it is off by default and the
    experiment runner, which owns its process, turns it on.
    """

    def __init__(
        self,
        *args,
        answer_token_id: int,
        answer_weight: float = 0.5,
        loss_backend: str | None = None,
        freeze_gc: bool = False,
        **kwargs,
    ):
        if not 0.0 <= answer_weight <= 1.0:
            raise ValueError(f"answer_weight must be in [0, 1], got {answer_weight}")
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.answer_token_id = int(answer_token_id)
        self.answer_weight = float(answer_weight)
        self.loss_backend = loss_backend
        if freeze_gc:
            gc.freeze()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        if labels is None:
            loss = doublethink_loss(
                outputs.logits, inputs["input_ids"], inputs["attention_mask"], self.answer_token_id,
                self.answer_weight, backend=self.loss_backend,
            )
        else:
            loss = direct_loss(outputs.logits, labels, backend=self.loss_backend)
        return (loss, outputs) if return_outputs else loss

    def train_round(self, batch: TaskBatch) -> float:
        """One pass over ``batch`` (one optimizer step per ``per_device_train_batch_size`` rows); mean loss.

        The optimizer (and its Adam moments) persists across rounds: it is created by the
        first call and reused by the next ones, rather than re-created every round.
        """
        self.train_dataset = TaskDataset(batch)
        return float(self.train().training_loss)


def make_training_arguments(
    output_dir: str,
    *,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    use_cpu: bool | None = None,
) -> TrainingArguments:
    """Arguments for one-epoch rounds at a constant learning rate, no checkpoints, no hub, no logging integrations."""
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="constant",
        num_train_epochs=1,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        disable_tqdm=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
