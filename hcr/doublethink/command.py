"""``hcr doublethink``: the flags and the entry point.

Kept free of heavy imports (torch, transformers load only when the command runs), so
``hcr info`` and ``hcr --help`` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from hcr.argtypes import field_defaults, positive_float, positive_int, unit_float
from hcr.doublethink.config import ARCHITECTURES, DEFAULT_ANSWER_WEIGHT, REPORT_TARGETS, DoublethinkConfig
from hcr.doublethink.tasks import TASK_KINDS

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = field_defaults(DoublethinkConfig)
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES, help="Mamba or GPT-2")
    parser.add_argument("--layers", required=True, type=positive_int, help="number of layers (blocks)")
    parser.add_argument("--task", default=d.task, choices=TASK_KINDS,
                        help="doublethink: write the overt chain, then the hidden result; direct: hidden values "
                             f"aligned with the operations, no chain of thought (default {d.task})")
    parser.add_argument("--answer-weight", type=unit_float, default=d.answer_weight,
                        help="share c of the final answer in the loss, reasoning gets 1 - c (doublethink only; "
                             f"default {DEFAULT_ANSWER_WEIGHT})")
    parser.add_argument("--max-examples", type=positive_int, default=d.max_examples,
                        help=f"training example budget (default {d.max_examples})")
    parser.add_argument("--max-length", type=positive_int, default=d.max_length,
                        help=f"stop once this task length is solved (default {d.max_length})")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                        help=f"examples per optimizer step (default {d.batch_size})")
    parser.add_argument("--steps-per-round", type=positive_int, default=d.steps_per_round,
                        help=f"optimizer steps between evaluations (default {d.steps_per_round})")
    parser.add_argument("--lr", dest="learning_rate", type=positive_float, default=d.learning_rate,
                        help=f"AdamW learning rate, constant (default {d.learning_rate:g})")
    parser.add_argument("--hidden", type=positive_int, default=d.hidden,
                        help=f"hidden size of a from-scratch model (default {d.hidden})")
    parser.add_argument("--eval-per-length", type=positive_int, default=d.eval_per_length,
                        help=f"evaluation tasks per length each round (default {d.eval_per_length})")
    parser.add_argument("--solved-threshold", type=unit_float, default=d.solved_threshold,
                        help=f"accuracy at which a length counts as solved (default {d.solved_threshold})")
    parser.add_argument("--flatten-factor", type=unit_float, default=d.flatten_factor,
                        help=f"f in the sampling probability 1 - f * recent accuracy (default {d.flatten_factor})")
    parser.add_argument("--history", type=positive_int, default=d.history,
                        help=f"evaluations per length the recent accuracy averages (default {d.history})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"seed of the model, the tasks and the curriculum (default {d.seed})")
    parser.add_argument("--out", default=d.out, help="output folder (default runs/doublethink-<arch>-l<layers>-<task>)")
    parser.add_argument("--report-to", default=d.report_to, choices=REPORT_TARGETS,
                        help=f"wandb logs offline unless WANDB_API_KEY is set (default {d.report_to})")
    parser.add_argument("--pretrained", default=d.pretrained,
                        help="local checkpoint folder to cut to --layers (e.g. mamba-130m, gpt2); default: a tiny model")
    parser.add_argument("--tokenizer", default=d.tokenizer,
                        help="local tokenizer folder (GPT-2, GPT-NeoX); default: the built-in word-level tokenizer")
    parser.add_argument("--no-hcr-kernels", dest="hcr_kernels", action="store_false",
                        help="run Mamba on CPU with transformers' own code instead of hcr_kernels")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (default 1: tiny models gain nothing from more, and lose a lot "
                             "on a shared machine)")
    parser.add_argument("--save-model", action="store_true", help="save the trained model and tokenizer under OUT/model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar nor per-round lines")


def main(args: argparse.Namespace) -> int:
    import torch

    from hcr.doublethink.experiment import run_experiment

    options = {k: v for k, v in vars(args).items() if k not in ("command", "threads", "quiet")}
    try:
        config = DoublethinkConfig(**options)
    except ValueError as error:
        print(f"hcr doublethink: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    report = run_experiment(config, progress=not args.quiet)
    summary = report.summary
    print(
        f"doublethink {config.run_name}: {summary['examples']} examples in {summary['seconds']} s "
        f"({summary['examples_per_second']} ex/s), longest solved length {summary['longest_solved']}, "
        f"report in {config.out}"
    )
    return 0
