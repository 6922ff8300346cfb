"""Batching compression examples: padding, and the pooler's windows for the whole batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hcr.compression.examples import IGNORE_INDEX, window_tokens
from hcr.compression.tokens import CompressionTokens
from hcr.files import require_fields


@dataclass
class CompressionCollator:
    """Pads examples of different lengths (right padding) and gathers their windows.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, ``slot_mask`` ``[B, T]``
    (the placeholder positions of ``input_ids``) and ``window_ids`` ``[N, W]``: the real
    tokens of every compressed window, in the row-major order of the slots, which is
    the order ``hcr_kernels.pool_scatter`` fills them in.
    """

    tokens: CompressionTokens
    window: int
    pad_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        compressed_rows = [_checked_example(row, example) for row, example in enumerate(examples)]
        length = max(len(compressed) for compressed in compressed_rows)
        input_ids = np.full((len(examples), length), self.pad_id, dtype=np.int64)
        labels = np.full((len(examples), length), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((len(examples), length), dtype=np.int64)
        windows = []
        for row, (example, compressed) in enumerate(zip(examples, compressed_rows)):
            real = window_tokens(np.asarray(example["replaced_original_tokens"]), np.asarray(example["original_tokens"]),
                                 self.tokens.placeholder, self.window,
                                 slots=int((compressed == self.tokens.placeholder).sum()), context=f"example {row}: ")
            input_ids[row, : len(compressed)] = compressed
            labels[row, : len(compressed)] = example["labels"]
            attention[row, : len(compressed)] = 1
            windows.append(real)
        input_ids_t = torch.from_numpy(input_ids)
        return {
            "input_ids": input_ids_t,
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "slot_mask": (input_ids_t == self.tokens.placeholder) & torch.from_numpy(attention).bool(),
            "window_ids": torch.from_numpy(np.concatenate(windows)),
        }


EXAMPLE_KEYS = ("compressed_input_ids", "labels", "replaced_original_tokens", "original_tokens")


def _checked_example(row: int, example) -> np.ndarray:
    """``compressed_input_ids`` of example ``row`` as a 1-D integer array, after checking what the collator reads
    from it: a clear error naming the example instead of numpy's KeyError or broadcast error."""
    if not isinstance(example, Mapping):
        raise ValueError(f"example {row}: must be a mapping of {list(EXAMPLE_KEYS)}, got {type(example).__name__}")
    require_fields(example, EXAMPLE_KEYS, f"example {row}")
    compressed, labels = np.asarray(example["compressed_input_ids"]), np.asarray(example["labels"])
    for key, values in (("compressed_input_ids", compressed), ("labels", labels)):
        if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
            raise ValueError(f"example {row}: {key} must be a 1-D sequence of integers, got shape {values.shape} "
                             f"of {values.dtype}")
    if len(labels) != len(compressed):
        raise ValueError(f"example {row}: labels ({len(labels)}) must be as long as compressed_input_ids "
                         f"({len(compressed)})")
    return compressed
