"""Triton kernel of the weighted cross entropy: one program per token (row of logits).

As Liger-Kernel's cross entropy: a first pass over the vocabulary keeps an online
max and sum of exponentials (the loss needs nothing else), a second pass writes
``weight * (softmax - onehot)``, the gradient of the weighted sum, so the backward
only scales it by ``grad_output``. Math in the dtype of ``losses`` (fp32, or fp64
for fp64 logits). ``grad_logits`` may be the logits tensor itself (an in-place
gradient): each block is read before it is overwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _weighted_ce_fwd_kernel(
    logits_ptr, labels_ptr, weights_ptr, losses_ptr, grad_ptr, V, ignore_index,
    WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = losses_ptr.dtype.element_ty
    label = tl.load(labels_ptr + row)
    row_logits = logits_ptr + row * V
    row_grad = grad_ptr + row * V
    if label == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if WANT_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(row_grad + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < V)
        return
    # A finite start for the running max, so that rows (or first blocks) of -inf logits give no inf - inf.
    running_max = tl.full([], -3.0e38, dtype=acc_dtype)
    running_sum = tl.zeros([], dtype=acc_dtype)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_logits + cols, mask=cols < V, other=float("-inf")).to(acc_dtype)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    picked = tl.load(row_logits + label).to(acc_dtype)
    tl.store(losses_ptr + row, running_max + tl.log(running_sum) - picked)
    if WANT_GRAD:
        weight = tl.load(weights_ptr + row)
        scale = weight / running_sum
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + cols, mask=cols < V, other=float("-inf")).to(acc_dtype)
            grad = tl.exp(x - running_max) * scale
            grad = tl.where(cols == label, grad - weight, grad)
            tl.store(row_grad + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def weighted_cross_entropy_fwd_(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int,
                                losses: torch.Tensor, grad_logits: torch.Tensor | None) -> None:
    """``native.weighted_cross_entropy_fwd_``'s contract: fills ``losses`` (and ``grad_logits`` unless None)."""
    tokens, vocab = logits.shape
    if tokens:
        block = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)
        _weighted_ce_fwd_kernel[(tokens,)](
            logits, labels, weights, losses, grad_logits if grad_logits is not None else logits, vocab, ignore_index,
            WANT_GRAD=grad_logits is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
