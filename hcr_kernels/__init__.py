"""hcr_kernels: the ops under the hcr research library.

Every op has a plain PyTorch reference (the oracle of the tests and the fallback
everywhere), a ``native`` path in the compiled extension ``hcr_kernels._C`` and,
where it pays, a ``triton`` path for GPUs. See ``python -m hcr_kernels.info``.

Every op package has the same files: ``reference.py`` (the oracle: torch only, nothing
from the fast paths), ``native.py`` (the only caller of its ``torch.ops.hcr`` ops, and
their fakes), ``triton_kernels.py`` where there are Triton kernels (launchers with
``native.py``'s names and signatures), ``op.py`` (the autograd Function, which
allocates every buffer, the public function, its argument checks and
``BACKEND_CHECKS``) and an ``__init__.py`` that only re-exports. Model patches are
``patches.py``.
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
from hcr_kernels.decode_attention import decode_attention, decode_attention_ref
from hcr_kernels.decode_linear import decode_linear, decode_linear_ref, decode_linears
from hcr_kernels.decoder_step import Qwen2DecoderStack, Qwen2LayerWeights, qwen2_decoder_step_ref
from hcr_kernels.kv_cache import ragged_cache_write_, ragged_cache_write_ref
from hcr_kernels.patches import apply_hcr_kernels_to_mamba, remove_hcr_kernels_from_mamba
from hcr_kernels.pool_scatter import pool_scatter, pool_scatter_ref, window_mean_pool, window_mean_pool_ref
from hcr_kernels.selective_scan import selective_scan, selective_scan_ref

_cpu_isa.apply_env()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "IGNORE_INDEX",
    "Qwen2DecoderStack",
    "Qwen2LayerWeights",
    "answer_loss_weights",
    "apply_hcr_kernels_to_mamba",
    "causal_conv1d",
    "causal_conv1d_ref",
    "decode_attention",
    "decode_attention_ref",
    "decode_linear",
    "decode_linear_ref",
    "decode_linears",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "weighted_cross_entropy",
    "weighted_cross_entropy_ref",
    "pool_scatter",
    "qwen2_decoder_step_ref",
    "pool_scatter_ref",
    "ragged_cache_write_",
    "ragged_cache_write_ref",
    "remove_hcr_kernels_from_mamba",
    "selective_scan",
    "selective_scan_ref",
    "window_mean_pool",
    "window_mean_pool_ref",
]
