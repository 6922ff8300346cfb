"""Plain PyTorch ragged KV-cache write: the oracle of the native kernels and the fallback.

No Python loop over rows: a ``[B, S]`` mask of the slots each row writes and a
``[B, T]`` mask of its real new states select the same number of entries per row,
in the same order, so one masked assignment per cache does the whole batch (the
same idea as mamba's ``_update_kv_cache``, with per-row offsets).
"""

from __future__ import annotations

import torch


def ragged_cache_write_ref(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
) -> None:
    """In place: ``cache[b, :, start[b]:start[b]+count[b]] = states[b, :, :count[b]]`` for both caches."""
    slots = torch.arange(key_cache.shape[2], device=key_cache.device)
    steps = torch.arange(key_states.shape[2], device=key_states.device)
    start, count = start[:, None], count[:, None]
    target = (slots >= start) & (slots < start + count)  # [B, S]: the slots row b writes, in order
    source = steps < count  # [B, T]: its real new states, in the same order
    for cache, states in ((key_cache, key_states), (value_cache, value_states)):
        cache.transpose(1, 2)[target] = states.transpose(1, 2)[source]
