"""Doublethink training throughput: examples/s of one training round on CPU.

One round is what the experiment runs between evaluations: ``ReasoningTrainer.train_round``
on 64 fresh doublethink tasks (one AdamW step, the answer-weighted loss through
``hcr_kernels``). Tiny models as the CLI builds them (2 layers, hidden 64); task
lengths uniform in 1..10, a mid-curriculum batch. One torch thread, as the CLI's
default (see ``hcr doublethink --threads``). The run's summary prints examples/s of the
median round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcr.doublethink.data import encode_tasks
from hcr.doublethink.models import build_model
from hcr.doublethink.tasks import TaskGenerator
from hcr.doublethink.tokenizer import answer_marker_id, build_tokenizer
from hcr.doublethink.trainer import ReasoningTrainer, make_training_arguments

BATCH = 64
ROUNDS = 10



@pytest.mark.parametrize(
    "arch, hcr_kernels, name",
    [("mamba", True, "mamba"), ("mamba", False, "mamba-transformers"), ("transformer", True, "gpt2")],
    ids=["mamba", "mamba-transformers", "gpt2"],
)
def test_training_round(benchmark, arch, hcr_kernels, name, tmp_path, one_thread):
    """``mamba-transformers``: the same Mamba on transformers' own CPU path, for comparison."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(
        arch, 2, len(tokenizer), pad_token_id=tokenizer.pad_token_id, device="cpu", hcr_kernels=hcr_kernels
    )
    trainer = ReasoningTrainer(
        model=model, args=make_training_arguments(str(tmp_path), batch_size=BATCH, use_cpu=True),
        answer_token_id=answer_marker_id(tokenizer), answer_weight=0.5, freeze_gc=True,  # as the experiment runs it
    )
    lengths = np.random.default_rng(0).integers(1, 11, size=BATCH)
    batch = encode_tasks(tokenizer, TaskGenerator(0).tasks(lengths), "doublethink")
    benchmark.group = "doublethink training round, batch 64, CPU"
    benchmark.extra_info.update(backend=name, threads=one_thread, batch=BATCH, count=BATCH, unit="examples")
    benchmark.pedantic(trainer.train_round, args=(batch,), rounds=ROUNDS, warmup_rounds=2)
