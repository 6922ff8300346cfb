"""Evaluating reasoning models, with and without compression: answers, the ``hcr eval`` runner.

``extract_answer`` / ``answers_match`` are light (no transformers); the runner's
names (``evaluate``, ``EvalSettings``, ``load_items``) load on first use. Prompts are
``hcr.generation.prompts``' (``prompt_ids``, ``left_pad``).
"""

import importlib

from hcr.evaluation.answers import RULES, answers_match, extract_answer, extract_answer_with_rule, normalize_answer

_LAZY = {
    "EvalSettings": "hcr.evaluation.runner",
    "evaluate": "hcr.evaluation.runner",
    "EvalItem": "hcr.evaluation.data",
    "gold_answer": "hcr.evaluation.data",
    "load_items": "hcr.evaluation.data",
}

__all__ = sorted(["RULES", "answers_match", "extract_answer", "extract_answer_with_rule", "normalize_answer",
                  *_LAZY])


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hcr.evaluation' has no attribute {name!r}")
