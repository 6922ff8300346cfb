"""The attention of compressed generation's cached steps: ``hcr_kernels.decode_attention`` where it wins.

A decode step's attention reads every cached key and value once per query: on CPU it is
bound by how fast they stream, and the compressed layout still grows by one slot per
window, so over a long generation it comes to outweigh the model's matmuls (the soak
benchmark). transformers' SDPA path reads them at about half a plain read's bandwidth
and, for a re-encode step's few queries under a mask, first copies them once per query
head (``repeat_kv``); the native kernel reads them once per row and key/value head.

``RaggedAttention(base)`` is a ``with`` block around a generation: it registers one
attention function with transformers' ``AttentionInterface`` and points the base
model's config at it, restoring the config's own implementation on exit. A forward then
passes ``step_kwargs(positions)``; each layer's call takes the native kernel when

* the step has at most ``BLOCK_QUERIES`` query rows per key/value head (a decode or
  re-encode step; a prefill takes the model's own attention, whose matmuls win there),
* the dtype is one the kernel has, and the tensors are on the CPU, and
* the kernel was measured faster than the model's own attention at that shape class on
  this machine (``hcr_kernels.autotune``: a step's calls, one per layer, each over a
  1,024-slot cache; cached; off with ``HCR_AUTOTUNE=0``),

and the model's own implementation otherwise. Every forward inside the block must pass
its masks (as the cached steps do): transformers builds none for the registered name.
It needs transformers' attention interface (4.48+); without it the block changes nothing. Cache slot i must hold
position i (``RaggedStaticCache``'s convention): the kernel takes visibility from the
positions, not from the mask (which the other path still uses).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from hcr_kernels import _extension, autotune
from hcr_kernels.decode_attention import BLOCK_QUERIES, NATIVE_DTYPES, decode_attention

NAME = "hcr_ragged_decode"
KEYWORD = "hcr_ragged"  # the forward keyword a step's RaggedStep travels under, down to the attention calls
AUTOTUNE_SLOTS = 1024  # the cache length the decision is measured at: where attention's cost shows


@dataclass
class RaggedStep:
    """What one forward's attention calls need beyond their arguments."""

    owner: RaggedAttention
    positions: torch.Tensor  # [B, T] int64: the cache slot of each query


class RaggedAttention:
    """Route a base model's attention through ``decode_attention`` inside a ``with`` block (see the module)."""

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.config = base.config
        self.original = None  # the config's own implementation while the block is open
        self.fallback = None
        self._wins: dict[tuple, bool] = {}

    @staticmethod
    def available(base: torch.nn.Module) -> bool:
        """Whether the block can route ``base``: transformers' attention interface, a CPU model, ``_C`` loaded."""
        try:
            from transformers import AttentionInterface  # noqa: F401
        except ImportError:
            return False
        return (hasattr(base.config, "_attn_implementation") and base.device.type == "cpu"
                and _extension.extension_loaded())

    def __enter__(self) -> RaggedAttention:
        if not self.available(self.base):
            return self
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        AttentionInterface.register(NAME, _attention_forward)
        self.original = self.config._attn_implementation
        self.fallback = ALL_ATTENTION_FUNCTIONS.get_interface(self.original or "eager", eager_attention_forward)
        self.config._attn_implementation = NAME
        return self

    def __exit__(self, *exc) -> None:
        if self.fallback is not None:
            self.config._attn_implementation = self.original
            self.original = self.fallback = None

    def step_kwargs(self, positions: torch.Tensor) -> dict:
        """The keyword arguments a forward inside the block passes (none outside it)."""
        return {KEYWORD: RaggedStep(self, positions)} if self.fallback is not None else {}

    def native_wins(self, module, query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether this layer's call takes the kernel (the rules in the module docstring); one dict
        lookup per call after the first of a shape class."""
        batch, heads, steps, head_dim = query.shape
        kv_heads = key.shape[1]
        shape = (query.dtype, batch, heads, kv_heads, steps, head_dim)
        if shape not in self._wins:
            self._wins[shape] = (
                query.device.type == "cpu" and query.dtype in NATIVE_DTYPES
                and steps * (heads // kv_heads) <= BLOCK_QUERIES
                and autotune.fast_path_wins("decode_attention",
                                            _shape_class(query, kv_heads, self.config.num_hidden_layers),
                                            *self._measured_calls(module, query, kv_heads)))
        return self._wins[shape]

    def _measured_calls(self, module, query: torch.Tensor, kv_heads: int):
        """The two paths on synthetic inputs of the call's shape class: one call per layer, each over its own
        ``AUTOTUNE_SLOTS``-slot cache, as in a step (one layer's cache alone can sit in the CPU's caches and
        hide what streaming them costs). The inputs are made by the first call, so a decision already
        cached (in memory or on disk) allocates nothing."""
        batch, heads, steps, head_dim = query.shape
        scale = head_dim**-0.5

        @functools.cache
        def inputs():
            generator = torch.Generator().manual_seed(0)
            caches = [[torch.randn(batch, kv_heads, AUTOTUNE_SLOTS, head_dim, generator=generator).to(query.dtype)
                       for _ in range(2)] for _ in range(self.config.num_hidden_layers)]
            queries = torch.randn(query.shape, generator=generator).to(query.dtype)
            positions = AUTOTUNE_SLOTS - steps + torch.arange(steps).expand(batch, steps)
            return caches, queries, positions, causal_mask(positions, AUTOTUNE_SLOTS, query.dtype)

        def fast():
            caches, queries, positions, _ = inputs()
            for keys, values in caches:
                decode_attention(queries, keys, values, positions, scale=scale, backend="native")

        def reference():
            caches, queries, _, mask = inputs()
            for keys, values in caches:
                self.fallback(module, queries, keys, values, mask, scaling=scale, dropout=0.0)

        return fast, reference


def causal_mask(positions: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[B, 1, T, span]`` of queries at ``positions`` ``[B, T]`` over cache slots
    ``[0, span)`` (slot i holds position i): 0 where a slot is at or before the query, the dtype's
    minimum after it. What the model's own attention reads; the kernel takes the positions."""
    visible = torch.arange(span, device=positions.device)[None, None, :] <= positions[:, :, None]
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


def _shape_class(query: torch.Tensor, kv_heads: int, layers: int) -> str:
    batch, heads, steps, head_dim = query.shape
    return (f"{str(query.dtype).removeprefix('torch.')} B={batch} Hq={heads} Hkv={kv_heads} T={steps} D={head_dim} "
            f"S={AUTOTUNE_SLOTS} layers={layers}")


def _attention_forward(module, query, key, value, attention_mask, *, scaling=None, sliding_window=None, **kwargs):
    """The function registered as ``NAME``: the kernel where ``RaggedAttention.native_wins``, else the
    model's own implementation (or SDPA, for a call that did not come from a ``RaggedAttention`` block)."""
    step = kwargs.pop(KEYWORD, None)
    if step is not None and step.owner.native_wins(module, query, key):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, step.positions, scale=scale, sliding_window=sliding_window,
                                backend="native"), None
    if step is not None:
        fallback = step.owner.fallback
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback
    return fallback(module, query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window,
                    **kwargs)
