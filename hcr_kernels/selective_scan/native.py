"""Host wrappers of the compiled selective scan (``torch.ops.hcr.selective_scan_fwd`` / ``_bwd``), and their fakes.

The kernels take contiguous fp32 ``[batch, L, channels]`` sequences and ``[batch, G, L, N]``
B/C (the Function lays them out); their schemas are functional (the C++ allocates the
outputs), so these only launch. ``CHECKPOINT_SEGMENT`` is the kernels' own parameter.
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension

CHECKPOINT_SEGMENT = 64  # steps between saved states: memory L/64 states, one recompute


@_extension.register_fake("selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segment):
    batch, length, channels = u.shape
    segments = (length + segment - 1) // segment
    return torch.empty_like(u), u.new_empty((batch, segments, A.shape[1], channels))


@_extension.register_fake("selective_scan_bwd")
def _selective_scan_bwd_fake(
    grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus, segment, checkpoints, grad_last_state
):
    batch, length, channels = u.shape
    state, groups = A.shape[1], B.shape[1]
    chunks = (channels // groups + 31) // 32  # channels per task: kChunk = 32 in the kernel
    dB = u.new_empty((batch, groups, chunks, length, state))
    return [
        torch.empty_like(u),
        torch.empty_like(u),
        torch.empty_like(u) if z is not None else u.new_empty((0,)),
        u.new_empty((batch, state, channels)),
        dB,
        torch.empty_like(dB),
        u.new_empty((batch, channels)),
        u.new_empty((batch, channels)),
    ]


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
    """``(out [batch, L, channels], checkpoints [batch, segments, N, channels])``: the state every segment."""
    return torch.ops.hcr.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHECKPOINT_SEGMENT)


def selective_scan_bwd(grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, checkpoints, grad_last):
    """``[du, ddelta, dz, dA, dB, dC, dD, ddelta_bias]``; dA, dD and ddelta_bias per batch row, dB and dC per chunk
    of channels (the caller sums them)."""
    return torch.ops.hcr.selective_scan_bwd(
        grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHECKPOINT_SEGMENT, checkpoints, grad_last
    )
