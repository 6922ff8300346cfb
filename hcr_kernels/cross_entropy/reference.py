"""Plain PyTorch losses: the oracles of the fast paths (and the CPU fallback).

Everything is computed in fp32 (fp64 for fp64 inputs) from the input values, with
the logits materialised in full: the straightforward ``CrossEntropyLoss`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The label of a position the loss skips: the value torch's cross entropy and transformers' models use,
# so labels made for either work with these ops unchanged.
IGNORE_INDEX = -100


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16, fp64 for fp64: the precision every backend accumulates in."""
    return torch.promote_types(dtype, torch.float32)


def weighted_cross_entropy_ref(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``sum_i weights[i] * CE(logits[i], labels[i])`` over tokens whose label is not ``ignore_index``."""
    acc = accumulation_dtype(logits.dtype)
    per_token = F.cross_entropy(logits.to(acc), labels.long(), ignore_index=ignore_index, reduction="none")
    kept = labels != ignore_index
    return torch.where(kept, weights.to(acc) * per_token, torch.zeros((), dtype=acc, device=logits.device)).sum()


def mean_over_kept(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """Weights of a mean over the tokens that are not ignored (all 0 when every token is ignored)."""
    kept = (labels != ignore_index).to(dtype)
    return kept / kept.sum().clamp_min(1)


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits = hidden @ lm_head_weight.T (+ bias)`` in full, then the (weighted) cross entropy.

    ``weights=None`` is the mean over non-ignored tokens (``CrossEntropyLoss``), 0 when all are ignored.
    """
    acc = accumulation_dtype(hidden.dtype)
    logits = F.linear(hidden.to(acc), lm_head_weight.to(acc), None if bias is None else bias.to(acc))
    if weights is None:
        weights = mean_over_kept(labels, ignore_index, acc)
    return weighted_cross_entropy_ref(logits, labels, weights, ignore_index)
