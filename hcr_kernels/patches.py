"""Model patches: run a built model's layers through hcr_kernels, in place, with no weight changes.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``, and all in one style: a
patch gives each matching module its own ``forward`` (an instance attribute, so
deleting it gives the class's back) and keeps what it needs in ``_hcr_*`` attributes.

* ``apply_hcr_kernels_to_mamba(model)`` / ``remove_hcr_kernels_from_mamba(model)``: every
  ``MambaMixer``'s sequence path runs ``causal_conv1d`` and ``selective_scan`` on CPU,
  computing exactly what ``transformers``' sequence path computes (padding mask, gated
  projection, causal conv, selective scan, output projection). Calls it does not cover
  fall through to the original forward: decoding with a cache (``cache_params``), and
  tensors off the CPU (where ``mamba-ssm`` serves). ``transformers`` is never imported
  here: mixers are recognised by class name and the attributes the forward reads.
* ``with decode_linears(model):`` routes every plain ``nn.Linear`` through
  ``decode_linear`` for generation on CPU, where a decode step multiplies one row per
  sequence through every layer. Only modules whose type is exactly ``torch.nn.Linear``
  are routed (subclasses such as quantised linears keep their own forward; LoRA
  wrappers keep theirs and their inner ``nn.Linear`` layers are routed). Each call still
  decides for itself: few rows on CPU take the native kernel, the rest ``F.linear``. On
  exit (also by an exception) every layer gets its own forward back.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hcr_kernels import _dispatch
from hcr_kernels.causal_conv1d import causal_conv1d
from hcr_kernels.decode_linear.op import apply_decode_linear, native_buckets, stack_buckets
from hcr_kernels.selective_scan import selective_scan

__all__ = ["apply_hcr_kernels_to_mamba", "remove_hcr_kernels_from_mamba", "decode_linears", "decode_linear_buckets"]

MIXER_CLASS = "MambaMixer"
MIXER_ATTRIBUTES = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "time_step_rank", "ssm_state_size")


def _patch_forward(module: torch.nn.Module, forward, **state) -> None:
    """Give ``module`` its own ``forward`` and keep the patch's ``state`` as ``_hcr_<name>`` attributes."""
    for name, value in state.items():
        setattr(module, f"_hcr_{name}", value)
    module.forward = types.MethodType(forward, module)


def _unpatch_forward(module: torch.nn.Module, *state: str) -> None:
    """Undo ``_patch_forward``: the class's ``forward`` shows through again."""
    del module.forward
    for name in state:
        delattr(module, f"_hcr_{name}")


