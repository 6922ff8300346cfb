"""decode_linear: ``input @ weight.T + bias`` for a few rows, the matmul of a decode step.

A decode step pushes one row per sequence through every linear layer, so each layer
reads all its weights to do two flops per weight: its speed is how fast the weights
stream. On this project's machines (AMD EPYC) the BLAS call ``F.linear`` makes for
one row (MKL's sgemv) streams them at about a third of what a plain vectorised loop
gets (``benchmarks/test_bench_decode_linear.py``); the native kernel is that loop,
parallel over output features, fp32 accumulation. With more rows the BLAS GEMM
wins, so the automatic choice takes the native kernel only up to
``NATIVE_MAX_ROWS`` rows (per dtype, measured here; fp16 only when asked for).

Backends: ``reference`` (``F.linear``, what ``nn.Linear`` computes: the oracle and
the fallback), ``native`` (the compiled extension, CPU; fp32, bf16, fp16). No GPU
kernel: there cuBLAS already streams the weights at bandwidth, so CUDA tensors take
the reference. ``decode_linears(model)`` routes a model's ``nn.Linear`` layers
through this op for the duration of a ``with`` block.
"""

from hcr_kernels.decode_linear.op import (
    BACKEND_CHECKS,
    NATIVE_DTYPES,
    NATIVE_MAX_ROWS,
    apply_decode_linear,
    decode_linear,
    native_row_limit,
)
from hcr_kernels.decode_linear.patch import decode_linears
from hcr_kernels.decode_linear.reference import decode_linear_ref

__all__ = ["decode_linear", "decode_linear_ref", "decode_linears", "apply_decode_linear", "native_row_limit",
           "BACKEND_CHECKS", "NATIVE_DTYPES", "NATIVE_MAX_ROWS"]
