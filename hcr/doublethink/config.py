"""What a doublethink run depends on: ``DoublethinkConfig`` and the values its fields may take.

A module of its own, free of transformers, so that ``hcr doublethink``'s flags take their
defaults and choices from here without slowing down ``hcr --help``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hcr.argtypes import FLAG, POSITIVE_INT, POSITIVE_NUMBER, UNIT_NUMBER, check_fields, optional
from hcr.doublethink.tasks import TASK_KINDS

__all__ = ["ARCHITECTURES", "DEFAULT_ANSWER_WEIGHT", "REPORT_TARGETS", "DoublethinkConfig"]

ARCHITECTURES = ("mamba", "transformer")
DEFAULT_ANSWER_WEIGHT = 0.5
REPORT_TARGETS = ("none", "wandb")


@dataclass
class DoublethinkConfig:
    """Everything a run depends on; the CLI flags map one to one (``--max-examples`` -> ``max_examples``)."""

    arch: str = "mamba"
    layers: int = 2
    task: str = "doublethink"
    answer_weight: float | None = None  # doublethink only; None -> DEFAULT_ANSWER_WEIGHT
    max_examples: int = 100_000
    max_length: int = 30
    batch_size: int = 64
    steps_per_round: int = 1
    learning_rate: float = 1e-3
    hidden: int = 64
    eval_per_length: int = 20
    solved_threshold: float = 0.9
    flatten_factor: float = 0.95
    history: int = 20
    seed: int = 0
    out: str | None = None  # None -> runs/doublethink-<arch>-l<layers>-<task>
    report_to: str = "wandb"
    pretrained: str | None = None
    tokenizer: str | None = None  # None -> the built-in word-level tokenizer
    hcr_kernels: bool = True
    device: str | None = None  # None -> cuda if available, else cpu
    save_model: bool = False
    save_every_s: float = 30.0

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.task not in TASK_KINDS:
            raise ValueError(f"task must be one of {TASK_KINDS}, got {self.task!r}")
        if self.task == "direct" and self.answer_weight is not None:
            raise ValueError("answer_weight (--answer-weight) applies to --task doublethink only; the direct task "
                             "weighs every hidden value equally")
        if self.task == "doublethink" and self.answer_weight is None:
            self.answer_weight = DEFAULT_ANSWER_WEIGHT
        check_fields(self, answer_weight=optional(UNIT_NUMBER), layers=POSITIVE_INT, max_examples=POSITIVE_INT,
                     max_length=POSITIVE_INT, batch_size=POSITIVE_INT, steps_per_round=POSITIVE_INT,
                     learning_rate=POSITIVE_NUMBER, hidden=POSITIVE_INT, eval_per_length=POSITIVE_INT,
                     solved_threshold=UNIT_NUMBER, flatten_factor=UNIT_NUMBER, history=POSITIVE_INT, hcr_kernels=FLAG,
                     save_model=FLAG,
                     save_every_s=(lambda v: POSITIVE_NUMBER[0](v) or v == 0, "a number >= 0"))
        if self.report_to not in REPORT_TARGETS:
            raise ValueError(f"report_to (--report-to) must be 'none' or 'wandb', got {self.report_to!r}")
        if self.out is None:
            self.out = f"runs/doublethink-{self.arch}-l{self.layers}-{self.task}"

    @property
    def run_name(self) -> str:
        weight = f"-c{self.answer_weight}" if self.task == "doublethink" else ""
        return f"{self.arch}-l{self.layers}-{self.task}{weight}-s{self.seed}"
