"""Host wrapper of the compiled weighted cross entropy (``torch.ops.hcr.weighted_cross_entropy_fwd_``), and its fake.

The op's Function allocates ``losses`` and ``grad_logits``; this only launches. The kernel
reads each row before it writes it, so ``grad_logits`` may be ``logits`` itself (in place).
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension


@_extension.register_fake("weighted_cross_entropy_fwd_")
def _weighted_cross_entropy_fwd_fake(logits, labels, weights, ignore_index, losses, grad_logits):
    """Under torch.compile: the op only writes ``losses`` (and ``grad_logits``) in place."""
    return None


def weighted_cross_entropy_fwd_(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int,
                                losses: torch.Tensor, grad_logits: torch.Tensor | None) -> None:
    """Per-token CE into ``losses [N]`` and, unless None, ``weights[:, None] * dCE/dlogits`` into ``grad_logits``."""
    torch.ops.hcr.weighted_cross_entropy_fwd_(logits, labels, weights, ignore_index, losses, grad_logits)
