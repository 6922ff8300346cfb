"""The public op: argument checks and the backend choice (inference only: no autograd Function)."""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from hcr_kernels import _dispatch, _extension
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.decode_attention import native
from hcr_kernels.decode_attention.reference import decode_attention_ref

__all__ = ["decode_attention", "BACKEND_CHECKS", "NATIVE_DTYPES", "BLOCK_QUERIES", "chunk_slots", "chunk_slots_set_to"]

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("decode_attention", "reference"),
}
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Query rows (query heads of a group x steps) the native kernel scores in one pass over a row's
# cache (kBlockQueries in csrc/decode_attention_cpu.cpp, read from the build): more take one
# pass per block. 0 without the compiled extension (there is no native kernel to block for).
BLOCK_QUERIES = _extension._C.DECODE_ATTENTION_BLOCK_QUERIES if _extension.extension_loaded() else 0


def chunk_slots(head_dim: int, dtype: torch.dtype) -> int:
    """Slots of a span the native kernel scores and sums per chunk (its keys and values stay in this core's
    L2 between the two passes), for cache rows of ``head_dim`` values of ``dtype``: the kernel's own rule."""
    _extension.require_native(torch.device("cpu"))
    return _extension._C.decode_attention_chunk_slots(head_dim * dtype.itemsize)


@contextlib.contextmanager
def chunk_slots_set_to(slots: int):
    """For tests: the native kernel takes spans in chunks of ``slots`` slots inside the block (any size is
    correct; a few slots make small spans cross chunk boundaries), its L2 rule again after."""
    _extension.require_native(torch.device("cpu"))
    if slots < 1:
        raise ValueError(f"chunk_slots_set_to: slots must be >= 1, got {slots}")
    _extension._C.decode_attention_set_chunk_slots(slots)
    try:
        yield
    finally:
        _extension._C.decode_attention_set_chunk_slots(0)


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of a step's queries over a ragged cache: ``[B, T, Hq, D]`` in the query's dtype.

    ``query`` ``[B, Hq, T, D]``; ``keys``/``values`` ``[B, Hkv, S, D]`` (views of a larger cache are
    fine: any strides, stride 1 along D), ``Hq`` a multiple of ``Hkv`` (grouped-query attention);
    ``positions`` int64 ``[B, T]``: query t of row b sits at cache slot ``positions[b, t]`` and sees
    the slots up to it, the last ``sliding_window`` of them with a window. Positions outside
    ``[0, S)`` raise a ``ValueError`` naming the entry. fp32 softmax and sums. Not differentiable.
    """
    if not _common_case(query, keys, values, positions, scale, sliding_window):
        # raises, naming what is wrong, or passes an uncommon case (a numpy scale, say) in the kernel's types
        scale, sliding_window = _check_args(query, keys, values, positions, scale, sliding_window)
    elif backend == "native" and query.dtype in NATIVE_DTYPES and _extension.extension_loaded():
        # what choose_backend decides for CPU tensors: the generator's call per layer per step takes this line
        return native.decode_attention(query, keys, values, positions, scale, sliding_window)
    chosen = _dispatch.choose_backend("decode_attention", query.device, backend, BACKEND_CHECKS)
    if chosen == "native" and query.dtype not in NATIVE_DTYPES:
        if backend == "native":
            raise TypeError(f"decode_attention: backend 'native' takes {NATIVE_DTYPES}, got {query.dtype}")
        chosen = "reference"
    if chosen == "native":  # the kernel checks the positions itself (a ValueError, as _check_positions)
        return native.decode_attention(query, keys, values, positions, scale, sliding_window)
    _check_positions(positions, keys.shape[2])
    return decode_attention_ref(query, keys, values, positions, scale=scale, sliding_window=sliding_window)


def _common_case(query, keys, values, positions, scale=1.0, sliding_window=None) -> bool:
    """Whether the arguments are CPU tensors that pass every check of ``_check_args``, in one expression:
    the generator calls this op per layer per step, after the kernel streamed the cache through the CPU's
    caches, where the full checks cost ~10 us a call (the tiny model at 256 slots: 20 % of a step's attention)."""
    if not (isinstance(query, torch.Tensor) and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
            and isinstance(positions, torch.Tensor)):
        return False
    q, k = query.shape, keys.shape
    return (len(q) == 4 and len(k) == 4 and values.shape == k and k[0] == q[0] and k[3] == q[3] and k[1] > 0
            and q[1] % k[1] == 0 and positions.shape == (q[0], q[2]) and positions.dtype == torch.int64
            and query.dtype == keys.dtype == values.dtype and query.is_floating_point()
            and (q[3] <= 1 or query.stride(3) == keys.stride(3) == values.stride(3) == 1)
            and query.is_cpu and keys.is_cpu and values.is_cpu and positions.is_cpu
            and not (query.requires_grad or keys.requires_grad or values.requires_grad)
            and type(scale) is float and math.isfinite(scale)
            and (sliding_window is None or type(sliding_window) is int and sliding_window > 0))


def _check_args(query, keys, values, positions, scale=1.0, sliding_window=None) -> tuple[float, int | None]:
    """Raises, naming the argument, unless the arguments are good; returns ``scale`` and ``sliding_window`` as
    the kernel takes them (a float; None or an int)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"decode_attention: scale must be a finite real number (the softmax scale, usually "
                         f"head_dim ** -0.5), got {scale!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or
                                       not isinstance(sliding_window, numbers.Integral) or sliding_window < 1):
        raise ValueError(f"decode_attention: sliding_window must be None (no window) or an int >= 1, "
                         f"got {sliding_window!r}")
    for name, value in (("query", query), ("keys", keys), ("values", values)):
        check_tensor(name, value, dim=4, floating=True)
    check_tensor("positions", positions, dim=2, dtype=torch.int64)
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad or values.requires_grad):
        raise RuntimeError("decode_attention is inference only (no gradients): call it under torch.no_grad()")
    batch, heads, steps, head_dim = query.shape
    if values.shape != keys.shape:
        raise ValueError(f"values is {tuple(values.shape)} but keys is {tuple(keys.shape)}")
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys must be [B, Hkv, S, D] = [{batch}, Hkv, S, {head_dim}] to match query "
                         f"{tuple(query.shape)}, got {tuple(keys.shape)}")
    if keys.shape[1] == 0 or heads % keys.shape[1]:
        raise ValueError(f"query's heads ({heads}) must be a multiple of keys' heads ({keys.shape[1]})")
    if positions.shape != (batch, steps):
        raise ValueError(f"positions must be [B, T] = [{batch}, {steps}], got {tuple(positions.shape)}")
    check_same_device(query=query, keys=keys, values=values, positions=positions)
    check_same_dtype(query=query, keys=keys, values=values)
    for name, tensor in (("query", query), ("keys", keys), ("values", values)):
        if head_dim > 1 and tensor.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous along D (stride 1 in its last dimension; views of a larger "
                             f"cache are fine), got strides {tuple(tensor.stride())}")
    return float(scale), None if sliding_window is None else int(sliding_window)


def _check_positions(positions: torch.Tensor, slots: int) -> None:
    bad = (positions < 0) | (positions >= slots)
    if positions.numel() and bool(bad.any()):
        row, step = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"decode_attention: positions[{row}, {step}] = {int(positions[row, step])} must be a slot "
                         f"of the cache, in [0, S) = [0, {slots})")
