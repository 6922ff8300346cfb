"""``hcr doublethink``: the flags and the entry point.

Kept free of heavy imports (torch, transformers load only when the command runs), so
``hcr info`` and ``hcr --help`` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from hcr.argtypes import positive_float, positive_int, unit_float

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, choices=["mamba", "transformer"], help="Mamba or GPT-2")
    parser.add_argument("--layers", required=True, type=positive_int, help="number of layers (blocks)")
    parser.add_argument("--task", default="doublethink", choices=["doublethink", "direct"],
                        help="doublethink: write the overt chain, then the hidden result; direct: hidden values "
                             "aligned with the operations, no chain of thought (default doublethink)")
    parser.add_argument("--answer-weight", type=unit_float, default=None,
                        help="share c of the final answer in the loss, reasoning gets 1 - c (doublethink only; default 0.5)")
    parser.add_argument("--max-examples", type=positive_int, default=100_000,
                        help="training example budget (default 100000)")
    parser.add_argument("--max-length", type=positive_int, default=30,
                        help="stop once this task length is solved (default 30)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="examples per optimizer step (default 64)")
    parser.add_argument("--steps-per-round", type=positive_int, default=1,
                        help="optimizer steps between evaluations (default 1, as the seed)")
    parser.add_argument("--lr", dest="learning_rate", type=positive_float, default=1e-3,
                        help="AdamW learning rate, constant (default 1e-3)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden size of a from-scratch model (default 64)")
    parser.add_argument("--eval-per-length", type=positive_int, default=20,
                        help="evaluation tasks per length each round (default 20)")
    parser.add_argument("--solved-threshold", type=unit_float, default=0.9,
                        help="accuracy at which a length counts as solved (default 0.9)")
    parser.add_argument("--flatten-factor", type=unit_float, default=0.95,
                        help="f in the sampling probability 1 - f * recent accuracy (default 0.95)")
    parser.add_argument("--history", type=positive_int, default=20,
                        help="evaluations per length the recent accuracy averages (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the tasks and the curriculum (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default runs/doublethink-<arch>-l<layers>-<task>)")
    parser.add_argument("--report-to", default="wandb", choices=["none", "wandb"],
                        help="wandb logs offline unless WANDB_API_KEY is set (default wandb)")
    parser.add_argument("--pretrained", default=None,
                        help="local checkpoint folder to cut to --layers (e.g. mamba-130m, gpt2); default: a tiny model")
    parser.add_argument("--tokenizer", default=None,
                        help="local tokenizer folder (GPT-2, GPT-NeoX); default: the built-in word-level tokenizer")
    parser.add_argument("--no-hcr-kernels", dest="hcr_kernels", action="store_false",
                        help="run Mamba on CPU with transformers' own code instead of hcr_kernels")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (default 1: tiny models gain nothing from more, and lose a lot "
                             "on a shared machine)")
    parser.add_argument("--save-model", action="store_true", help="save the trained model and tokenizer under OUT/model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar nor per-round lines")


def main(args: argparse.Namespace) -> int:
    import torch

    from hcr.doublethink.experiment import DoublethinkConfig, run_experiment

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
