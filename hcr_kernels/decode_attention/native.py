"""Host wrapper of the compiled decode attention (``torch.ops.hcr.decode_attention``), and its fake.

The schema is functional: the C++ allocates the ``[B, T, Hq, D]`` output and checks the
positions against the cache on the host (a few integers per step).
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension

# Looked up once: it is called per layer per decode step.
_op = torch.ops.hcr.decode_attention.default if _extension.extension_loaded() else None


@_extension.register_fake("decode_attention")
def _decode_attention_fake(query, keys, values, positions, scale, window):
    batch, heads, steps, head_dim = query.shape
    return query.new_empty((batch, steps, heads, head_dim))


def decode_attention(query, keys, values, positions, scale: float, sliding_window: int | None) -> torch.Tensor:
    return _op(query, keys, values, positions, float(scale), int(sliding_window or 0))
