"""A cached step of a Qwen2 base model without transformers' wrappers around its forward.

On a CPU a small model's decode step is mostly Python: transformers' forward goes
through decorators (keyword deprecation, config defaults, output capture), a model
output dataclass per level, and a module call per decoder layer, attention block and
MLP, each with its own checks. ``direct_forward`` runs the same arithmetic by calling
the layers' own submodules in the order ``Qwen2DecoderLayer.forward`` and
``Qwen2MLP.forward`` do (the norms, the projections, ``apply_rotary_pos_emb``, the cache's
``update``, the attention function transformers would pick, the MLP's activation, the
final norm and the lm_head), each without ``nn.Module.__call__`` where nothing hooks it
(a ``StepPlan`` looks them up once per generation: 0.91x the decode time of calling the
modules), so the logits are bit for bit those of ``base(...)``: tests compare the two, and
``CompressedGenerator`` compares them again at its first decode step and goes back to
``base(...)`` (with a warning) if they ever differ. Everything a submodule carries
stays in effect: ``decode_linears``' routed projections, a kernel-hub norm, LoRA layers.

Where every layer is plain (transformers' norm, ``nn.Linear`` projections, plain or
routed by ``decode_linears``, SiLU; no hooks) and a ``RaggedAttention`` block sends the
step's attention to hcr's kernel, the layers run as one native call
(``hcr_kernels.Qwen2DecoderStack``): the same ops in the same order without the Python
between them, the same logits (tests): 1.84x the tokens/s of the same generation without
decode kernels (which calls the modules) on an Intel Xeon, batch 1.

Only a model built from transformers' own Qwen2 classes qualifies (``supports``), with
per-layer attention kinds in its config (``layer_types``, transformers 4.53+), and only
while nothing hooks the modules it does not call (the model, its decoder stack, layers,
attention blocks and MLPs: a forward hook or pre-hook, a global one, a ``forward`` replaced on
the instance as accelerate's offloading does), since those would silently not run; any
other model takes ``base(...)``.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from hcr.generation.attention import KEYWORD, RaggedStep
from hcr.generation.cache import RaggedStaticCache
from hcr_kernels import _extension
from hcr_kernels.decode_linear import decode_linear_buckets
from hcr_kernels.decoder_step import NATIVE_DTYPES, Qwen2DecoderStack, Qwen2LayerWeights


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
        all(hasattr(layer.self_attn, name) for name in attention_attributes) for layer in layers
    ):
        return False
    return plain_decoder(base.model, qwen2, also_bypassed=[base])


def plain_decoder(decoder, qwen2, also_bypassed=()) -> bool:
    """Whether ``decoder`` is transformers' own ``Qwen2Model`` with its own layer, attention and MLP classes,
    and nothing hooks the modules a direct call bypasses (those, and ``also_bypassed``): a hook there would
    silently not run."""
    layers = decoder.layers
    if type(decoder) is not qwen2.Qwen2Model or not all(
        type(layer) is qwen2.Qwen2DecoderLayer and type(layer.self_attn) is qwen2.Qwen2Attention
        and type(layer.mlp) is qwen2.Qwen2MLP for layer in layers
    ):
        return False
    bypassed = [*also_bypassed, decoder, *layers, *(layer.self_attn for layer in layers),
                *(layer.mlp for layer in layers)]
    return not _global_hooks() and not any(_hooked(module) for module in bypassed)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``."""
    return _has_hooks(module) or "forward" in vars(module)


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks) or _global_hooks()


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
    A generation making many steps builds a ``StepPlan`` once and calls it instead.
    """
    return StepPlan(base)(embeds, positions, masks, cache, logits_to_keep, **attention_kwargs)


def _call(module: torch.nn.Module):
    """What calling ``module`` runs, without ``nn.Module.__call__``'s bookkeeping (a few microseconds a call,
    a third of a small model's decode step): ``F.linear`` on its tensors for a plain ``nn.Linear``, its
    ``forward`` (the instance's, if replaced, as ``decode_linears`` does) for anything else; the module
    itself where a hook must run."""
    if _has_hooks(module):
        return module
    if type(module) is torch.nn.Linear and "forward" not in vars(module):
        weight, bias = module.weight, module.bias
        return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)
    return module.forward


@dataclass
class _Layer:
    """One decoder layer's calls, looked up once (``StepPlan``)."""

    attention: torch.nn.Module
    kind: str
    input_norm: object
    q_proj: object
    k_proj: object
    v_proj: object
    o_proj: object
    post_norm: object
    gate_proj: object
    up_proj: object
    down_proj: object
    act: object


class StepPlan:
    """``direct_forward`` for one model state: the calls of every layer looked up once, so that a step runs
    the arithmetic and little else. Build it where the model's modules no longer change (inside a
    ``decode_linears`` block, after hooks are registered): it keeps the calls it found then."""

    def __init__(self, base):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.qwen2 = sys.modules[type(base).__module__]
        model, config = base.model, base.config
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
                                                            self.qwen2.eager_attention_forward)
        self.layers = [
            _Layer(layer.self_attn, config.layer_types[index], _call(layer.input_layernorm),
                   _call(layer.self_attn.q_proj), _call(layer.self_attn.k_proj), _call(layer.self_attn.v_proj),
                   _call(layer.self_attn.o_proj), _call(layer.post_attention_layernorm),
                   _call(layer.mlp.gate_proj), _call(layer.mlp.up_proj), _call(layer.mlp.down_proj),
                   _call(layer.mlp.act_fn))
            for index, layer in enumerate(model.layers)
        ]
        self.rotary, self.norm, self.lm_head = _call(model.rotary_emb), _call(model.norm), _call(base.lm_head)
        self.stack = native_stack(base.model, base.config, self.qwen2)
        self._fuses: dict[tuple[int, int], bool] = {}  # per (batch, steps): whether attention takes the kernel

    def __call__(self, embeds, positions, masks, cache, logits_to_keep=0, **attention_kwargs) -> torch.Tensor:
        """``direct_forward``'s logits; ``masks`` may also be a function making them (a native step reads none)."""
        qwen2 = self.qwen2
        cos, sin = self.rotary(embeds, positions)
        step = attention_kwargs.get(KEYWORD)
        if self._fused(embeds, cache, step):
            start, count, span = cache.step_writes()
            hidden = self.stack.step(embeds, cos, sin, cache.keys, cache.values, start, count, span, step.positions,
                                     backend="native")
            if self.stack.final_norm is None:
                hidden = self.norm(hidden)
        else:
            hidden = self.norm(self._layers(embeds, cos, sin, masks, cache, attention_kwargs))
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):  # 0: every position, nothing to slice
            keep = getattr(qwen2, "slice_logits_to_keep", None)
            if keep is not None:
                hidden = keep(hidden, logits_to_keep)
            else:  # transformers < 5 sliced inline: an int keeps the last n positions, a tensor those positions
                hidden = hidden[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep]
        return self.lm_head(hidden)

    def _fused(self, embeds: torch.Tensor, cache, step: RaggedStep | None) -> bool:
        """Whether this step runs as one native call: plain layers (``native_stack``), a ``RaggedStaticCache``,
        and attention that takes hcr's kernel at this shape (``RaggedAttention.native_wins``)."""
        if self.stack is None or step is None or not isinstance(cache, RaggedStaticCache):
            return False
        batch, steps, _ = embeds.shape
        if (batch, steps) not in self._fuses:
            stack = self.stack  # the kernel's decision depends on the shapes of its arguments only
            query = embeds.new_empty(batch, stack.heads, steps, stack.head_dim)
            keys = embeds.new_empty(batch, stack.kv_heads, 0, stack.head_dim)
            self._fuses[batch, steps] = step.owner.native_wins(self.layers[0].attention, query, keys)
        return self._fuses[batch, steps]

    def _layers(self, embeds, cos, sin, masks, cache, attention_kwargs) -> torch.Tensor:
        """The decoder layers through their modules' calls: the hidden states before the final norm."""
        batch, steps, _ = embeds.shape
        attend, rotate = self.attend, self.qwen2.apply_rotary_pos_emb
        masks = masks() if callable(masks) else masks
        hidden = embeds
        for index, layer in enumerate(self.layers):
            attention = layer.attention
            normed = layer.input_norm(hidden)
            heads = (batch, steps, -1, attention.head_dim)
            query = layer.q_proj(normed).view(heads).transpose(1, 2)
            key = layer.k_proj(normed).view(heads).transpose(1, 2)
            value = layer.v_proj(normed).view(heads).transpose(1, 2)
            query, key = rotate(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            mask = masks[layer.kind] if isinstance(masks, dict) else masks
            attended, _ = attend(attention, query, key, value, mask,
                                 dropout=attention.attention_dropout if attention.training else 0.0,
                                 scaling=attention.scaling, sliding_window=attention.sliding_window,
                                 **attention_kwargs)
            hidden = hidden + layer.o_proj(attended.reshape(batch, steps, -1).contiguous())
            normed = layer.post_norm(hidden)
            hidden = hidden + layer.down_proj(layer.act(layer.gate_proj(normed)) * layer.up_proj(normed))
        return hidden


def _plain_norm(norm: torch.nn.Module, qwen2) -> bool:
    """Whether ``norm`` is transformers' own ``Qwen2RMSNorm`` with nothing hooked: the native step computes it."""
    return type(norm) is qwen2.Qwen2RMSNorm and not _hooked(norm)


def native_stack(decoder, config, qwen2) -> Qwen2DecoderStack | None:
    """The layers of ``decoder`` (a transformers ``Qwen2Model``: a base model's, a pooler's) packed for
    ``hcr_kernels``' native Qwen2 step, or None where the step must call the modules: the extension
    missing, a model off the CPU or of a dtype the kernels lack, or a layer that is not plain (a hook, a
    norm, projection or activation of another class such as a LoRA layer, a ``forward`` replaced by
    anything but ``decode_linears``)."""
    from transformers import activations

    silu = tuple(cls for cls in (torch.nn.SiLU, getattr(activations, "SiLUActivation", None)) if cls is not None)
    if (not _extension.extension_loaded() or decoder.device.type != "cpu" or decoder.dtype not in NATIVE_DTYPES
            or getattr(config, "hidden_act", None) != "silu"):
        return None
    layers = []
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj)
        buckets = tuple(decode_linear_buckets(projection) for projection in projections)
        if (None in buckets or any(_has_hooks(module) for module in (*projections, mlp.act_fn))
                or not all(_plain_norm(norm, qwen2) for norm in norms)
                or type(mlp.act_fn) not in silu or "forward" in vars(mlp.act_fn)
                or [projection.bias is None for projection in projections] != [False] * 3 + [True] * 4):
            return None
        q, k, v, o, gate, up, down = projections
        layers.append(Qwen2LayerWeights(
            norms[0].weight, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, norms[1].weight,
            gate.weight, up.weight, down.weight, input_eps=float(norms[0].variance_epsilon),
            post_eps=float(norms[1].variance_epsilon), scale=float(attention.scaling),
            sliding_window=int(attention.sliding_window or 0), native_buckets=buckets))
    norm = decoder.norm  # taken into the native call where plain, else called after it
    plain_norm = _plain_norm(norm, qwen2)
    try:
        return Qwen2DecoderStack(layers, head_dim=int(decoder.layers[0].self_attn.head_dim),
                                 final_norm=norm.weight if plain_norm else None,
                                 final_eps=float(norm.variance_epsilon) if plain_norm else 1e-6)
    except (TypeError, ValueError):  # shapes the native step does not take (an odd head_dim): the modules' calls
        return None
