"""``hcr train-compressor``: the flags and the entry point (heavy imports only when it runs).

Data-parallel: ``torchrun --nproc_per_node N $(which hcr) train-compressor ...`` (or
``accelerate launch --num_processes N``); DDP over NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse

from hcr.argtypes import argument_type, field_defaults, non_negative_int, positive_float, positive_int, unit_float
from hcr.compression.settings import STEPS_OR_EPOCHS

__all__ = ["add_arguments", "main"]

# Trainer's max_steps: -1 lets --epochs decide; 0 and other negatives are not a length.
steps_or_epochs = argument_type(int, *STEPS_OR_EPOCHS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hcr.compression.examples import ExampleConfig
    from hcr.compression.settings import LoraSettings, PoolerSettings, TrainSettings

    examples, pooler = field_defaults(ExampleConfig), field_defaults(PoolerSettings)
    lora, train = field_defaults(LoraSettings), field_defaults(TrainSettings)
    parser.add_argument("--base", required=True,
                        help="base causal LM: a local path or a hub name (DeepSeek-R1-Distill-Qwen style)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: the base's)")
    parser.add_argument("--dataset", required=True,
                        help="traces: a .jsonl/.json/.arrow file, a saved dataset folder, or a hub name")
    parser.add_argument("--question-column", default="question", help="column of the questions (default %(default)s)")
    parser.add_argument("--answer-column", default="answer",
                        help="column of the answers with <think>...</think> (default %(default)s)")
    parser.add_argument("--output-dir", required=True, help="checkpoints, then the trained pooler and adapter")
    parser.add_argument("--window", type=positive_int, default=10,
                        help="tokens per compressed vector (default %(default)s)")
    parser.add_argument("--every-nth", type=positive_int, default=examples.every_nth,
                        help="keep stages 1, 1+n, 1+2n, ... of each trace (default %(default)s)")
    parser.add_argument("--compress-answer", action="store_true", help="continue compressing into the answer")
    parser.add_argument("--pooler-layers", type=positive_int, default=pooler.num_hidden_layers,
                        help="pooler depth (default: the base's)")
    parser.add_argument("--no-own-embeddings", action="store_true",
                        help="pool the base's embeddings instead of the pooler's own table")
    parser.add_argument("--projection", action="store_true",
                        help="extra hidden x hidden projection after the pooler's layers")
    parser.add_argument("--random-init", action="store_true", help="do not copy the base's weights into the pooler")
    parser.add_argument("--lora-r", type=non_negative_int, default=lora.r,
                        help="LoRA rank (0: train the pooler fully; default %(default)s)")
    parser.add_argument("--lora-alpha", type=positive_int, default=lora.alpha, help="LoRA alpha (default %(default)s)")
    parser.add_argument("--lora-dropout", type=unit_float, default=lora.dropout,
                        help="LoRA dropout (default %(default)s)")
    parser.add_argument("--max-steps", type=steps_or_epochs, default=train.max_steps,
                        help="optimizer steps; -1: as many as --epochs take (default %(default)s)")
    parser.add_argument("--epochs", type=positive_float, default=train.num_train_epochs,
                        help="passes over the examples, when --max-steps is -1 (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=train.per_device_train_batch_size,
                        help="examples per device and forward pass (default %(default)s)")
    parser.add_argument("--grad-accum", type=positive_int, default=train.gradient_accumulation_steps,
                        help="forward passes per optimizer step (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=train.learning_rate,
                        help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--save-steps", type=positive_int, default=train.save_steps,
                        help="optimizer steps between checkpoints (default %(default)s)")
    parser.add_argument("--logging-steps", type=positive_int, default=train.logging_steps,
                        help="optimizer steps between logged losses (default %(default)s)")
    parser.add_argument("--report-to", default=train.report_to,
                        help="wandb (offline without an API key) or none (default %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, more time")
    parser.add_argument("--resume", nargs="?", const=True, default=train.resume_from_checkpoint,
                        help="resume from the last checkpoint in --output-dir, or from the given one")
    parser.add_argument("--num-proc", type=positive_int, default=None, help="processes for tokenizing the traces")
    parser.add_argument("--seed", type=int, default=train.seed,
                        help="seed of the data order and the pooler's random parts (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, set_seed

    from hcr.compression.examples import ExampleConfig
    from hcr.compression.tokens import load_tokenizer
    from hcr.compression.train import LoraSettings, PoolerSettings, TrainSettings, build_compression_model, train_compressor

    tokenizer = load_tokenizer(args.base, args.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(args.base)
    set_seed(args.seed)  # the pooler's random parts (LoRA, --random-init) come from --seed too
    model = build_compression_model(
        base, tokenizer, args.window,
        pooler=PoolerSettings(args.pooler_layers, not args.no_own_embeddings, args.projection, not args.random_init),
        lora=LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora_r else None,
        base_model_name_or_path=args.base,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = ExampleConfig(window=args.window, compress_answer=args.compress_answer, every_nth=args.every_nth,
                             pad_id=pad_id)
    settings = TrainSettings(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, save_steps=args.save_steps, logging_steps=args.logging_steps,
        report_to=args.report_to, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        resume_from_checkpoint=args.resume,
    )
    trainer = train_compressor(model, tokenizer, args.dataset, examples=examples, settings=settings,
                               question_column=args.question_column, answer_column=args.answer_column,
                               num_proc=args.num_proc)
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch only the first process writes
        print(f"hcr: pooler and adapter saved to {args.output_dir}")
    return 0
