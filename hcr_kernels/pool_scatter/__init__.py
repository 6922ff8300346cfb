"""Fused window mean-pool + masked scatter.

The compression model turns each window of W reasoning tokens into one vector
(the mean of the pooler's last hidden states) and splices the vectors into the
main model's input embeddings at the placeholder slots. Done with plain PyTorch
that is a mean, a ``masked_scatter`` and, in the backward, a ``masked_fill`` and a
``masked_select``: several passes over ``[B, T, D]``. Here both directions are one
pass ("pool rows"): every output row is either a pooled window or a copy of the
template row.

Backends: ``reference`` (plain PyTorch, the oracle), ``native`` (the compiled
extension, CPU and CUDA), ``triton`` (CUDA tensors; CPU under ``TRITON_INTERPRET=1``).
"""

from hcr_kernels.pool_scatter.op import (
    BACKEND_CHECKS,
    PoolRowsFunction,
    pool_scatter,
    window_mean_pool,
)
from hcr_kernels.pool_scatter.reference import pool_scatter_ref, window_mean_pool_ref

__all__ = ["window_mean_pool", "pool_scatter", "window_mean_pool_ref", "pool_scatter_ref", "PoolRowsFunction",
           "BACKEND_CHECKS"]
