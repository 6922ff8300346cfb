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
from hcr_kernels.cross_entropy.reference import IGNORE_INDEX, accumulation_dtype, weighted_cross_entropy_ref

__all__ = ["weighted_cross_entropy", "WeightedCrossEntropyFunction", "BACKEND_CHECKS", "forward_function",
           "check_labels", "check_token_weights", "check_ignore_index", "kept_weights", "scale_saved_grad"]


BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("the cross-entropy ops", "triton"),
    "triton": _dispatch.require_triton,
}


def forward_function(backend: str):
    """``fn(logits, labels, weights, ignore_index, want_grad, *, in_place=False) -> (losses, grad_logits)``."""
    if backend == "native":
        from hcr_kernels.cross_entropy.native import weighted_cross_entropy_fwd_native

        return weighted_cross_entropy_fwd_native
    from hcr_kernels.cross_entropy.triton_kernels import weighted_cross_entropy_fwd_triton

    return weighted_cross_entropy_fwd_triton


def scale_saved_grad(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """The gradient saved by the forward times ``grad_output``; no copy when that is exactly 1 (``loss.backward()``).

    Out of place otherwise, so a second backward through a retained graph stays right.
    """
    if grad is None:
        return None
    # Under torch.compile the data-dependent test would break the graph; multiplying by exactly 1 is exact,
    # so always multiplying gives the same bits (the compiler may fuse it). Eager keeps the copy-free skip: the
    # saved gradient can be a [V, H] lm_head one.
    if not torch.compiler.is_compiling() and torch.equal(grad_output, torch.ones_like(grad_output)):
        return grad
    return grad * grad_output.to(grad.dtype)


class WeightedCrossEntropyFunction(torch.autograd.Function):
    """Scalar weighted CE; the forward stores ``weights * dCE/dlogits`` for the backward."""

    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index, backend):
        acc = accumulation_dtype(logits.dtype)
        token_weights = kept_weights(labels, weights, ignore_index, acc)
        want_grad = ctx.needs_input_grad[0]
        losses, grad_logits = forward_function(backend)(
            logits.contiguous(), labels.contiguous(), token_weights, ignore_index, want_grad
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


def kept_weights(labels: torch.Tensor, weights: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """``weights`` in the accumulation dtype, 0 at ignored tokens (so a NaN/inf weight there cannot leak)."""
    return torch.where(labels != ignore_index, weights.to(dtype), torch.zeros((), dtype=dtype, device=weights.device))


def check_labels(labels, tokens: int, vocab: int, ignore_index: int) -> None:
    """``labels`` must be an integer ``[N]`` with values in ``[0, V)`` or ``ignore_index``."""
    check_tensor("labels", labels, dim=1)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids), got dtype {labels.dtype}")
    if labels.shape[0] != tokens:
        raise ValueError(f"labels has {labels.shape[0]} tokens but there are N={tokens} rows of logits/hidden")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():
        # Reading `bad` out would break the graph: an in-graph assert keeps the check (RuntimeError on CPU, a
        # device-side assert on CUDA), without the offending values, which only a host read could show.
        torch._assert_async(~bad.any(), f"labels must be in [0, V) or equal ignore_index={ignore_index}")
        return
    if labels.device.type != "meta" and bool(bad.any()):
        where = bad.nonzero().flatten()[:5].tolist()
        shown = ", ".join(f"labels[{i}] = {int(labels[i])}" for i in where)
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary size V) or equal ignore_index={ignore_index}; got {shown}"
        )


def check_token_weights(weights, tokens: int) -> None:
    check_tensor("weights", weights, dim=1, floating=True)
    if weights.shape[0] != tokens:
        raise ValueError(f"weights has {weights.shape[0]} tokens but there are N={tokens} rows of logits/hidden")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


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
