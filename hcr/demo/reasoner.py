"""The demo's reasoner: a tiny Qwen2 trained from scratch on uncompressed traces.

It plays the part of DeepSeek-R1-Distill-Qwen: a model that reasons in the R1
chat layout, which the compressors then learn to read in compressed form while it
stays frozen. Plain PyTorch training (AdamW, warm-up then cosine decay), the loss
on what the assistant writes (reasoning, ``</think>``, answer, EOS) only.

Marker exposure: a share of the traces (``marker_fraction``) has a prefix of its
reasoning wrapped, tokens unchanged, in ``<|vision_start|>`` … ``<|vision_end|>``.
A large pretrained model has met every token of its vocabulary and shrugs at two
stray ones; a tiny model trained on one narrow task has not, and without this the
two markers alone broke it (held-out accuracy 0.15 with every slot holding its own
token's embedding, W = 1). It never sees a pooled vector: reading those is the
compressor's job.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hcr.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, UNIT_NUMBER, check_fields
from hcr.compression.traces import TokenizedTrace
from hcr_kernels import IGNORE_INDEX


@dataclass
class ReasonerSettings:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    steps: int = 700
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    marker_fraction: float = 0.5

    def __post_init__(self):
        check_fields(self, hidden_size=POSITIVE_INT, layers=POSITIVE_INT, heads=POSITIVE_INT, kv_heads=POSITIVE_INT,
                     intermediate_size=POSITIVE_INT, steps=POSITIVE_INT, batch_size=POSITIVE_INT,
                     learning_rate=POSITIVE_NUMBER, warmup_steps=NON_NEGATIVE_INT,
                     weight_decay=UNIT_NUMBER, marker_fraction=UNIT_NUMBER)


def build_reasoner(vocab_size: int, settings: ReasonerSettings, max_positions: int, pad_id: int,
                   bos_id: int, eos_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        intermediate_size=settings.intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    return Qwen2ForCausalLM(config)


def with_markers(trace: TokenizedTrace, cut: int, markers: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(ids, labels) of ``trace`` with its reasoning up to ``cut`` (exclusive) between the block markers.

    Labels cover what the assistant writes; the markers are never written by the model, so never supervised.
    """
    ids = trace.ids.tolist()
    start = trace.reasoning_start
    if markers is not None and start < cut <= trace.reasoning_end:
        ids = ids[:start] + [markers[0]] + ids[start:cut] + [markers[1]] + ids[cut:]
        labels = [IGNORE_INDEX] * (start + 1) + ids[start + 1 : cut + 1] + [IGNORE_INDEX] + ids[cut + 2 :]
    else:
        labels = [IGNORE_INDEX] * start + ids[start:]
    return ids, labels


def training_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` from (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    return ids, mask, labels


def learning_rate(step: int, settings: ReasonerSettings) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_reasoner(model, traces: list[TokenizedTrace], settings: ReasonerSettings, pad_id: int, seed: int,
                   markers: tuple[int, int], log_every: int = 50) -> list[tuple[int, float]]:
    """Train ``model`` in place; returns the loss curve as (step, mean loss since the last point).

    ``markers``: the block start and end ids, for marker exposure.
    """
    generator = torch.Generator().manual_seed(seed)
    chooser = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.98))
    model.train()
    curve, running, counted = [], 0.0, 0
    order = torch.randperm(len(traces), generator=generator).tolist()
    cursor = 0
    bar = tqdm(range(settings.steps), desc="reasoner", unit="step")
    for step in bar:
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(traces), generator=generator).tolist(), 0
        batch = [traces[i] for i in order[cursor : cursor + settings.batch_size]]
        cursor += settings.batch_size
        rows = [with_markers(trace, chooser.randint(trace.reasoning_start + 1, trace.reasoning_end), markers)
                if chooser.random() < settings.marker_fraction and trace.reasoning_end > trace.reasoning_start
                else with_markers(trace, -1, None) for trace in batch]
        ids, mask, labels = training_batch(rows, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        counted += 1
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            curve.append((step + 1, running / counted))
            bar.set_postfix(loss=f"{running / counted:.3f}")
            running, counted = 0.0, 0
    model.eval()
    return curve
