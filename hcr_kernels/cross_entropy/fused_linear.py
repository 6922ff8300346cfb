"""Fused linear + cross entropy: the projection to the vocabulary and the loss, chunk by chunk.

At the compression trainer's shape (4,096 tokens x 151,936 vocabulary) the fp32
logits alone are 2.5 GB, and the plain path keeps several tensors of that size
(logits, log-softmax, their gradients). Here the tokens are processed in chunks:
each chunk's logits are computed with a matmul, the CE kernel turns them into the
chunk's losses and, in place, into their gradient, which is immediately
multiplied back into ``grad_hidden`` (and accumulated into ``grad_weight`` if the
``lm_head`` is trained). So the forward computes every gradient, as Liger-Kernel's
``fused_linear_cross_entropy`` does, and the backward only scales them by
``grad_output``; at most one chunk of logits exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.cross_entropy.common import (
    BACKEND_CHECKS,
    accumulation_dtype,
    check_ignore_index,
    check_labels,
    check_token_weights,
    kept_weights,
    launchers,
    mean_over_kept,
    scale_saved_grad,
)
from hcr_kernels.cross_entropy.reference import IGNORE_INDEX, fused_linear_cross_entropy_ref

__all__ = ["fused_linear_cross_entropy", "FusedLinearCrossEntropyFunction", "default_chunk_size", "CHUNK_ELEMENTS"]

# Logits elements per chunk when chunk_size is not given: 2**25 (128 MiB in fp32), so
# 220 tokens at V = 151,936. Measured on the 2-core CPU at 1,024 x 151,936 x 1,536
# (frozen lm_head): 64-128-token chunks re-read the 0.9 GB lm_head weight so often that
# the matmuls slow down by 1.5-2x; 256 tokens were as fast as 512 and 1,024 (the whole
# batch) and peak at 160 MB above the inputs, against 1.8 GB for the plain path.
CHUNK_ELEMENTS = 2**25


def default_chunk_size(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked ``CE(hidden @ weight.T + bias)``; every gradient is computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, ignore_index, chunk_size, backend):
        acc = accumulation_dtype(hidden.dtype)
        tokens = hidden.shape[0]
        if weights is None:
            token_weights = mean_over_kept(labels, ignore_index, acc)
        else:
            token_weights = kept_weights(labels, weights, ignore_index, acc)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        want_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators across chunks for fp16/bf16 weights; returned as is for fp32.
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        losses = torch.empty(tokens, dtype=acc, device=hidden.device)
        ce_forward = launchers(backend).weighted_cross_entropy_fwd_
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            chunk = hidden[start:end]
            logits = F.linear(chunk, weight, bias)
            grad_logits = logits if want_grad else None  # in place: the chunk's logits become its gradient
            ce_forward(logits, labels[start:end], token_weights[start:end], ignore_index, losses[start:end],
                       grad_logits)
            if grad_logits is None:
                continue
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(acc), chunk.to(acc))
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=acc)
            del logits, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, losses)
        ctx.weights_dtype = None if weights is None else weights.dtype
        return (token_weights * losses).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias, losses = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[4]:
            grad_weights = (losses * grad_output).to(ctx.weights_dtype)
        return (
            scale_saved_grad(grad_hidden, grad_output),
            scale_saved_grad(grad_weight, grad_output),
            scale_saved_grad(grad_bias, grad_output),
            None,
            grad_weights,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross entropy of ``hidden @ lm_head_weight.T (+ bias)`` without materialising the ``[N, V]`` logits.

    ``hidden`` ``[N, H]``, ``lm_head_weight`` ``[V, H]`` (same dtype), ``labels`` integer ``[N]``.
    ``weights=None``: the mean over tokens whose label is not ``ignore_index``, as
    ``CrossEntropyLoss`` (0, not NaN, when every token is ignored). ``weights`` ``[N]``: the
    weighted sum, as ``weighted_cross_entropy`` (the weights carry the normalisation).
    Returns a scalar in fp32 (fp64 for fp64). Gradients go to ``hidden``, and to
    ``lm_head_weight`` / ``bias`` / ``weights`` only when they require grad (a frozen
    ``lm_head`` costs no ``[V, H]`` gradient). ``chunk_size``: tokens per chunk, default
    ``2**25 // V`` (128 MiB of fp32 logits at a time). The logits are computed by a matmul
    in the input dtype, the CE in fp32.
    ``backend``: ``"reference"`` (full logits), ``"native"`` (CPU), ``"triton"`` or None.
    """
    check_tensor("hidden", hidden, dim=2, floating=True)
    check_tensor("lm_head_weight", lm_head_weight, dim=2, floating=True)
    check_ignore_index(ignore_index)
    tokens, dim = hidden.shape
    vocab = lm_head_weight.shape[0]
    if lm_head_weight.shape[1] != dim:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H={dim} (hidden is {tuple(hidden.shape)}), "
            f"got {tuple(lm_head_weight.shape)}"
        )
    tensors = {"hidden": hidden, "lm_head_weight": lm_head_weight, "labels": labels}
    check_tensor("labels", labels, dim=1)
    if weights is not None:
        check_token_weights(weights, tokens)
        tensors["weights"] = weights
    if bias is not None:
        check_tensor("bias", bias, dim=1, floating=True)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias must be [V] with V={vocab}, got {tuple(bias.shape)}")
        tensors["bias"] = bias
    check_same_device(**tensors)
    if bias is not None:
        check_same_dtype(hidden=hidden, lm_head_weight=lm_head_weight, bias=bias)
    else:
        check_same_dtype(hidden=hidden, lm_head_weight=lm_head_weight)
    check_labels(labels, tokens, vocab, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    chosen = _dispatch.choose_backend("fused_linear_cross_entropy", hidden.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return fused_linear_cross_entropy_ref(hidden, lm_head_weight, labels, weights, ignore_index, bias)
    return FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), lm_head_weight, bias, labels.long().contiguous(), weights, ignore_index, chunk_size, chosen
    )
