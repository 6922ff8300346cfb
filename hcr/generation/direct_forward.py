"""A cached step of a Qwen2 base model without transformers' wrappers around its forward.

On a CPU a small model's decode step is mostly Python: transformers' forward goes
through decorators (keyword deprecation, config defaults, output capture), a model
output dataclass per level, and a module call per decoder layer, attention block and
MLP, each with its own checks. ``direct_forward`` runs the same arithmetic by calling
the layers' own submodules in the order ``Qwen2DecoderLayer.forward`` does (the norms,
the projections, ``apply_rotary_pos_emb``, the cache's ``update``, the attention
function transformers would pick, the MLP, the final norm and the lm_head), so the
logits are bit for bit those of ``base(...)``: tests compare the two, and
``CompressedGenerator`` compares them again at its first decode step and goes back to
``base(...)`` (with a warning) if they ever differ. Everything a submodule carries
stays in effect: ``decode_linears``' routed projections, a kernel-hub norm, LoRA layers.

Only a model built from transformers' own Qwen2 classes qualifies (``supports``), with
per-layer attention kinds in its config (``layer_types``, transformers 4.53+), and only
while nothing hooks the modules it does not call (the model, its decoder stack, layers
and attention blocks: a forward hook or pre-hook, a global one, a ``forward`` replaced on
the instance as accelerate's offloading does), since those would silently not run; any
other model takes ``base(...)``.
"""

from __future__ import annotations

import sys

import torch


def supports(base: torch.nn.Module) -> bool:
    """Whether ``direct_forward`` reproduces ``base``'s forward: transformers' own ``Qwen2ForCausalLM``, its
    decoder layers, attention and MLP classes unchanged, and ``layer_types`` in the config."""
    try:
        from transformers.models.qwen2 import modeling_qwen2 as qwen2
    except ImportError:
        return False
    if type(base) is not qwen2.Qwen2ForCausalLM or type(base.model) is not qwen2.Qwen2Model:
        return False
    if getattr(base.config, "layer_types", None) is None or not hasattr(qwen2, "apply_rotary_pos_emb"):
        return False
    attention_attributes = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "sliding_window",
                            "attention_dropout")
    layers = base.model.layers
    if len(layers) != base.config.num_hidden_layers or not all(
        type(layer) is qwen2.Qwen2DecoderLayer and type(layer.self_attn) is qwen2.Qwen2Attention
        and type(layer.mlp) is qwen2.Qwen2MLP and all(hasattr(layer.self_attn, name) for name in attention_attributes)
        for layer in layers
    ):
        return False
    bypassed = [base, base.model, *layers, *(layer.self_attn for layer in layers)]
    return not _global_hooks() and not any(_hooked(module) for module in bypassed)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def direct_forward(base, embeds: torch.Tensor, positions: torch.Tensor, masks, cache, logits_to_keep=0,
                   **attention_kwargs) -> torch.Tensor:
    """The logits of ``base(inputs_embeds=embeds, position_ids=positions, attention_mask=masks, <cache>,
    logits_to_keep=logits_to_keep, **attention_kwargs)`` for a model ``supports`` accepts.

    ``masks``: one additive mask ``[B, 1, steps, span]`` or a dict of them keyed by attention kind
    (``config.layer_types``' values); ``cache``: anything with transformers' ``update(key, value, layer)``;
    ``attention_kwargs``: passed to every attention call (a ``RaggedAttention`` block's step).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    qwen2 = sys.modules[type(base).__module__]
    model, config = base.model, base.config
    batch, steps, _ = embeds.shape
    cos, sin = model.rotary_emb(embeds, positions)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, qwen2.eager_attention_forward)
    hidden = embeds
    for index, layer in enumerate(model.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        heads = (batch, steps, -1, attention.head_dim)
        query = attention.q_proj(normed).view(heads).transpose(1, 2)
        key = attention.k_proj(normed).view(heads).transpose(1, 2)
        value = attention.v_proj(normed).view(heads).transpose(1, 2)
        query, key = qwen2.apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, index)
        mask = masks[config.layer_types[index]] if isinstance(masks, dict) else masks
        attended, _ = attend(attention, query, key, value, mask,
                             dropout=attention.attention_dropout if attention.training else 0.0,
                             scaling=attention.scaling, sliding_window=attention.sliding_window, **attention_kwargs)
        hidden = hidden + attention.o_proj(attended.reshape(batch, steps, -1).contiguous())
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = model.norm(hidden)
    keep = getattr(qwen2, "slice_logits_to_keep", None)
    if keep is not None:
        hidden = keep(hidden, logits_to_keep)
    else:  # transformers < 5 sliced inline: an int keeps the last n positions (0: all), a tensor those positions
        hidden = hidden[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep, :]
    return base.lm_head(hidden)
