"""The ``hcr`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hcr_kernels

from hcr.compression.command import add_arguments as add_train_compressor_arguments
from hcr.demo.command import add_arguments as add_demo_arguments
from hcr.doublethink.command import add_arguments as add_doublethink_arguments
from hcr.evaluation.command import add_arguments as add_eval_arguments
from hcr_kernels.info import main as info_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcr", description="Hidden capacity reasoning: kernels and experiments.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="environment report: what was built, which backend each op uses")
    info.add_argument("--bench", action="store_true", help="also time the fused pool-scatter op per backend")

    demo = commands.add_parser("demo", help="a whole hidden-capacity experiment, offline: train a tiny reasoner, "
                                             "compress its reasoning at several windows, measure")
    add_demo_arguments(demo)

    doublethink = commands.add_parser("doublethink", help="train a small Mamba / GPT-2 on the doublethink tasks")
    add_doublethink_arguments(doublethink)

    train_compressor = commands.add_parser("train-compressor", help="train an embed pooler (LoRA) on reasoning traces")
    add_train_compressor_arguments(train_compressor)

    evaluate = commands.add_parser("eval", help="accuracy, output length and peak cache of a model on a question set")
    add_eval_arguments(evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command (``argv``: the arguments after ``hcr``; default the process's)."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return info_main(["--bench"] if args.bench else [])
    if args.command == "doublethink":
        from hcr.doublethink.command import main as doublethink_main

        return doublethink_main(args)
    if args.command == "train-compressor":
        from hcr.compression.command import main as train_compressor_main

        return train_compressor_main(args)
    if args.command == "eval":
        from hcr.evaluation.command import main as eval_main

        return eval_main(args)
    from hcr.demo.command import main as demo_main

    return demo_main(args, argv)


def command_line(argv: list[str] | None = None) -> int:
    """The ``hcr`` console script: ``main``, with an error hcr raised itself about its input (a bad file, option
    or folder: a ValueError, TypeError or missing file whose message names what is wrong) printed as one line,
    exit status 1. Anything raised elsewhere (torch, transformers, a bug) keeps its traceback."""
    try:
        return main(argv)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as error:
        if not _raised_by_hcr(error):
            raise
        print(f"hcr: error: {error}", file=sys.stderr)
        return 1


def _raised_by_hcr(error: BaseException) -> bool:
    """Whether ``error`` was raised in the code of ``hcr`` or ``hcr_kernels`` (its innermost frame)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    where = Path(frame.tb_frame.f_code.co_filename).resolve()
    return any(where.is_relative_to(root) for root in _PACKAGE_ROOTS)


_PACKAGE_ROOTS = (Path(__file__).resolve().parent, Path(hcr_kernels.__file__).resolve().parent)


if __name__ == "__main__":
    raise SystemExit(command_line())
