"""The embed pooler's pass over a step's windows as one native call, where that is faster.

Each compression runs the pooler (a small Qwen2 stack) over the new windows. Through
transformers that is a model forward per step, ~1.7 ms for 50 windows of W = 2 on an
Intel Xeon, a quarter of the demo's W = 2 generation time: mostly Python around a few
small matmuls. ``NativePooling`` runs the same layers as one ``hcr_kernels.Qwen2DecoderStack``
step over a scratch cache of W slots per window (every window a fresh sequence at positions
0..W-1), the same ops in the same order except attention, which takes hcr's
``decode_attention`` instead of the pooler's own (SDPA): the hidden states agree to rounding
(tests), not bit for bit. ``CompressedGenerator`` uses it in both strategies when its decode
kernels are on, so the fast path and the recompute oracle still pool identically; it is taken
per shape class only where the autotuner measured it faster than the pooler's forward.
"""

from __future__ import annotations

import sys

import torch

from hcr.generation.direct_forward import _call, native_stack, plain_decoder
from hcr_kernels import autotune


class NativePooling:
    """The pooler's last hidden states ``[N, W, H]`` of ``window_ids`` ``[N, W]`` through one native call."""

    def __init__(self, model, stack):
        pooler = model.pooler
        self.stack, self.window = stack, model.config.window
        self.table = model.window_token_embeddings()
        self.rotary = _call(pooler.model.rotary_emb)
        self.final_norm = None if stack.final_norm is not None else pooler.model.norm
        self.projection = pooler.projection
        self.reference = model._window_hidden_states  # what the native call stands for
        self._rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin at positions 0..W-1
        self._wins: dict[int, bool] = {}  # per window-count class: whether the native call was faster

    @classmethod
    def for_model(cls, model) -> NativePooling | None:
        """A ``NativePooling`` of ``model``'s pooler, or None where its forward must run: a pooler that is not
        hcr's ``EmbedPooler`` over transformers' own Qwen2 classes, a hook on a module the call bypasses,
        a layer the native step does not take (a LoRA layer: merge the adapter first), no compiled kernels.
        Build it where the modules no longer change (inside a ``decode_linears`` block)."""
        from hcr.compression.model import CompressionModel
        from hcr.compression.pooler import EmbedPooler

        if not isinstance(model, CompressionModel) or type(model.pooler) is not EmbedPooler:
            return None
        pooler = model.pooler
        qwen2 = sys.modules.get("transformers.models.qwen2.modeling_qwen2")
        # the projection is called as a module (its hooks and a decode_linears route run), the pooler is not
        if qwen2 is None or not plain_decoder(pooler.model, qwen2, also_bypassed=[pooler]):
            return None
        stack = native_stack(pooler.model, pooler.config, qwen2)
        return None if stack is None else cls(model, stack)

    def __call__(self, window_ids: torch.Tensor) -> torch.Tensor:
        """The hidden states the pooler's forward gives (to rounding), through the native call where it was
        measured faster for this many windows, else through that forward."""
        count = window_ids.shape[0]
        if count == 0:
            return self.reference(window_ids)
        bucket = 1 << (count - 1).bit_length()  # shape classes by powers of two: few measurements
        if bucket not in self._wins:
            self._wins[bucket] = self._measure(window_ids.new_zeros(bucket, self.window))
        return self.native(window_ids) if self._wins[bucket] else self.reference(window_ids)

    def native(self, window_ids: torch.Tensor) -> torch.Tensor:
        """The native call, whatever the measurement said (tests, the measurement itself)."""
        stack, count, window = self.stack, window_ids.shape[0], self.window
        embeds = self.table(window_ids).to(stack.dtype)
        if self._rotation is None:
            self._rotation = self.rotary(embeds[:1], torch.arange(window)[None])
        cos, sin = self._rotation
        caches = [embeds.new_empty(count, stack.kv_heads, window, stack.head_dim) for _ in range(2 * len(stack.layers))]
        start = torch.zeros(count, dtype=torch.long)
        positions = torch.arange(window).expand(count, window)
        hidden = stack.step(embeds, cos.expand(count, -1, -1), sin.expand(count, -1, -1), caches[::2], caches[1::2],
                            start, torch.full((count,), window, dtype=torch.long), window, positions, backend="native")
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.projection(hidden) if self.projection is not None else hidden

    def _measure(self, window_ids: torch.Tensor) -> bool:
        stack = self.stack
        shape_class = (f"{str(stack.dtype).removeprefix('torch.')} N={window_ids.shape[0]} W={self.window} "
                       f"hidden={stack.hidden} layers={len(stack.layers)}")
        return autotune.fast_path_wins("pooler_step", shape_class, lambda: self.native(window_ids),
                                       lambda: self.reference(window_ids))
