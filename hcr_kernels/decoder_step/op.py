"""The public op: a Qwen2 decoder stack's weights checked once, a step's arguments, the backend choice."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hcr_kernels import _dispatch, _extension
from hcr_kernels._validate import check_tensor
from hcr_kernels.decoder_step import native
from hcr_kernels.decoder_step.reference import qwen2_decoder_step_ref

__all__ = ["Qwen2LayerWeights", "Qwen2DecoderStack", "BACKEND_CHECKS", "NATIVE_DTYPES"]

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("qwen2_decoder_step", "reference"),
}
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # the order of ``native_buckets``
# the order the native op takes a layer's tensors in (kWeights in csrc/decoder_step_cpu.cpp)
WEIGHTS = ("input_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "post_norm", "gate", "up", "down")


@dataclass(frozen=True)
class Qwen2LayerWeights:
    """One Qwen2 decoder layer: its tensors (``[out, in]`` projections, q/k/v with biases), its two norms'
    eps, the attention's scale and sliding window (0: none), and per projection the row counts that take
    ``decode_linear``'s kernel (``native_buckets``' bit mask, 0: always ``F.linear``; ``decode_linear_buckets``)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    q_bias: torch.Tensor
    k: torch.Tensor
    k_bias: torch.Tensor
    v: torch.Tensor
    v_bias: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_eps: float
    post_eps: float
    scale: float
    sliding_window: int
    native_buckets: tuple[int, int, int, int, int, int, int]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors in the order the native op takes them."""
        return [getattr(self, name) for name in WEIGHTS]


class Qwen2DecoderStack:
    """A Qwen2 decoder stack's layers, checked and packed once, for many ``step`` calls; with ``final_norm``
    (the model's last norm's weight, ``[hidden]``) a step ends with that norm."""

    def __init__(self, layers: Sequence[Qwen2LayerWeights], *, head_dim: int,
                 final_norm: torch.Tensor | None = None, final_eps: float = 1e-6):
        if not layers or not all(isinstance(layer, Qwen2LayerWeights) for layer in layers):
            raise TypeError("Qwen2DecoderStack: layers must be a non-empty sequence of Qwen2LayerWeights")
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"Qwen2DecoderStack: head_dim must be an even int >= 2, got {head_dim!r}")
        for index, layer in enumerate(layers):
            _check_layer(index, layer, head_dim, layers[0].q)
        if final_norm is not None:
            first = layers[0].q
            check_tensor("final_norm", final_norm, dim=1, floating=True)
            if (final_norm.shape != (first.shape[1],) or final_norm.dtype != first.dtype
                    or final_norm.device != first.device):
                raise ValueError(f"final_norm must be [{first.shape[1]}] {first.dtype} on {first.device} (the "
                                 f"weights'), got {tuple(final_norm.shape)} {final_norm.dtype} on {final_norm.device}")
        self.final_norm, self.final_eps = final_norm, float(final_eps)
        self.layers, self.head_dim = tuple(layers), head_dim
        self.heads, self.kv_heads = layers[0].q.shape[0] // head_dim, layers[0].k.shape[0] // head_dim
        self.dtype, self.device, self.hidden = layers[0].q.dtype, layers[0].q.device, layers[0].q.shape[1]
        self._packed = ([tensor for layer in layers for tensor in layer.tensors()],
                        [mask for layer in layers for mask in layer.native_buckets],
                        [eps for layer in layers for eps in (layer.input_eps, layer.post_eps)],
                        [layer.scale for layer in layers], [layer.sliding_window for layer in layers], head_dim,
                        final_norm, self.final_eps)
        # backend "native" runs without asking choose_backend: CPU tensors of a dtype the kernel has, _C loaded
        self._native_runs = (self.device.type == "cpu" and self.dtype in NATIVE_DTYPES
                             and _extension.extension_loaded())

    def _common_case(self, embeds, cos, sin, key_caches, value_caches, span, start, count, positions) -> bool:
        """Whether the arguments pass every check of ``_check_step``, in one expression: the generator calls
        ``step`` once per decode step, where the full checks and the backend choice cost ~30 us (a tenth of
        the tiny model's step outside the kernel)."""
        return (isinstance(embeds, torch.Tensor) and isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
                and embeds.dim() == 3 and embeds.shape[2] == self.hidden and embeds.dtype == self.dtype
                and embeds.device == self.device and cos.shape == sin.shape == (*embeds.shape[:2], self.head_dim)
                and cos.dtype == sin.dtype == self.dtype and len(key_caches) == len(value_caches) == len(self.layers)
                and isinstance(span, int) and 0 <= span <= key_caches[0].shape[2]
                and _row_indices(start, count, positions, *embeds.shape[:2])
                and not (torch.is_grad_enabled() and _requires_grad(self, embeds)))

    def step(self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_caches: Sequence[torch.Tensor],
             value_caches: Sequence[torch.Tensor], start: torch.Tensor, count: torch.Tensor, span: int,
             positions: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """One cached step of every layer: the hidden states ``[B, T, hidden]`` (after the final norm if the
        stack has one).

        ``embeds`` ``[B, T, hidden]``; ``cos``/``sin`` ``[B, T, head_dim]`` (the model's rotary embedding at
        the step's positions); ``key_caches``/``value_caches`` one ``[B, Hkv, S, head_dim]`` pair per layer,
        row b written in place at slots ``start[b]`` on (its first ``count[b]`` states, as
        ``ragged_cache_write_``); attention over slots ``[0, span)``, query t of row b at slot
        ``positions[b, t]`` (``decode_attention``'s convention). Inference only.
        """
        common = self._common_case(embeds, cos, sin, key_caches, value_caches, span, start, count, positions)
        if not common:  # raises, naming what is wrong
            _check_step(self, embeds, cos, sin, key_caches, value_caches, span, start, count, positions)
        if common and backend == "native" and self._native_runs:
            chosen = "native"  # what choose_backend decides here, without asking it: the generator's call
        else:
            chosen = _dispatch.choose_backend("qwen2_decoder_step", embeds.device, backend, BACKEND_CHECKS)
            if chosen == "native" and self.dtype not in NATIVE_DTYPES:
                if backend == "native":
                    raise TypeError(f"qwen2_decoder_step: backend 'native' takes {NATIVE_DTYPES}, got {self.dtype}")
                chosen = "reference"
        if chosen == "native":
            return native.qwen2_decoder_step(embeds, cos, sin, self._packed, key_caches, value_caches, start, count,
                                             span, positions)
        return qwen2_decoder_step_ref(embeds, cos, sin, self.layers, key_caches, value_caches, start, count, span,
                                      positions, head_dim=self.head_dim, final_norm=self.final_norm,
                                      final_eps=self.final_eps)


def _check_layer(index: int, layer: Qwen2LayerWeights, head_dim: int, first: torch.Tensor) -> None:
    name = f"layers[{index}]"
    hidden = first.shape[1]
    shapes = {"input_norm": (hidden,), "post_norm": (hidden,), "q_bias": (layer.q.shape[0],),
              "k_bias": (layer.k.shape[0],), "v_bias": (layer.v.shape[0],), "o": (hidden, layer.q.shape[0]),
              "gate": (layer.gate.shape[0], hidden), "up": (layer.gate.shape[0], hidden),
              "down": (hidden, layer.gate.shape[0])}
    for field, tensor in zip(WEIGHTS, layer.tensors()):
        check_tensor(f"{name}.{field}", tensor, floating=True)
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(f"{name}.{field} is {tensor.dtype} on {tensor.device}; every weight must be "
                             f"{first.dtype} on {first.device} (layers[0].q's)")
    for projection in ("q", "k", "v"):
        weight = getattr(layer, projection)
        if weight.dim() != 2 or weight.shape[1] != hidden or weight.shape[0] % head_dim:
            raise ValueError(f"{name}.{projection} must be [heads * head_dim, hidden] = [n * {head_dim}, {hidden}], "
                             f"got {tuple(weight.shape)}")
    if layer.k.shape != layer.v.shape or layer.q.shape[0] % layer.k.shape[0]:
        raise ValueError(f"{name}: k and v must be one shape whose heads divide q's, got q {tuple(layer.q.shape)}, "
                         f"k {tuple(layer.k.shape)}, v {tuple(layer.v.shape)}")
    for field, shape in shapes.items():
        if tuple(getattr(layer, field).shape) != shape:
            raise ValueError(f"{name}.{field} must be {list(shape)}, got {tuple(getattr(layer, field).shape)}")
    if len(layer.native_buckets) != len(PROJECTIONS) or not all(
            isinstance(mask, int) and -2**63 <= mask < 2**63 for mask in layer.native_buckets):
        raise ValueError(f"{name}.native_buckets must be {len(PROJECTIONS)} int64 bit masks ({', '.join(PROJECTIONS)}; "
                         f"decode_linear's native_buckets), got {layer.native_buckets!r}")
    if not isinstance(layer.sliding_window, int) or layer.sliding_window < 0:
        raise ValueError(f"{name}.sliding_window must be an int >= 0 (0: none), got {layer.sliding_window!r}")
    for field in ("input_eps", "post_eps", "scale"):
        value = getattr(layer, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name}.{field} must be a finite number > 0, got {value!r}")


def _requires_grad(stack: Qwen2DecoderStack, embeds: torch.Tensor) -> bool:
    return embeds.requires_grad or any(tensor.requires_grad for tensor in stack._packed[0])


def _row_indices(start, count, positions, batch: int, steps: int) -> bool:
    """Whether ``start``/``count`` are int64 ``[B]`` and ``positions`` int64 ``[B, T]`` tensors."""
    return (isinstance(start, torch.Tensor) and isinstance(count, torch.Tensor) and isinstance(positions, torch.Tensor)
            and start.shape == count.shape == (batch,) and positions.shape == (batch, steps)
            and start.dtype == count.dtype == positions.dtype == torch.int64)


def _check_step(stack: Qwen2DecoderStack, embeds, cos, sin, key_caches, value_caches, span, start, count,
                positions) -> None:
    check_tensor("embeds", embeds, dim=3)
    if torch.is_grad_enabled() and _requires_grad(stack, embeds):
        raise RuntimeError("qwen2_decoder_step is inference only (no gradients): call it under torch.no_grad() or "
                           "torch.inference_mode()")
    hidden = stack.hidden
    if embeds.shape[2] != hidden or embeds.dtype != stack.dtype or embeds.device != stack.device:
        raise ValueError(f"embeds must be [B, T, {hidden}] {stack.dtype} on {stack.device} (the weights'), got "
                         f"{tuple(embeds.shape)} {embeds.dtype} on {embeds.device}")
    expected = (*embeds.shape[:2], stack.head_dim)
    for name, value in (("cos", cos), ("sin", sin)):
        check_tensor(name, value, dim=3)
        if tuple(value.shape) != expected or value.dtype != stack.dtype:
            raise ValueError(f"{name} must be [B, T, head_dim] = {list(expected)} {stack.dtype}, got "
                             f"{tuple(value.shape)} {value.dtype}")
    if len(key_caches) != len(stack.layers) or len(value_caches) != len(stack.layers):
        raise ValueError(f"key_caches and value_caches must hold one cache per layer ({len(stack.layers)}), got "
                         f"{len(key_caches)} and {len(value_caches)}")
    if not isinstance(span, int) or span < 0 or span > key_caches[0].shape[2]:
        raise ValueError(f"span must be an int in [0, S] = [0, {key_caches[0].shape[2]}], got {span!r}")
    batch, steps = embeds.shape[:2]
    for name, value, shape in (("start", start, (batch,)), ("count", count, (batch,)),
                               ("positions", positions, (batch, steps))):
        check_tensor(name, value, dtype=torch.int64)
        if value.shape != shape:
            raise ValueError(f"{name} must be {list(shape)} (B = {batch}, T = {steps} from embeds), got "
                             f"{tuple(value.shape)}")
