"""hcr_kernels: the ops under the hcr research library.

Every op has a plain PyTorch reference (the oracle of the tests and the fallback
everywhere), a ``native`` path in the compiled extension ``hcr_kernels._C`` and,
where it pays, a ``triton`` path for GPUs. See ``python -m hcr_kernels.info``.
"""

from hcr_kernels import cpu_isa as _cpu_isa
from hcr_kernels._dispatch import BACKEND_ENV_VAR, BACKENDS
from hcr_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref
from hcr_kernels.cross_entropy import (
    IGNORE_INDEX,
    answer_loss_weights,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    weighted_cross_entropy,
    weighted_cross_entropy_ref,
)
from hcr_kernels.decode_linear import decode_linear, decode_linear_ref, decode_linears
from hcr_kernels.kv_cache import ragged_cache_write_, ragged_cache_write_ref
from hcr_kernels.mamba_patch import apply_hcr_kernels_to_mamba, remove_hcr_kernels_from_mamba
from hcr_kernels.pool_scatter import pool_scatter, pool_scatter_ref, window_mean_pool, window_mean_pool_ref
from hcr_kernels.selective_scan import selective_scan, selective_scan_ref

_cpu_isa.apply_env()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "IGNORE_INDEX",
    "answer_loss_weights",
    "apply_hcr_kernels_to_mamba",
    "causal_conv1d",
    "causal_conv1d_ref",
    "decode_linear",
    "decode_linear_ref",
    "decode_linears",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "weighted_cross_entropy",
    "weighted_cross_entropy_ref",
    "pool_scatter",
    "pool_scatter_ref",
    "ragged_cache_write_",
    "ragged_cache_write_ref",
    "remove_hcr_kernels_from_mamba",
    "selective_scan",
    "selective_scan_ref",
    "window_mean_pool",
    "window_mean_pool_ref",
]
