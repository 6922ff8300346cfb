"""Plain PyTorch decode attention: the oracle of the native kernel and the fallback."""

from __future__ import annotations

import torch


def decode_attention_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over each query's visible slots, in fp32 (fp64 for fp64); ``[B, T, Hq, D]`` in the query's dtype.

    Query t of row b sees slots ``(positions[b, t] - sliding_window, positions[b, t]]`` (from 0 without
    a window); key/value head h serves query heads ``h * G .. h * G + G - 1`` (G = Hq / Hkv). Values in slots no
    query of a row sees are not read, as the kernel does not read them: a cache's unwritten slots may hold
    anything, and a NaN there had made every output of the row NaN (0 * NaN in the product below).
    """
    math = torch.promote_types(query.dtype, torch.float32)  # fp32 for 16-bit inputs, fp64 stays fp64
    groups = query.shape[1] // keys.shape[1]
    keys = keys.to(math).repeat_interleave(groups, dim=1)
    values = values.to(math).repeat_interleave(groups, dim=1)
    scores = query.to(math) @ keys.transpose(-1, -2) * scale  # [B, Hq, T, S]
    slot = torch.arange(keys.shape[2], device=keys.device)[None, None, :]
    visible = slot <= positions[:, :, None]
    if sliding_window:
        visible &= slot > positions[:, :, None] - sliding_window
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    values = values.masked_fill(~visible.any(1)[:, None, :, None], 0)
    return (scores.softmax(-1) @ values).transpose(1, 2).to(query.dtype)
