"""ragged_cache_write_: argument and bounds checks, the backend choice (not differentiable: no Function)."""

from __future__ import annotations

import torch

from hcr_kernels import _dispatch, _extension
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.kv_cache import native
from hcr_kernels.kv_cache.reference import ragged_cache_write_ref

__all__ = ["ragged_cache_write_", "check_write_bounds", "BACKEND_CHECKS"]

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _extension.require_native,
}


def ragged_cache_write_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
    *,
    check_bounds: bool = True,
    backend: str | None = None,
) -> None:
    """In place, for every row b: ``cache[b, :, start[b]:start[b]+count[b]] = states[b, :, :count[b]]``.

    ``key_cache``/``value_cache``: one layer's ``[B, H, S, Dh]`` caches (contiguous along
    Dh; they are written, so never copied). ``key_states``/``value_states``: the step's
    ``[B, H, T, Dh]`` new states, padded to the longest row. ``start``/``count``: int64
    ``[B]``: the first slot row b writes (below its current length for a crop) and how
    many of its T states are real (0 for a finished row). Every other slot keeps its
    value. Returns None.

    Bounds (``start >= 0``, ``0 <= count <= T``, ``start + count <= S``) raise a
    ``ValueError`` naming the row. The native CPU kernel checks them on the host for free;
    elsewhere they cost a few small ops and, on CUDA, a device-to-host sync, so a caller
    that writes every layer with the same ``start``/``count`` checks them once per step
    (``check_write_bounds``) and passes ``check_bounds=False`` (the CUDA kernel still
    asserts; the reference then must not be given bad bounds). Not differentiable.
    """
    _check_args(key_cache, value_cache, key_states, value_states, start, count)
    chosen = _dispatch.choose_backend("ragged_cache_write_", key_cache.device, backend, BACKEND_CHECKS)
    if check_bounds and not (chosen == "native" and key_cache.device.type == "cpu"):  # the CPU kernel checks them
        check_write_bounds(start, count, steps=key_states.shape[2], slots=key_cache.shape[2])
    if chosen == "reference":
        ragged_cache_write_ref(key_cache, value_cache, key_states, value_states, start, count)
        return
    native.ragged_cache_write_(key_cache, value_cache, key_states, value_states, start, count)


def check_write_bounds(start: torch.Tensor, count: torch.Tensor, *, steps: int, slots: int) -> None:
    """Raise ``ValueError`` naming the first row whose write leaves ``[0, S)`` or reads past T.

    Vectorised over rows: one device-to-host transfer (the ``any()``) on CUDA; on the CPU a few rows are
    checked as Python ints (the generator's per-step call: 1.7 against 11.2 us vectorised, one row).
    """
    if start.device.type == "cpu" and len(start) <= 64:
        firsts, numbers = start.tolist(), count.tolist()
        bad_rows = [row for row, (first, number) in enumerate(zip(firsts, numbers))
                    if first < 0 or not 0 <= number <= steps or first + number > slots]
        if not bad_rows:
            return
        row = bad_rows[0]
    else:
        bad = (start < 0) | (count < 0) | (count > steps) | (start > slots - count)  # start + count may wrap
        if not bool(bad.any()):
            return
        row = int(bad.nonzero()[0, 0])
    first, number = int(start[row]), int(count[row])
    if first < 0:
        raise ValueError(f"start[{row}] = {first} must be >= 0")
    if not 0 <= number <= steps:
        raise ValueError(f"count[{row}] = {number} must be in [0, T] = [0, {steps}] (T = key_states.shape[2])")
    raise ValueError(
        f"start[{row}] + count[{row}] = {first} + {number} = {first + number} exceeds the cache length "
        f"S = {slots} (key_cache.shape[2])"
    )


def _check_args(key_cache, value_cache, key_states, value_states, start, count) -> None:
    for name, value in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, value, dim=4, floating=True)
    for name, value in (("key_states", key_states), ("value_states", value_states)):
        check_tensor(name, value, dim=4, floating=True)
    for name, value in (("start", start), ("count", count)):
        check_tensor(name, value, dim=1, dtype=torch.int64)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache is {tuple(value_cache.shape)} but key_cache is {tuple(key_cache.shape)}")
    if value_states.shape != key_states.shape:
        raise ValueError(f"value_states is {tuple(value_states.shape)} but key_states is {tuple(key_states.shape)}")
    batch, heads, _, head_dim = key_cache.shape
    if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"key_states must be [B, H, T, Dh] = [{batch}, {heads}, T, {head_dim}] to match key_cache "
            f"{tuple(key_cache.shape)}, got {tuple(key_states.shape)}"
        )
    for name, value in (("start", start), ("count", count)):
        if value.shape[0] != batch:
            raise ValueError(f"{name} must be [B] = [{batch}], got {tuple(value.shape)}")
    check_same_device(
        key_cache=key_cache, value_cache=value_cache, key_states=key_states, value_states=value_states,
        start=start, count=count,
    )
    check_same_dtype(key_cache=key_cache, value_cache=value_cache, key_states=key_states, value_states=value_states)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if head_dim > 1 and cache.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous along Dh (stride 1 in its last dim; it is written in place), "
                f"got strides {cache.stride()}"
            )
