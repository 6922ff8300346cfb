"""Host function of the compiled weighted cross entropy (``torch.ops.hcr.weighted_cross_entropy_fwd_``), and its fake."""

from __future__ import annotations

import torch

from hcr_kernels import _extension  # noqa: F401  (loads torch.ops.hcr)

if _extension.extension_loaded():

    @torch.library.register_fake("hcr::weighted_cross_entropy_fwd_")
    def _weighted_cross_entropy_fwd_fake(logits, labels, weights, ignore_index, losses, grad_logits):
        """Under torch.compile: the op only writes ``losses`` (and ``grad_logits``) in place."""
        return None


def weighted_cross_entropy_fwd_native(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int,
    want_grad: bool,
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE ``[N]`` and, if asked, ``weights[:, None] * dCE/dlogits`` (written over ``logits`` if ``in_place``).

    The kernel reads each row before it writes it, so the in-place gradient is safe.
    """
    losses = torch.empty(logits.shape[0], dtype=weights.dtype, device=logits.device)
    grad_logits = (logits if in_place else torch.empty_like(logits)) if want_grad else None
    torch.ops.hcr.weighted_cross_entropy_fwd_(logits, labels, weights, ignore_index, losses, grad_logits)
    return losses, grad_logits
