"""Host wrapper of the compiled few-row linear (``torch.ops.hcr.decode_linear``), and its fake for torch.compile.

The schema is functional (the C++ allocates the output, one small row block per call).
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension

# Looked up once: it is called per layer per decode step (and a module-level constant keeps torch.compile's guards still).
_op = torch.ops.hcr.decode_linear.default if _extension.extension_loaded() else None


@_extension.register_fake("decode_linear")
def _decode_linear_fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def decode_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[..., K] x [N, K]^T (+ [N]) -> [..., N]``.

    A weight whose rows are not contiguous is copied first (the kernel streams rows);
    the automatic backend choice never sends one here, so that copy is never silent per step.
    """
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    return _op(input, weight, bias)
