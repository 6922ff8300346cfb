"""Weighted cross entropy: ``sum_i weights[i] * CE(logits[i], labels[i])``.

The doublethink trainer weighs reasoning and final-answer tokens differently
(``answer_loss_weights``), so the loss takes one weight per token and leaves the
normalisation to the caller. The fast paths compute the loss and its gradient in
one pass over the logits (the gradient is saved and scaled by ``grad_output`` in
the backward), so the ``[N, V]`` logits are read once and no softmax or log-softmax
of their size is ever stored.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_same_device, check_tensor
from hcr_kernels.cross_entropy.common import (
    BACKEND_CHECKS,
    accumulation_dtype,
    check_ignore_index,
    check_labels,
    check_token_weights,
    kept_weights,
    launchers,
    scale_saved_grad,
)
from hcr_kernels.cross_entropy.reference import IGNORE_INDEX, weighted_cross_entropy_ref

__all__ = ["weighted_cross_entropy", "WeightedCrossEntropyFunction"]


class WeightedCrossEntropyFunction(torch.autograd.Function):
    """Scalar weighted CE; the forward stores ``weights * dCE/dlogits`` for the backward."""

    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index, backend):
        acc = accumulation_dtype(logits.dtype)
        token_weights = kept_weights(labels, weights, ignore_index, acc)
        logits = logits.contiguous()
        losses = logits.new_empty(logits.shape[0], dtype=acc)
        grad_logits = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        launchers(backend).weighted_cross_entropy_fwd_(
            logits, labels.contiguous(), token_weights, ignore_index, losses, grad_logits
        )
        ctx.save_for_backward(grad_logits, losses)
        ctx.weights_dtype = weights.dtype
        return (token_weights * losses).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_logits, losses = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = (losses * grad_output).to(ctx.weights_dtype)
        return scale_saved_grad(grad_logits, grad_output), None, grad_weights, None, None


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_i weights[i] * CE(logits[i], labels[i])`` over tokens whose label is not ``ignore_index``.

    ``logits`` ``[N, V]`` (fp32, fp16, bf16 or fp64), ``labels`` integer ``[N]``, ``weights``
    float ``[N]``. The weights carry any normalisation (``answer_loss_weights`` builds the
    doublethink ones; ``weights = 1 / n_kept`` gives ``CrossEntropyLoss``'s mean). Returns
    a scalar in fp32 (fp64 for fp64 logits), accumulated in that precision. Differentiable
    in ``logits`` and, since the per-token losses are at hand, in ``weights`` too.
    ``backend``: ``"reference" | "native" | "triton"`` or None (``HCR_BACKEND`` / fastest).
    """
    check_tensor("logits", logits, dim=2, floating=True)
    check_ignore_index(ignore_index)
    tokens, vocab = logits.shape
    check_tensor("labels", labels, dim=1)
    check_token_weights(weights, tokens)
    check_same_device(logits=logits, labels=labels, weights=weights)
    check_labels(labels, tokens, vocab, ignore_index)
    chosen = _dispatch.choose_backend("weighted_cross_entropy", logits.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return weighted_cross_entropy_ref(logits, labels, weights, ignore_index)
    return WeightedCrossEntropyFunction.apply(logits, labels.long(), weights, ignore_index, chosen)
