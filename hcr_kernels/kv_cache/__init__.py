"""Ragged KV-cache write: crop + append at per-row offsets, all rows in one call per layer.

Batched generation with compression keeps a static, preallocated cache
(``[B, H, S, Dh]``, transformers' ``StaticCache`` layout) whose rows have different
lengths: they start from different prompts, compress at different steps (a
compression crops the row back to its end marker and re-encodes the suffix) and
stop at different steps. ``ragged_cache_write_`` writes each row's new states at
that row's own offset, in place, without a Python loop over rows.

Backends: ``reference`` (masked assignment in plain PyTorch, the oracle and the
fallback), ``native`` (the compiled extension: a C++ CPU kernel and a CUDA kernel).
"""

from hcr_kernels.kv_cache.op import BACKEND_CHECKS, check_write_bounds, ragged_cache_write_
from hcr_kernels.kv_cache.reference import ragged_cache_write_ref

__all__ = ["ragged_cache_write_", "ragged_cache_write_ref", "check_write_bounds", "BACKEND_CHECKS"]
