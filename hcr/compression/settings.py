"""What a compressor is trained with: the pooler, its LoRA, the Trainer's arguments.

A module of its own, free of transformers at import, so that ``hcr train-compressor``'s
flags take their defaults from these dataclasses without slowing down ``hcr --help``.
Under a launcher, ``TrainSettings.training_arguments`` makes the run real data-parallel
training on machines without a GPU too (``launcher_arguments``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from hcr.argtypes import (FLAG, NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, UNIT_NUMBER, Rule, check_fields,
                         non_empty_tuple_of, optional)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS_OR_EPOCHS: Rule = (lambda v: v == -1 or POSITIVE_INT[0](v), "-1 (run --epochs) or a positive integer")


@dataclass
class LoraSettings:
    """LoRA of the pooler: by default r = 16 on every projection, the embeddings trained too."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    embeddings: bool = True

    def __post_init__(self):
        check_fields(self, r=POSITIVE_INT, alpha=POSITIVE_NUMBER, dropout=UNIT_NUMBER, embeddings=FLAG,
                     target_modules=non_empty_tuple_of((lambda v: isinstance(v, str), "a module name")))


@dataclass
class PoolerSettings:
    """Which pooler: its depth (None: the base's), its own token table or the base's, an extra projection."""

    num_hidden_layers: int | None = None
    own_embeddings: bool = True
    projection: bool = False
    from_base_weights: bool = True

    def __post_init__(self):
        check_fields(self, num_hidden_layers=optional(POSITIVE_INT), own_embeddings=FLAG, projection=FLAG,
                     from_base_weights=FLAG)


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

    def __post_init__(self):
        check_fields(self, max_steps=STEPS_OR_EPOCHS, num_train_epochs=POSITIVE_NUMBER,
                     per_device_train_batch_size=POSITIVE_INT, gradient_accumulation_steps=POSITIVE_INT,
                     learning_rate=POSITIVE_NUMBER, warmup_steps=NON_NEGATIVE_INT, logging_steps=POSITIVE_INT,
                     save_steps=POSITIVE_INT, save_total_limit=optional(POSITIVE_INT), gradient_checkpointing=FLAG)

    def training_arguments(self):
        """The ``TrainingArguments``; creating them sets up the process group under a launcher."""
        from transformers import TrainingArguments

        on_gpu = torch.cuda.is_available()
        optional = {**launcher_arguments(), **self.extra}
        if self.gradient_checkpointing:  # transformers 5 renamed it, and warns on the 4.x name
            renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            optional["activation_checkpointing" if renamed else "gradient_checkpointing"] = True
        args = TrainingArguments(
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
        check_data_parallel(args)
        return args


def launched_processes() -> int:
    """How many processes a launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _ddp_accelerator() -> bool:
    """Whether accelerate will run DDP on an accelerator here (CUDA: NCCL; also XPU, NPU...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:  # torch < 2.6
        return torch.cuda.is_available()
    return accelerator.is_available() and accelerator.current_accelerator().type != "mps"


def launcher_arguments() -> dict:
    """``TrainingArguments`` that make a launch on a machine without a GPU real DDP over gloo.

    Under a launcher (``LOCAL_RANK`` set) accelerate's ``PartialState`` only chooses its
    multi-CPU mode when told the run is on CPU (``use_cpu``). Without that flag and without a GPU
    it still opens a process group but records no distributed type, so the Trainer runs in
    ``ParallelMode.NOT_PARALLEL``: no DDP, no sharded sampler, every rank trains alone on all the
    data and every rank writes the output folder. With a GPU, accelerate picks NCCL by itself.
    """
    if int(os.environ.get("LOCAL_RANK", "-1")) == -1 or _ddp_accelerator():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def check_data_parallel(args) -> None:
    """Refuse a launch whose ranks would train independently (see ``launcher_arguments``)."""
    from transformers.training_args import ParallelMode

    launched = launched_processes()
    if launched > 1 and (args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size != launched):
        raise RuntimeError(
            f"launched as {launched} processes but the Trainer is in {args.parallel_mode} with world size "
            f"{args.world_size}: every process would train alone and write the same output (without a GPU "
            f"hcr sets use_cpu=True, ddp_backend='gloo'; check TrainSettings.extra)")
