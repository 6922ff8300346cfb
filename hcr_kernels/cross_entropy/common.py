"""What the two cross-entropy ops' fast paths share: backend checks and launchers, weights, argument checks.

Never imported by ``reference.py``, which computes the same things its own way, so that a
mistake here shows up as a mismatch with the oracle instead of hiding in both.
"""

from __future__ import annotations

import torch

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_tensor
from hcr_kernels.cross_entropy import native

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("the cross-entropy ops", "triton"),
    "triton": _dispatch.require_triton,
}


def launchers(backend: str):
    """The backend's module of ``weighted_cross_entropy_fwd_`` (same signature in both); Triton's is imported at
    first use: it is optional."""
    if backend == "triton":
        from hcr_kernels.cross_entropy import triton_kernels

        return triton_kernels
    return native


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16, fp64 for fp64: the precision every backend accumulates in."""
    return torch.promote_types(dtype, torch.float32)


def mean_over_kept(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """Weights of a mean over the tokens that are not ignored (all 0 when every token is ignored)."""
    kept = (labels != ignore_index).to(dtype)
    return kept / kept.sum().clamp_min(1)


def kept_weights(labels: torch.Tensor, weights: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """``weights`` in the accumulation dtype, 0 at ignored tokens (so a NaN/inf weight there cannot leak)."""
    return torch.where(labels != ignore_index, weights.to(dtype), torch.zeros((), dtype=dtype, device=weights.device))


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


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_token_weights(weights, tokens: int) -> None:
    check_tensor("weights", weights, dim=1, floating=True)
    if weights.shape[0] != tokens:
        raise ValueError(f"weights has {weights.shape[0]} tokens but there are N={tokens} rows of logits/hidden")


def check_labels(labels: torch.Tensor, tokens: int, vocab: int, ignore_index: int) -> None:
    """Integer ``[N]`` values in ``[0, V)`` or ``ignore_index``; ``labels`` was already checked to be a 1-D tensor
    on the ops' device (the op checks each argument once, in the order its errors are documented)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids), got dtype {labels.dtype}")
    if labels.shape[0] != tokens:
        raise ValueError(f"labels has {labels.shape[0]} tokens but there are N={tokens} rows of logits/hidden")
    if vocab == 0 and tokens > 0:  # no class to score: the native kernels refused it, the reference returned 0
        raise ValueError(f"the vocabulary is empty (V = 0) for N = {tokens} tokens: logits / lm_head_weight need a row "
                         "per token id")
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
