"""decode_linear: ``input @ weight.T + bias`` for a few rows, the matmul of a decode step.

A decode step pushes one row per sequence through every linear layer, so each layer
reads all its weights to do two flops per weight: its speed is how fast the weights
stream. The BLAS calls ``F.linear`` makes for few rows stream them well below what
a plain vectorised loop gets on this project's machines
(``benchmarks/test_bench_decode_linear.py``); the native kernel is that loop,
parallel over output features, fp32 accumulation. Where it stops winning depends
on the CPU and the dtype, so the automatic choice measures it on this machine
(``measured_buckets``, cached, at 1, 2, 4, ..., 32 rows) and takes it at the row counts it
won at, each rung on its own (a row count between two rungs goes with the larger).

Backends: ``reference`` (``F.linear``, what ``nn.Linear`` computes: the oracle and
the fallback), ``native`` (the compiled extension, CPU; fp32, bf16, fp16). No GPU
kernel: there cuBLAS already streams the weights at bandwidth, so CUDA tensors take
the reference. ``decode_linears(model)`` routes a model's ``nn.Linear`` layers
through this op for the duration of a ``with`` block (``hcr_kernels.patches``), each
layer's choice measured on its own and, where the layers mix the two paths at a row
count or some tied, the stack as a whole (``stack_buckets``).
"""

from hcr_kernels.decode_linear.op import (
    BACKEND_CHECKS,
    NATIVE_DTYPES,
    EVERY_ROW_COUNT,
    ROTATION_LIMIT,
    ROW_LADDER,
    apply_decode_linear,
    decode_linear,
    measured_buckets,
    native_buckets,
    row_bucket,
    stack_buckets,
    takes_native,
    tied_buckets,
    weight_rotation,
)
from hcr_kernels.decode_linear.reference import decode_linear_ref
from hcr_kernels.patches import decode_linear_buckets, decode_linears  # after .op, which patches imports

__all__ = ["decode_linear", "decode_linear_ref", "decode_linears", "decode_linear_buckets", "apply_decode_linear",
           "native_buckets", "measured_buckets", "tied_buckets", "stack_buckets", "row_bucket", "takes_native",
           "BACKEND_CHECKS", "NATIVE_DTYPES", "weight_rotation", "ROW_LADDER", "EVERY_ROW_COUNT", "ROTATION_LIMIT"]
