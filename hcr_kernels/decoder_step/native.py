"""Host wrapper of the compiled Qwen2 step (``torch.ops.hcr.qwen2_decoder_step``), and its fake."""

from __future__ import annotations

import torch

from hcr_kernels import _extension

# Looked up once: it is called once per step.
_op = torch.ops.hcr.qwen2_decoder_step.default if _extension.extension_loaded() else None


@_extension.register_fake("qwen2_decoder_step")
def _qwen2_decoder_step_fake(embeds, cos, sin, weights, key_caches, value_caches, start, count, span, positions,
                             native_buckets, eps, scales, windows, head_dim, final_norm, final_eps):
    return torch.empty_like(embeds)


def qwen2_decoder_step(embeds, cos, sin, packed, key_caches, value_caches, start, count, span: int,
                       positions) -> torch.Tensor:
    """``packed``: a ``Qwen2DecoderStack``'s flat lists (weights, row bucket masks, eps, scales, windows), head dim and
    final norm (weight or None, eps)."""
    weights, native_buckets, eps, scales, windows, head_dim, final_norm, final_eps = packed
    return _op(embeds, cos, sin, weights, key_caches, value_caches, start, count, span, positions, native_buckets, eps,
               scales, windows, head_dim, final_norm, final_eps)
