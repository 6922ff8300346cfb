"""Per-token weights of the doublethink loss, vectorised and padding-aware.

The loss shifts the labels, drops the task part, and mixes two ``CrossEntropyLoss``
means: one over the reasoning tokens, one over the final answer token of each example,
weighted ``1 - c`` and ``c``. These weights express it as
``weighted_cross_entropy(logits[:, :-1], input_ids[:, 1:], weights)``, with no loop over
the batch and the final answer at each row's last *real* token (on a right-padded batch
the last position of a shorter row is a pad).
"""

from __future__ import annotations

import numbers

import torch

from hcr_kernels._validate import check_same_device, check_tensor

__all__ = ["answer_loss_weights"]


def answer_loss_weights(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_token_id: int,
    answer_weight: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights ``[B, L - 1]`` aligned with the shifted labels ``input_ids[:, 1:]`` (and ``logits[:, :-1]``).

    Position ``j`` is the prediction of token ``j + 1`` from the logits at ``j``. With
    ``real = attention_mask[:, 1:]`` (all ones when ``attention_mask`` is None), per row:

    * ``a`` = the first ``j`` with ``input_ids[:, 1:][j] == answer_token_id`` and ``real[j]``
      (the prediction *of* the marker is a reasoning term);
    * ``f`` = the last ``j`` with ``real[j]``: the prediction of the last real token, the
      final answer (not the last position, which on padded rows is a pad);
    * reasoning positions ``a <= j < f`` with ``real[j]`` each get ``(1 - c) / R``, where
      ``R`` is the number of reasoning positions in the whole batch; ``f`` gets ``c / B``;
      everything else (the task before the marker, padding) gets 0.

    So ``weighted_cross_entropy`` of these weights is ``(1 - c) * mean(reasoning CE) +
    c * mean(final-answer CE)``, the two means taken across the batch as two
    ``CrossEntropyLoss`` calls would. If no row has a reasoning position (``R = 0``) the first
    term is 0, not the NaN of an empty mean. Rows without the marker raise a
    ``ValueError`` that names them.
    """
    check_tensor("input_ids", input_ids, dim=2)
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (token ids), got dtype {input_ids.dtype}")
    if isinstance(answer_token_id, bool) or not isinstance(answer_token_id, numbers.Integral):
        raise TypeError(f"answer_token_id must be a token id (an int), got {answer_token_id!r}")
    if isinstance(answer_weight, bool) or not isinstance(answer_weight, numbers.Real):
        raise TypeError(f"answer_weight must be a number in [0, 1], got {answer_weight!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (of the weights), got {dtype!r}")
    batch, length = input_ids.shape
    if length < 2:
        raise ValueError(f"input_ids must have at least 2 positions (a token and its successor), got {length}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_tensor("attention_mask", attention_mask, dim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    check_same_device(input_ids=input_ids, attention_mask=attention_mask)
    if not 0.0 <= float(answer_weight) <= 1.0:
        raise ValueError(f"answer_weight must be in [0, 1] (the final answer's share c), got {answer_weight}")

    labels = input_ids[:, 1:]
    real = attention_mask[:, 1:].bool()
    is_marker = (labels == answer_token_id) & real
    has_marker = is_marker.any(dim=1)
    if not bool(has_marker.all()):
        rows = (~has_marker).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} of input_ids have no answer marker (token id {answer_token_id}) among their real "
            "positions 1.. L-1; every example needs one"
        )
    positions = torch.arange(length - 1, device=input_ids.device)
    first_marker = torch.where(is_marker, positions, length).amin(dim=1, keepdim=True)
    last_real = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
    reasoning = (positions >= first_marker) & (positions < last_real) & real
    final = positions == last_real
    reasoning_count = reasoning.sum().clamp_min(1).to(dtype)
    c = torch.tensor(float(answer_weight), dtype=dtype, device=input_ids.device)
    return reasoning.to(dtype) * ((1 - c) / reasoning_count) + final.to(dtype) * (c / batch)
