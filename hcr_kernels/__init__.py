"""hcr_kernels: the ops under the hcr research library.

Every op has a plain PyTorch reference (the oracle of the tests and the fallback
everywhere), a ``native`` path in the compiled extension ``hcr_kernels._C`` and,
where it pays, a ``triton`` path for GPUs. See ``python -m hcr_kernels.info``.
"""

from hcr_kernels._dispatch import BACKEND_ENV_VAR, BACKENDS
from hcr_kernels.pool_scatter import pool_scatter, pool_scatter_ref, window_mean_pool, window_mean_pool_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "pool_scatter",
    "pool_scatter_ref",
    "window_mean_pool",
    "window_mean_pool_ref",
]
