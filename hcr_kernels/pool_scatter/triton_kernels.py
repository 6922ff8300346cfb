"""Triton kernels of pool-rows: one program per (output row, block of D).

A row whose window index is >= 0 gets the fp32 mean of that window's W hidden
rows; any other row is a copy of the template. The backward spreads
``grad_out[row] / W`` over the window and, when asked, writes the template
gradient (the output gradient with the pooled rows zeroed). The launchers have
``native.py``'s names and signatures: the Function allocates, they launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 256


@triton.jit
def _pool_rows_fwd_kernel(
    template_ptr, window_of_row_ptr, hidden_ptr, out_ptr, D, W,
    HAS_TEMPLATE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < D
    window = tl.load(window_of_row_ptr + row)
    if window >= 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = hidden_ptr + window * W * D
        for k in range(0, W):
            acc += tl.load(base + k * D + cols, mask=in_row, other=0.0).to(tl.float32)
        mean = acc / W
        tl.store(out_ptr + row * D + cols, mean.to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        if HAS_TEMPLATE:
            values = tl.load(template_ptr + row * D + cols, mask=in_row)
            tl.store(out_ptr + row * D + cols, values, mask=in_row)


@triton.jit
def _pool_rows_bwd_kernel(
    grad_out_ptr, window_of_row_ptr, grad_hidden_ptr, grad_template_ptr, D, W,
    TEMPLATE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < D
    window = tl.load(window_of_row_ptr + row)
    grad = tl.load(grad_out_ptr + row * D + cols, mask=in_row, other=0.0)
    if window >= 0:
        share = (grad.to(tl.float32) / W).to(grad_hidden_ptr.dtype.element_ty)
        base = grad_hidden_ptr + window * W * D
        for k in range(0, W):
            tl.store(base + k * D + cols, share, mask=in_row)
        if TEMPLATE_GRAD:
            tl.store(grad_template_ptr + row * D + cols, tl.zeros_like(grad), mask=in_row)
    else:
        if TEMPLATE_GRAD:
            tl.store(grad_template_ptr + row * D + cols, grad, mask=in_row)


def _grid(rows: int, dim: int) -> tuple[int, int]:
    return (rows, triton.cdiv(dim, BLOCK_D))


def pool_rows_(template: torch.Tensor | None, window_of_row: torch.Tensor, hidden: torch.Tensor,
               out: torch.Tensor) -> None:
    """``native.pool_rows_``'s contract: writes ``out`` in place."""
    rows, window, dim = window_of_row.shape[0], hidden.shape[1], hidden.shape[2]
    if rows and dim:
        _pool_rows_fwd_kernel[_grid(rows, dim)](
            template if template is not None else out, window_of_row, hidden, out, dim, window,
            HAS_TEMPLATE=template is not None, BLOCK=BLOCK_D,
        )


def pool_rows_backward_(grad_out: torch.Tensor, window_of_row: torch.Tensor, grad_hidden: torch.Tensor,
                        grad_template: torch.Tensor | None) -> None:
    """``native.pool_rows_backward_``'s contract: writes ``grad_hidden`` (and ``grad_template``) in place."""
    rows, dim = grad_out.shape
    if rows and dim:
        _pool_rows_bwd_kernel[_grid(rows, dim)](
            grad_out, window_of_row, grad_hidden, grad_template if grad_template is not None else grad_out, dim,
            grad_hidden.shape[1], TEMPLATE_GRAD=grad_template is not None, BLOCK=BLOCK_D,
        )
