"""Short depthwise causal conv1d (Mamba's token mixing before the scan).

Backends: ``reference`` (``F.conv1d`` with causal padding, fp32), ``native`` (the
compiled CPU kernel, channels-last, fp32: one pass forward and one backward, the
activation fused; about 10x faster than ``F.conv1d`` forward+backward at the
doublethink shape, see the benchmarks),
``cuda`` (the ``causal-conv1d`` package's kernel on GPUs, when installed).
"""

from hcr_kernels.causal_conv1d.op import ACTIVATIONS, BACKEND_CHECKS, CausalConv1dFunction, causal_conv1d
from hcr_kernels.causal_conv1d.reference import causal_conv1d_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref", "BACKEND_CHECKS", "ACTIVATIONS", "CausalConv1dFunction"]
