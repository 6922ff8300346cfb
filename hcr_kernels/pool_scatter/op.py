"""window_mean_pool and pool_scatter: argument checks, the backend choice, the autograd Function."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hcr_kernels import _dispatch, _extension
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.pool_scatter import native
from hcr_kernels.pool_scatter.reference import pool_scatter_ref, window_mean_pool_ref

__all__ = ["window_mean_pool", "pool_scatter", "PoolRowsFunction", "BACKEND_CHECKS", "launchers"]

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _extension.require_native,
    "triton": _dispatch.require_triton,
}


def launchers(backend: str):
    """The backend's module of launchers (same names in both); Triton's is imported at first use: it is optional."""
    if backend == "triton":
        from hcr_kernels.pool_scatter import triton_kernels

        return triton_kernels
    return native


class PoolRowsFunction(torch.autograd.Function):
    """``out[r] = mean(hidden[window_of_row[r]])`` if ``window_of_row[r] >= 0`` else ``template[r]``.

    Allocates the output and the gradients; the backend's launchers only fill them.
    """

    @staticmethod
    def forward(ctx, template, window_of_row, hidden, backend):
        out = hidden.new_empty((window_of_row.shape[0], hidden.shape[2]))
        launchers(backend).pool_rows_(template, window_of_row, hidden, out)
        ctx.save_for_backward(window_of_row)
        ctx.backend = backend
        ctx.hidden_shape = hidden.shape
        ctx.has_template = template is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (window_of_row,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_hidden = grad_out.new_empty(ctx.hidden_shape)
        grad_template = torch.empty_like(grad_out) if ctx.has_template and ctx.needs_input_grad[0] else None
        launchers(ctx.backend).pool_rows_backward_(grad_out, window_of_row, grad_hidden, grad_template)
        return grad_template, None, grad_hidden if ctx.needs_input_grad[2] else None, None


def _check_hidden(hidden) -> None:
    check_tensor("hidden", hidden, dim=3, floating=True)
    if hidden.shape[1] == 0:
        raise ValueError(f"hidden must be [N, W, D] with a window W >= 1, got shape {tuple(hidden.shape)}")


def window_mean_pool(hidden: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean over each window: ``[N, W, D] -> [N, D]``, fp32 accumulation, output in ``hidden.dtype``.

    ``backend``: ``"reference" | "native" | "triton"``, or None for ``HCR_BACKEND`` / the
    fastest available. Differentiable.
    """
    _check_hidden(hidden)
    chosen = _dispatch.choose_backend("window_mean_pool", hidden.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return window_mean_pool_ref(hidden)
    window_of_row = torch.arange(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    return PoolRowsFunction.apply(None, window_of_row, hidden.contiguous(), chosen)


def pool_scatter(
    template: torch.Tensor, slot_mask: torch.Tensor, hidden: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Return ``template`` with its ``True`` slots replaced by ``window_mean_pool(hidden)``.

    ``template`` is ``[B, T, D]`` (the main model's input embeddings), ``slot_mask`` a bool
    ``[B, T]`` marking the placeholder slots, ``hidden`` the pooler's ``[N, W, D]`` last
    hidden states, one window per slot: the i-th ``True`` slot in row-major order gets
    window i. Exactly ``template.masked_scatter(slot_mask[..., None], pooled)``, with
    ``N`` required to equal the number of slots. Differentiable in ``template`` and
    ``hidden``; ``template`` itself is not modified.
    """
    check_tensor("template", template, dim=3, floating=True)
    check_tensor("slot_mask", slot_mask, dtype=torch.bool)
    _check_hidden(hidden)
    if tuple(slot_mask.shape) != tuple(template.shape[:2]):
        raise ValueError(
            f"slot_mask must be [B, T] = {tuple(template.shape[:2])} to match template {tuple(template.shape)}, "
            f"got {tuple(slot_mask.shape)}"
        )
    if hidden.shape[2] != template.shape[2]:
        raise ValueError(f"hidden has D={hidden.shape[2]} but template has D={template.shape[2]}")
    check_same_device(template=template, slot_mask=slot_mask, hidden=hidden)
    check_same_dtype(hidden=hidden, template=template)
    window_of_row, slots = _window_of_row(slot_mask)
    _check_slot_count(slots, hidden.shape[0])
    chosen = _dispatch.choose_backend("pool_scatter", template.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return pool_scatter_ref(template, slot_mask, hidden)
    batch, length, dim = template.shape
    flat_template = template.contiguous().view(batch * length, dim)
    out = PoolRowsFunction.apply(flat_template, window_of_row, hidden.contiguous(), chosen)
    return out.view(batch, length, dim)


def _window_of_row(slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major rank of each True slot (its window index), -1 elsewhere; and the slot count, a 0-d tensor
    (left on the device, so that tracing needs no data-dependent size: the caller knows N from ``hidden``)."""
    flat = slot_mask.reshape(-1)
    rank = torch.cumsum(flat, dim=0, dtype=torch.int64)
    slots = rank[-1:].sum()  # the last rank, or 0 for an empty mask, without a branch
    return torch.where(flat, rank - 1, torch.full_like(rank, -1)), slots


def _check_slot_count(slots: torch.Tensor, windows: int) -> None:
    """One window per slot. Eager raises ValueError naming both counts. Under torch.compile reading ``slots``
    out would break the graph, so the check becomes an in-graph assert (raises RuntimeError on CPU, a
    device-side assert on CUDA) with a message that cannot show the data-dependent count."""
    if torch.compiler.is_compiling():
        torch._assert_async(slots == windows, "slot_mask's True slots must equal hidden's N windows (pool_scatter)")
    elif int(slots) != windows:
        raise ValueError(
            f"slot_mask has {int(slots)} True slots but hidden has N={windows} windows; they must be equal"
        )
