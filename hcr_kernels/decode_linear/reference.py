"""Plain PyTorch linear: the oracle of the native kernel and the fallback.

It is exactly what ``torch.nn.Linear`` computes (``F.linear`` in the input's dtype),
so routing a model's layers through ``decode_linear`` never changes what the
fallback computes; the tests compare every backend against it in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_linear_ref(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` over the last dimension of ``input``."""
    return F.linear(input, weight, bias)
