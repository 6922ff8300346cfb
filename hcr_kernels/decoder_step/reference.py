"""The reference of ``qwen2_decoder_step``: the ops of transformers' Qwen2 decoder layers, in plain PyTorch.

The order and the operands of every op are those of ``Qwen2DecoderLayer.forward``,
``Qwen2RMSNorm.forward``, ``apply_rotary_pos_emb`` and ``Qwen2MLP.forward``. The three
ops the native step calls kernels for (the projections, the cache write, the attention)
come from ``ops``: torch-only references by default (the oracle), or hcr's native ops,
which the fused step must then match bit for bit (the test of the fusion itself).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from hcr_kernels.decode_attention.op import decode_attention
from hcr_kernels.kv_cache.op import ragged_cache_write_


class StepOps(NamedTuple):
    """The kernels of a step: ``linear(input, weight, bias, native_buckets)``, ``write(key_cache, value_cache,
    keys, values, start, count)`` (in place) and ``attend(query, keys, values, positions, scale, window)``."""

    linear: Callable
    write: Callable
    attend: Callable


# The cache write and the attention through the public ops' reference backends: their plain PyTorch, after the
# argument checks the native step makes in C++ (start, count, positions, the caches' shapes; without them a
# start of one row was broadcast to every row, and a position past the span attended to nothing without a word).
REFERENCE_OPS = StepOps(
    linear=lambda input, weight, bias, native_buckets: F.linear(input, weight, bias),
    write=lambda *args: ragged_cache_write_(*args, backend="reference"),
    attend=lambda query, keys, values, positions, scale, window: decode_attention(
        query, keys, values, positions, scale=scale, sliding_window=window or None, backend="reference"),
)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen2RMSNorm.forward``: the square mean in fp32, the weight times the normed states in their dtype."""
    states = hidden.to(torch.float32)
    variance = states.pow(2).mean(-1, keepdim=True)
    states = states * torch.rsqrt(variance + eps)
    return weight * states.to(hidden.dtype)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on one of query / key ``[B, H, T, D]`` (``cos``/``sin`` ``[B, 1, T, D]``)."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


def qwen2_decoder_step_ref(embeds, cos, sin, layers, key_caches, value_caches, start, count, span: int, positions,
                           *, head_dim: int, final_norm: torch.Tensor | None = None, final_eps: float = 1e-6,
                           ops: StepOps = REFERENCE_OPS) -> torch.Tensor:
    """The hidden states after every layer (and the final norm, given its weight); the caches written in place.

    ``layers``: a ``Qwen2LayerWeights`` per layer; the arguments otherwise as ``Qwen2DecoderStack.step``'s.
    """
    linear = ops.linear
    batch, steps, _ = embeds.shape
    heads = (batch, steps, -1, head_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    hidden = embeds
    for layer, keys, values in zip(layers, key_caches, value_caches):
        q_mask, k_mask, v_mask, o_mask, gate_mask, up_mask, down_mask = layer.native_buckets
        normed = rms_norm(hidden, layer.input_norm, layer.input_eps)
        query = linear(normed, layer.q, layer.q_bias, q_mask).view(heads).transpose(1, 2)
        key = linear(normed, layer.k, layer.k_bias, k_mask).view(heads).transpose(1, 2)
        value = linear(normed, layer.v, layer.v_bias, v_mask).view(heads).transpose(1, 2)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        ops.write(keys, values, key, value, start, count)
        attended = ops.attend(query, keys[:, :, :span], values[:, :, :span], positions, layer.scale,
                              layer.sliding_window)
        hidden = hidden + linear(attended.reshape(batch, steps, -1).contiguous(), layer.o, None, o_mask)
        normed = rms_norm(hidden, layer.post_norm, layer.post_eps)
        gated = F.silu(linear(normed, layer.gate, None, gate_mask)) * linear(
            normed, layer.up, None, up_mask)
        hidden = hidden + linear(gated, layer.down, None, down_mask)
    return hidden if final_norm is None else rms_norm(hidden, final_norm, final_eps)
