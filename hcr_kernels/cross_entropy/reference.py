"""Plain PyTorch losses: the oracles of the fast paths (and the CPU fallback).

Everything is computed in fp32 (fp64 for fp64 inputs) from the input values, with
the logits materialised in full: the straightforward ``CrossEntropyLoss`` path. Self-contained
on purpose (torch only, no helper shared with ``common.py``): an oracle that shares code with
what it checks cannot catch a mistake in that code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The label of a position the loss skips: the value torch's cross entropy and transformers' models use,
# so labels made for either work with these ops unchanged. A constant of the ops' contract, shared with them.
IGNORE_INDEX = -100


def weighted_cross_entropy_ref(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``sum_i weights[i] * CE(logits[i], labels[i])`` over tokens whose label is not ``ignore_index``.

    An ignored token's logits are not read (as the kernels do not read them): a NaN there had made its
    gradient row NaN (0 * NaN in the softmax's backward) where the kernels' is 0.
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    kept = labels != ignore_index
    zero = torch.zeros((), dtype=wide, device=logits.device)
    read = torch.where(kept[:, None], logits.to(wide), zero)
    per_token = F.cross_entropy(read, labels.long(), ignore_index=ignore_index, reduction="none")
    return torch.where(kept, weights.to(wide) * per_token, zero).sum()


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
    wide = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden.to(wide), lm_head_weight.to(wide), None if bias is None else bias.to(wide))
    if weights is None:
        kept = (labels != ignore_index).to(wide)
        weights = kept / kept.sum().clamp_min(1)
    return weighted_cross_entropy_ref(logits, labels, weights, ignore_index)