def _mask_padding(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of ``[batch, L, channels]`` states (as transformers does)."""
    if attention_mask is None:
        return states
    return (states * attention_mask[:, :, None]).to(states.dtype)


def _mixer_forward(self, hidden_states, cache_params=None, *args, **kwargs):
    if cache_params is not None or args or hidden_states.device.type != "cpu":
        return self._hcr_original_forward(hidden_states, cache_params, *args, **kwargs)
    attention_mask = kwargs.get("attention_mask")
    dtype = hidden_states.dtype
    projected = self.in_proj(_mask_padding(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    activation = getattr(self, "activation", None) or "silu"
    x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=activation, backend=self._hcr_backend)
    x = _mask_padding(x.transpose(1, 2), attention_mask)  # [batch, L, channels]
    time_step, B, C = torch.split(
        self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )
    delta = F.linear(time_step, self.dt_proj.weight)  # [batch, L, channels]: the scan's own layout
    A = -torch.exp(self.A_log.float())
    bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    y = selective_scan(
        x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
        z=gate, delta_bias=bias, delta_softplus=True, backend=self._hcr_backend,
    )
    return self.out_proj(y.transpose(1, 2).to(dtype))


def apply_hcr_kernels_to_mamba(model: torch.nn.Module, *, backend: str | None = None) -> torch.nn.Module:
    """Patch every ``MambaMixer`` of ``model`` in place; returns ``model``.

    ``backend`` is passed to the ops (None: ``HCR_BACKEND`` or the fastest here).
    Patching twice is harmless; ``remove_hcr_kernels_from_mamba`` undoes it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_hcr_kernels_to_mamba: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in _dispatch.BACKENDS:  # else refused only at the first forward
        raise ValueError(f"apply_hcr_kernels_to_mamba: backend must be None or one of {_dispatch.BACKENDS}, "
                         f"got {backend!r}")
    mixers = [m for m in model.modules() if type(m).__name__ == MIXER_CLASS]
    if not mixers:
        raise ValueError(f"model has no {MIXER_CLASS} modules: is it a transformers Mamba model?")
    for mixer in mixers:
        missing = [name for name in MIXER_ATTRIBUTES if not hasattr(mixer, name)]
        if missing:
            raise ValueError(f"{MIXER_CLASS} lacks {missing}: this transformers version is not supported")
        original = getattr(mixer, "_hcr_original_forward", mixer.forward)  # patched twice: keep the first
        _patch_forward(mixer, _mixer_forward, original_forward=original, backend=backend)
    return model


def remove_hcr_kernels_from_mamba(model: torch.nn.Module) -> torch.nn.Module:
    for mixer in model.modules():
        if hasattr(mixer, "_hcr_original_forward"):
            _unpatch_forward(mixer, "original_forward", "backend")
    return model


def _routed_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    # The parameters from the module's table: ``self.weight`` is found only through ``nn.Module.__getattr__``,
    # the slow way. On an Intel Xeon (256 x 256 fp32, one row, 2 threads) a routed layer taking ``F.linear``
    # cost 10.3-10.9 us reading ``self.weight`` (and with two more calls in apply_decode_linear) against
    # 9.4-9.7 us for the plain ``nn.Linear``, and 8.4-9.1 us so; taking the kernel 7.7-8.1 us and 6.2-6.7.
    # A method, not a closure over the table: copy.deepcopy binds a method to the copy, a closure it shares.
    parameters = self._parameters
    return apply_decode_linear(input, parameters["weight"], parameters["bias"], self._hcr_native_buckets)


def decode_linear_buckets(module: torch.nn.Module) -> int | None:
    """For which row counts calling ``module`` takes ``decode_linear``'s kernel (``native_buckets``' bit mask):
    0 for a plain ``nn.Linear`` (always ``F.linear``), its mask inside ``decode_linears``; None for anything
    else (a subclass, a LoRA layer, a ``forward`` replaced by something other than ``decode_linears``)."""
    if type(module) is not torch.nn.Linear:
        return None
    forward = vars(module).get("forward")
    if forward is None:
        return 0
    return module._hcr_native_buckets if getattr(forward, "__func__", None) is _routed_forward else None


@contextlib.contextmanager
def decode_linears(model: torch.nn.Module, *, backend: str | None = None) -> Iterator[torch.nn.Module]:
    """Inside the block every plain ``nn.Linear`` of ``model`` runs ``decode_linear(..., backend=backend)``.

    The backend is chosen per layer on entry (``HCR_BACKEND`` is read then); a call
    only looks its row count up in the layer's bucket mask. A layer that would take the
    native kernel at no row count (mask 0: the reference backend, or F.linear measured
    faster at every count, as MKL's is for fp32 on an Intel Xeon) keeps its own
    ``forward``: the same ``F.linear`` call without a routing layer of Python on every
    call. Layers whose ``forward`` was already replaced on the instance (by an outer
    ``decode_linears`` or anything else) are left alone, so blocks nest.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"decode_linears: model must be a torch.nn.Module, got {type(model).__name__}")
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    masks = [native_buckets(m.weight, backend) for m in plain]  # raises before anything is patched
    if backend is None:
        masks = stack_buckets([m.weight for m in plain], masks)
    routed = [(module, buckets) for module, buckets in zip(plain, masks) if buckets != 0]
    for module, buckets in routed:
        _patch_forward(module, _routed_forward, native_buckets=buckets)
    try:
        yield model
    finally:
        for module, _ in routed:
            _unpatch_forward(module, "native_buckets")
