"""Training the embed pooler: LoRA through peft, the Hugging Face Trainer, the lazy examples.

``train_compressor`` is the Python entry point and ``hcr train-compressor`` its
command line. The Trainer brings multi-GPU (``accelerate launch`` / ``torchrun``),
checkpoints and resume, tqdm progress and ``report_to``; wandb runs offline unless
an API key is set, and never prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hcr.compression.collator import CompressionCollator
from hcr.compression.examples import CompressionExampleDataset, ExampleConfig
from hcr.compression.model import CompressionConfig, CompressionModel
from hcr.compression.pooler import EmbedPooler
from hcr.compression.tokens import CompressionTokens
from hcr.compression.traces import tokenize_dataset

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA of the pooler (the seed: r = 16 on every projection, embeddings trained too)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    embeddings: bool = True


@dataclass
class PoolerSettings:
    """Which pooler: its depth (None: the base's), own token table (V2) or not (V1), projection (V3)."""

    num_hidden_layers: int | None = None
    own_embeddings: bool = True
    projection: bool = False
    from_base_weights: bool = True


def add_lora(pooler: EmbedPooler, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules)
    if settings.embeddings and pooler.get_input_embeddings() is not None:
        targets.append("embed_tokens")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    return get_peft_model(pooler, config)


def build_compression_model(base, tokenizer, window: int, *, pooler: PoolerSettings | None = None,
                            lora: LoraSettings | None = None, base_model_name_or_path: str | None = None):
    """A frozen ``base`` plus a new pooler (with LoRA unless ``lora`` is None) for ``window``."""
    pooler = pooler or PoolerSettings()
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    embed_pooler = EmbedPooler.from_base(base, num_hidden_layers=pooler.num_hidden_layers,
                                         own_embeddings=pooler.own_embeddings, projection=pooler.projection,
                                         copy_weights=pooler.from_base_weights)
    if lora is not None:
        embed_pooler = add_lora(embed_pooler, lora)
    name = base_model_name_or_path or getattr(base, "name_or_path", None) or None
    return CompressionModel(CompressionConfig.for_tokens(tokens, window, name), base, embed_pooler)


@dataclass
class TrainSettings:
    """The usual Trainer arguments, with this task's defaults."""

    output_dir: str = "compressor"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    report_to: str = "wandb"
    gradient_checkpointing: bool = False
    seed: int = 0
    resume_from_checkpoint: str | bool | None = None
    extra: dict = field(default_factory=dict)

    def training_arguments(self):
        from transformers import TrainingArguments

        on_gpu = torch.cuda.is_available()
        optional = dict(self.extra)
        if self.gradient_checkpointing:  # named so in transformers 4.x; 5.x also takes activation_checkpointing
            optional["gradient_checkpointing"] = True
        return TrainingArguments(
            output_dir=self.output_dir,
            max_steps=self.max_steps,
            num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            report_to=[] if self.report_to in ("none", "", None) else [self.report_to],
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            dataloader_pin_memory=on_gpu,
            seed=self.seed,
            remove_unused_columns=False,
            **optional,
        )


def load_traces(source, *, question_column: str = "question", answer_column: str = "answer"):
    """A ``datasets.Dataset`` from a local jsonl/json/Arrow path, a saved dataset folder, or a hub name."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    path = Path(str(source))
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.suffix in (".jsonl", ".json"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    if path.exists():
        raise ValueError(f"dataset {source!r}: expected a .jsonl/.json/.arrow file or a saved dataset folder")
    return datasets.load_dataset(str(source), split="train")


def _quiet_wandb() -> None:
    """wandb offline when there is no API key, and never an interactive prompt."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def train_compressor(model: CompressionModel, tokenizer, traces, *, examples: ExampleConfig | None = None,
                     settings: TrainSettings | None = None, question_column: str = "question",
                     answer_column: str = "answer", num_proc: int | None = None):
    """Train ``model``'s pooler on the compression stages of ``traces``; returns the Trainer.

    ``examples`` defaults to the model's window, every stage, reasoning only.
    """
    from transformers import Trainer

    settings = settings or TrainSettings()
    examples = examples or ExampleConfig(window=model.config.window)
    if examples.window != model.config.window:
        raise ValueError(f"examples.window={examples.window} but the model compresses windows of {model.config.window}")
    if settings.report_to == "wandb":
        _quiet_wandb()
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    tokenized, skipped = tokenize_dataset(load_traces(traces, question_column=question_column,
                                                      answer_column=answer_column),
                                          tokenizer, question_column=question_column, answer_column=answer_column,
                                          num_proc=num_proc)
    dataset = CompressionExampleDataset(tokenized, tokens, examples)
    if len(dataset) == 0:
        raise ValueError(f"no training examples: {len(tokenized)} traces (skipped {skipped} without </think>), "
                         f"none with a reasoning of at least one window of {examples.window} tokens")
    print(f"hcr: {len(dataset)} examples from {len(tokenized)} traces "
          f"({skipped} skipped without </think>, {dataset.skipped_traces} shorter than one window)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokens.eos
    trainer = Trainer(
        model=model,
        args=settings.training_arguments(),
        train_dataset=dataset,
        data_collator=CompressionCollator(tokens, examples.window, pad_id),
    )
    trainer.train(resume_from_checkpoint=settings.resume_from_checkpoint)
    trainer.save_model(settings.output_dir)
    return trainer
