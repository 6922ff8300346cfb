"""One doublethink experiment: curriculum rounds of training and evaluation, logged and reported.

The loop: each round samples ``batch_size * steps_per_round`` task lengths from the
curriculum, trains on fresh tasks of those lengths, evaluates every length up to the
limit on fresh tasks, and moves the limit. The run stops when the curriculum solves
``max_length`` or after ``max_examples`` training examples. Training and evaluation
tasks come from two generators seeded from ``seed``, so a run is reproducible from its
config (saved in ``report.json``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hcr.doublethink.config import DEFAULT_ANSWER_WEIGHT, DoublethinkConfig
from hcr.doublethink.curriculum import Curriculum
from hcr.doublethink.data import encode_tasks
from hcr.doublethink.evaluation import accuracy_bar, evaluate_lengths
from hcr.doublethink.models import build_model
from hcr.doublethink.report import RoundRecord, RunReport, WandbLogger
from hcr.doublethink.tasks import TaskGenerator
from hcr.doublethink.tokenizer import answer_marker_id, load_tokenizer
from hcr.doublethink.trainer import ReasoningTrainer, make_training_arguments
from hcr.files import atomic_directory

__all__ = ["DEFAULT_ANSWER_WEIGHT", "DoublethinkConfig", "run_experiment"]

EVAL_SEED_OFFSET = 1_000_003  # evaluation tasks: a different stream than the training tasks


def run_experiment(config: DoublethinkConfig, *, progress: bool = True) -> RunReport:
    """Train and evaluate under the curriculum; write the report into ``config.out``; return it."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.tokenizer)
    model = build_model(
        config.arch, config.layers, len(tokenizer), pretrained=config.pretrained, hidden=config.hidden,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, device=device, hcr_kernels=config.hcr_kernels,
    )
    trainer = ReasoningTrainer(
        model=model,
        args=make_training_arguments(
            str(out / "trainer"), batch_size=config.batch_size, learning_rate=config.learning_rate,
            seed=config.seed, use_cpu=device == "cpu",
        ),
        answer_token_id=answer_marker_id(tokenizer),
        answer_weight=config.answer_weight if config.answer_weight is not None else 0.0,
        freeze_gc=True,  # this runner owns the process: see ReasoningTrainer
    )
    curriculum = Curriculum(
        flatten_factor=config.flatten_factor, history=config.history, solved_threshold=config.solved_threshold,
        max_length=config.max_length, seed=config.seed,
    )
    train_tasks, eval_tasks = TaskGenerator(config.seed), TaskGenerator(config.seed + EVAL_SEED_OFFSET)
    report = RunReport(config={**asdict(config), "device": device, "parameters": sum(p.numel() for p in model.parameters())})
    logger = WandbLogger(config.report_to, report.config, out, config.run_name)
    bar = tqdm(total=config.max_examples, unit="ex", desc=config.run_name, disable=not progress, dynamic_ncols=True)
    start = last_save = time.perf_counter()
    examples = 0
    try:
        while examples < config.max_examples and not curriculum.finished:
            limit = curriculum.limit
            lengths = curriculum.sample(config.batch_size * config.steps_per_round)
            loss = trainer.train_round(encode_tasks(tokenizer, train_tasks.tasks(lengths), config.task))
            examples += len(lengths)
            accuracies = evaluate_lengths(model, tokenizer, config.task, limit, config.eval_per_length, eval_tasks)
            next_limit = curriculum.update(accuracies)
            record = RoundRecord(
                round=len(report.rounds) + 1, examples=examples, seconds=round(time.perf_counter() - start, 3),
                train_loss=loss, limit=limit, mean_task_length=float(np.mean(lengths)),
                accuracies=[float(a) for a in accuracies], bar=accuracy_bar(accuracies),
                longest_solved=curriculum.longest_solved, next_limit=next_limit,
            )
            report.add(record)
            logger.log(record)
            bar.update(len(lengths))
            bar.set_postfix(limit=limit, loss=f"{loss:.3f}")
            if progress:
                bar.write(f"{examples:9}  loss {loss:6.3f}  seq.len.: {limit:3}  {record.bar}")
            if time.perf_counter() - last_save > config.save_every_s:
                report.write(out)
                last_save = time.perf_counter()
    finally:
        bar.close()
        seconds = time.perf_counter() - start
        report.summary = {
            "rounds": len(report.rounds), "examples": examples, "seconds": round(seconds, 2),
            "examples_per_second": round(examples / seconds, 1) if seconds > 0 else None,
            "longest_solved": curriculum.longest_solved, "final_limit": curriculum.limit,
            "finished": curriculum.finished,
        }
        report.write(out)
        logger.finish()
        with contextlib.suppress(OSError):  # the Trainer's working folder, made at its start: gone if left empty
            (out / "trainer").rmdir()
    if config.save_model:
        with atomic_directory(out / "model") as folder:  # a kill mid-save never leaves a half model that loads
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    return report
