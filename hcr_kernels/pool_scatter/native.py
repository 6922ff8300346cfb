"""Host wrappers of the compiled pool-rows kernels (``torch.ops.hcr.pool_rows_``, ``pool_rows_backward_``) and fakes.

Why the C++ name is not ``pool_scatter``: ``pool_rows_`` takes a per-row window index
(``window_of_row[r]``, -1 for a template row), a lower-level contract than
``pool_scatter``'s ``slot_mask`` that also serves ``window_mean_pool`` (no template,
row r pools window r). The mask-to-index step stays in Python (``op._window_of_row``).

The autograd Function allocates every buffer; these only launch, in place.
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension


@_extension.register_fake("pool_rows_")
def _pool_rows_fake(template_, window_of_row, hidden, out):
    """Under torch.compile: the op only writes ``out`` in place (declared in its schema)."""
    return None


@_extension.register_fake("pool_rows_backward_")
def _pool_rows_backward_fake(grad_out, window_of_row, grad_hidden, grad_template):
    """Writes ``grad_hidden`` (and ``grad_template``) in place; returns nothing."""
    return None


def pool_rows_(template: torch.Tensor | None, window_of_row: torch.Tensor, hidden: torch.Tensor,
               out: torch.Tensor) -> None:
    torch.ops.hcr.pool_rows_(template, window_of_row, hidden, out)


def pool_rows_backward_(grad_out: torch.Tensor, window_of_row: torch.Tensor, grad_hidden: torch.Tensor,
                        grad_template: torch.Tensor | None) -> None:
    torch.ops.hcr.pool_rows_backward_(grad_out, window_of_row, grad_hidden, grad_template)
