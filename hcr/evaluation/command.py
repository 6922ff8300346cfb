"""``hcr eval``: the flags and the entry point (heavy imports only when it runs)."""

from __future__ import annotations

import argparse

from hcr.argtypes import field_defaults, non_negative_int, positive_float, positive_int, probability

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hcr.evaluation.runner import EvalSettings

    d = field_defaults(EvalSettings)
    parser.add_argument("--dataset", required=True,
                        help="questions and gold answers: a .jsonl file or a folder saved with save_to_disk")
    parser.add_argument("--question-field", default=d.question_field,
                        help=f"field of the question (default {d.question_field})")
    parser.add_argument("--answer-field", default=d.answer_field,
                        help="field of the gold answer: plain, or an R1 output whose last \\boxed{} is taken")
    parser.add_argument("--split", default=d.split, help="split of a saved DatasetDict (default: test, or the only one)")
    parser.add_argument("--base", required=True, help="base causal LM: a local path or a hub name")
    parser.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer path or name (default: the base's)")
    parser.add_argument("--compressor", default=d.compressor,
                        help="a CompressionModel.save_pretrained folder: generate compressing the reasoning")
    parser.add_argument("--no-merge", action="store_true",
                        help="generate with the compressor's LoRA adapter as trained, instead of folded into the "
                             "pooler's weights (the default: equal up to rounding, faster)")
    parser.add_argument("--window", type=positive_int, default=d.window,
                        help="tokens per compressed vector (default: the compressor's)")
    parser.add_argument("--keep-last", type=non_negative_int, default=d.keep_last,
                        help=f"reasoning tokens kept uncompressed after the last window (default {d.keep_last})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                        help=f"default {d.max_new_tokens}")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                        help=f"items generated together (default {d.batch_size})")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=d.temperature,
                        help=f"with --do-sample (default {d.temperature})")
    parser.add_argument("--top-k", type=positive_int, default=d.top_k, help="with --do-sample")
    parser.add_argument("--top-p", type=probability, default=d.top_p, help="with --do-sample")
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed (per batch: seed + its first index)")
    parser.add_argument("--limit", type=positive_int, default=d.limit, help="evaluate the first N items only")
    parser.add_argument("--out", required=True,
                        help="folder for results.jsonl (one record per item; a rerun skips those done) "
                             "and summary.json")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's; tiny models on a busy CPU run fastest with 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch

    from hcr.evaluation.runner import EvalSettings, evaluate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        base=args.base, dataset=args.dataset, out=args.out, tokenizer=args.tokenizer, compressor=args.compressor,
        merge_adapter=not args.no_merge,
        question_field=args.question_field, answer_field=args.answer_field, split=args.split, window=args.window,
        keep_last=args.keep_last, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        limit=args.limit,
    )
    evaluate(settings, progress=not args.no_progress)
    return 0
