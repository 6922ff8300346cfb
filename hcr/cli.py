"""The ``hcr`` command line."""

from __future__ import annotations

import argparse

from hcr.compression.command import add_arguments as add_train_compressor_arguments
from hcr.doublethink.command import add_arguments as add_doublethink_arguments
from hcr_kernels.info import main as info_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcr", description="Hidden capacity reasoning: kernels and experiments.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="environment report: what was built, which backend each op uses")

    demo = commands.add_parser("demo", help="environment report plus a short pool-scatter benchmark")
    demo.add_argument("--batch", type=int, default=8, help="sequences in the batch (default 8)")
    demo.add_argument("--length", type=int, default=1024, help="tokens per sequence (default 1024)")
    demo.add_argument("--dim", type=int, default=1536, help="hidden size (default 1536, R1-Distill-Qwen-1.5B)")
    demo.add_argument("--window", type=int, default=2, help="tokens per compressed window (default 2)")
    demo.add_argument("--repeats", type=int, default=5, help="timed repeats per backend (default 5)")

    doublethink = commands.add_parser("doublethink", help="train a small Mamba / GPT-2 on the doublethink tasks")
    add_doublethink_arguments(doublethink)

    train_compressor = commands.add_parser("train-compressor", help="train an embed pooler (LoRA) on reasoning traces")
    add_train_compressor_arguments(train_compressor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return info_main([])
    if args.command == "doublethink":
        from hcr.doublethink.command import main as doublethink_main

        return doublethink_main(args)
    if args.command == "train-compressor":
        from hcr.compression.command import main as train_compressor_main

        return train_compressor_main(args)
    from hcr.demo import main as demo_main

    return demo_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
