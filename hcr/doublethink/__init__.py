"""Doublethink experiments: can a small model compute a hidden result while writing another chain of thought?

Modules: ``tasks`` (operations, values, texts), ``tokenizer`` (built-in word-level
tokenizer, the one-token-per-word check), ``data`` (tensors), ``curriculum``,
``trainer`` (``ReasoningTrainer`` and its losses), ``evaluation``, ``models``,
``report``, ``config`` (``DoublethinkConfig``), ``experiment`` (``run_experiment``),
``command`` (``hcr doublethink``).
Names are imported lazily so that ``hcr --help`` does not load transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Task": "tasks", "TaskGenerator": "tasks", "OPERATIONS": "tasks",
    "build_tokenizer": "tokenizer", "check_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "encode_tasks": "data", "TaskBatch": "data",
    "Curriculum": "curriculum",
    "ReasoningTrainer": "trainer", "doublethink_loss": "trainer", "direct_loss": "trainer",
    "accuracy_bar": "evaluation", "evaluate_lengths": "evaluation",
    "build_model": "models", "cut_layers": "models", "load_pretrained_cut": "models",
    "RunReport": "report",
    "DoublethinkConfig": "config", "run_experiment": "experiment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hcr.doublethink' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hcr.doublethink.{_EXPORTS[name]}"), name)
