"""Training the embed pooler: LoRA through peft, the Hugging Face Trainer, the lazy examples.

``train_compressor`` is the Python entry point and ``hcr train-compressor`` its
command line. The Trainer brings data-parallel training (``torchrun`` / ``accelerate
launch``: DDP over NCCL on GPUs, over gloo on CPUs), checkpoints and resume, tqdm
progress and ``report_to``; wandb runs offline unless an API key is set, and never
prompts. Under a launcher only the first process prints and writes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hcr.compression.collator import CompressionCollator
from hcr.compression.examples import CompressionExampleDataset, ExampleConfig
from hcr.compression.model import POOLER_DIR, CompressionConfig, CompressionModel
from hcr.compression.pooler import EmbedPooler, quiet_peft_wrapping
from hcr.compression.settings import LoraSettings, PoolerSettings, TrainSettings
from hcr.compression.tokens import CompressionTokens
from hcr.compression.traces import format_skips, tokenize_dataset
from hcr.files import read_jsonl, require_fields


def add_lora(pooler: EmbedPooler, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules)
    if settings.embeddings and pooler.get_input_embeddings() is not None:
        targets.append("embed_tokens")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    with quiet_peft_wrapping():
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


def check_jsonl_traces(path, columns) -> None:
    """Every line of a jsonl file is a JSON object with text in ``columns``, or a ValueError naming
    the file, the line and the column: pyarrow's reader reports neither, and fills a missing value
    with null."""
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        require_fields(row, columns, where, " (choose others with --question-column / --answer-column)")
        for column in columns:
            if not isinstance(row[column], str):
                raise ValueError(f"{where}: {column!r} holds a {type(row[column]).__name__}, not text")


def load_traces(source, *, question_column: str = "question", answer_column: str = "answer"):
    """A ``datasets.Dataset`` from a local jsonl/json/Arrow path, a saved dataset folder, or a hub name.

    A ``.jsonl`` file is checked line by line first (``check_jsonl_traces``); a ``.json`` file that
    ``datasets`` cannot read is a ValueError naming it (rows of any source are checked for text, by
    row and column, when they are tokenized).
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    path = Path(str(source))
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.suffix in (".jsonl", ".json"):
        if path.suffix == ".jsonl" and path.is_file():
            check_jsonl_traces(path, (question_column, answer_column))
        try:
            return datasets.load_dataset("json", data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:  # pyarrow's message names neither file nor line
            cause = error.__cause__ or error
            raise ValueError(f"{path}: not JSON rows that datasets can read (one object per line, or a list of "
                             f"objects): {type(cause).__name__}: {cause}") from error
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    if path.exists():
        raise ValueError(f"dataset {source!r}: expected a .jsonl/.json/.arrow file or a saved dataset folder")
    return datasets.load_dataset(str(source), split="train")


def resume_checkpoint(output_dir, resume: str | bool | None) -> str | None:
    """The checkpoint to resume from: ``resume`` itself when it is a path, the newest complete one in
    ``output_dir`` when it is True, None when it is None or False.

    Complete means its ``trainer_state.json`` exists and holds a whole JSON object: the Trainer writes
    that file last (and in place, not atomically), so a run killed while saving leaves a newer, partial
    folder, which the Trainer's own choice (the highest number) would take and fail to load.
    """
    if not resume:
        return None
    if resume is not True:
        if not _complete_checkpoint(str(resume)):
            raise FileNotFoundError(f"cannot resume from {resume}: it has no complete {TRAINER_STATE_NAME} (not a "
                                    f"checkpoint, or one whose saving was interrupted)")
        return str(resume)
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            if match and _complete_checkpoint(os.path.join(output_dir, name)):
                steps.append(int(match.group(1)))
    if not steps:
        raise FileNotFoundError(f"cannot resume: {output_dir} holds no complete checkpoint "
                                f"({PREFIX_CHECKPOINT_DIR}-N with a {TRAINER_STATE_NAME})")
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}")


def _complete_checkpoint(folder: str) -> bool:
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as state:
            return isinstance(json.load(state), dict)
    except (OSError, ValueError):  # missing, unreadable, or cut short by a kill (empty, half an object)
        return False


def _quiet_wandb() -> None:
    """wandb offline when there is no API key, and never an interactive prompt."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


class CompressionTrainer(Trainer):
    """The Trainer, resuming from the compression model's own checkpoint layout.

    A checkpoint holds ``config.json``, ``pooler/`` and ``pooler_adapter/`` (no
    ``model.safetensors``), which the Trainer's own loader does not recognise.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if isinstance(model, CompressionModel) and os.path.isdir(os.path.join(resume_from_checkpoint, POOLER_DIR)):
            model.load_pooler_state(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def train_compressor(model: CompressionModel, tokenizer, traces, *, examples: ExampleConfig | None = None,
                     settings: TrainSettings | None = None, question_column: str = "question",
                     answer_column: str = "answer", num_proc: int | None = None):
    """Train ``model``'s pooler on the compression stages of ``traces``; returns the Trainer.

    ``examples`` defaults to the model's window, every stage, reasoning only. Under ``torchrun`` /
    ``accelerate launch`` every process calls this; the data is prepared by the first one first
    (the others then read the ``datasets`` cache), and only the first one prints and saves.
    """
    settings = settings or TrainSettings()
    examples = examples or ExampleConfig(window=model.config.window)
    if examples.window != model.config.window:
        raise ValueError(f"examples.window={examples.window} but the model compresses windows of {model.config.window}")
    if settings.report_to == "wandb":
        _quiet_wandb()
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    args = settings.training_arguments()
    with args.main_process_first(desc="tokenizing the traces"):
        tokenized, skipped = tokenize_dataset(load_traces(traces, question_column=question_column,
                                                          answer_column=answer_column),
                                              tokenizer, question_column=question_column,
                                              answer_column=answer_column, num_proc=num_proc)
    dataset = CompressionExampleDataset(tokenized, tokens, examples)
    if len(dataset) == 0:
        raise ValueError(f"no training examples: {len(tokenized)} traces ({format_skips(skipped)}), "
                         f"none with a reasoning of at least one window of {examples.window} tokens")
    if args.process_index == 0:
        print(f"hcr: {len(dataset)} examples from {len(tokenized)} traces "
              f"({format_skips(skipped)}; {dataset.skipped_traces} shorter than one window)"
              + (f", {args.world_size} data-parallel processes" if args.world_size > 1 else ""))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokens.eos
    trainer = CompressionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CompressionCollator(tokens, examples.window, pad_id),
    )
    checkpoint = resume_checkpoint(settings.output_dir, settings.resume_from_checkpoint)
    if checkpoint is not None and args.process_index == 0:
        print(f"hcr: resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(settings.output_dir)
    return trainer
