"""Plain PyTorch window mean-pool + masked scatter: the oracle of the fast paths.

The computation of the compression model's training step: mean over each window of the
pooler's last hidden states (in at least fp32), then ``masked_scatter`` into the template
of input embeddings at the placeholder slots.
"""

from __future__ import annotations

import torch


def window_mean_pool_ref(hidden: torch.Tensor) -> torch.Tensor:
    """``[N, W, D] -> [N, D]``: mean over W in fp32 (fp64 for fp64), returned in ``hidden.dtype``."""
    accumulate = torch.promote_types(hidden.dtype, torch.float32)
    return hidden.to(accumulate).mean(dim=1).to(hidden.dtype)


def pool_scatter_ref(template: torch.Tensor, slot_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``template`` with its ``True`` slots (row-major) replaced by the pooled windows."""
    pooled = window_mean_pool_ref(hidden)
    return template.masked_scatter(slot_mask.unsqueeze(-1).expand_as(template), pooled)
