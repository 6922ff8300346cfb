"""A static KV cache whose rows have their own lengths, for transformers' decoder layers.

Rows of a compressed-generation batch start from different prompt lengths and
crop themselves back at different steps (a compression replaces W tokens by one
vector), so one shared ``cache_position`` cannot describe them. This cache
preallocates ``[B, H, S, Dh]`` per layer once; before each forward the caller
sets every row's write offset and count (``begin_step``), and each layer's
``update`` writes its new states there with ``hcr_kernels.ragged_cache_write_``
(all rows in one call). Attention then reads the first ``span`` slots, with the
caller's 4D mask hiding what a row must not see.

It implements the one method the decoder layers call, ``update``; the model gets
explicit ``position_ids`` and a ready mask, so nothing else is asked of it.
"""

from __future__ import annotations

import inspect

import torch

from hcr_kernels import ragged_cache_write_
from hcr_kernels.kv_cache import check_write_bounds


class RaggedStaticCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, slots: int, head_dim: int, *, dtype, device):
        shape = (batch, kv_heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.model_keyword = "past_key_values"  # the name the model's forward takes a cache by (for_model)
        self._start = self._count = None
        self._span = 0

    @classmethod
    def for_model(cls, model, batch: int, slots: int) -> "RaggedStaticCache":
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        cache = cls(config.num_hidden_layers, batch, kv_heads, slots, head_dim, dtype=model.dtype, device=model.device)
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name goes in 5.40)
        if "cache" in inspect.signature(model.forward).parameters:
            cache.model_keyword = "cache"
        return cache

    def grow(self, slots: int) -> None:
        """Room for ``slots`` slots per row (never fewer than now), keeping every state written so far.

        The generator starts small and doubles on demand, as a compressed layout stays far shorter than
        prompt + new tokens; new tensors, so not for CUDA graphs (which keep the first addresses)."""
        if slots <= self.slots:
            return
        for states in (self.keys, self.values):
            for layer, old in enumerate(states):
                batch, heads, _, head_dim = old.shape
                states[layer] = old.new_zeros(batch, heads, slots, head_dim)
                states[layer][:, :, : self.slots] = old
        self.slots = slots

    def begin_step(self, start: torch.Tensor, count: torch.Tensor, span: int) -> None:
        """Row b writes its ``count[b]`` new states at ``start[b]``; attention reads slots ``[0, span)``."""
        check_write_bounds(start, count, steps=max(count.tolist(), default=0), slots=self.slots)
        self._start, self._count, self._span = start, count, span

    def step_writes(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What ``begin_step`` set: each row's first slot and count of new states, and the span attention reads."""
        return self._start, self._count, self._span

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # the extra arguments (``cache_kwargs`` in older transformers, ``kwargs=`` in newer) say nothing a
        # static ragged cache needs: where to write was set by ``begin_step``
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        ragged_cache_write_(keys, values, key_states, value_states, self._start, self._count, check_bounds=False)
        return keys[:, :, : self._span], values[:, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span
