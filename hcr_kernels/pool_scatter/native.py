"""Host functions of the compiled pool-rows kernels (``torch.ops.hcr.pool_rows_*``), and their fakes."""

from __future__ import annotations

import torch

from hcr_kernels import _extension  # noqa: F401  (loads torch.ops.hcr)

if _extension.extension_loaded():

    @torch.library.register_fake("hcr::pool_rows_")
    def _pool_rows_fake(template_, window_of_row, hidden, out):
        """Under torch.compile: the op only writes ``out`` in place (declared in its schema)."""
        return None

    @torch.library.register_fake("hcr::pool_rows_backward_")
    def _pool_rows_backward_fake(grad_out, window_of_row, grad_hidden, grad_template):
        """Writes ``grad_hidden`` (and ``grad_template``) in place; returns nothing."""
        return None


def pool_rows_fwd_native(template: torch.Tensor | None, window_of_row: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    rows, dim = window_of_row.shape[0], hidden.shape[2]
    out = torch.empty((rows, dim), dtype=hidden.dtype, device=hidden.device)
    torch.ops.hcr.pool_rows_(template, window_of_row, hidden, out)
    return out


def pool_rows_bwd_native(
    grad_out: torch.Tensor, window_of_row: torch.Tensor, hidden_shape: torch.Size, template_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    grad_hidden = torch.empty(hidden_shape, dtype=grad_out.dtype, device=grad_out.device)
    grad_template = torch.empty_like(grad_out) if template_grad else None
    torch.ops.hcr.pool_rows_backward_(grad_out, window_of_row, grad_hidden, grad_template)
    return grad_template, grad_hidden
