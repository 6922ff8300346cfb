"""Make a ``transformers`` Mamba model run its scan and conv with hcr_kernels on CPU.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``: works on an already
built model, changes no weights, only each ``MambaMixer``'s ``forward``. The
patched forward computes exactly what ``transformers``' sequence path computes
(padding mask, gated projection, causal conv, selective scan, output
projection), with ``hcr_kernels.causal_conv1d`` and ``hcr_kernels.selective_scan``.
Calls it does not cover fall through to the original forward: decoding with a
cache (``cache_params``), and tensors off the CPU (where ``mamba-ssm`` serves).

``transformers`` is never imported here: mixers are recognised by class name and
the attributes the forward reads.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from hcr_kernels.causal_conv1d import causal_conv1d
from hcr_kernels.selective_scan import selective_scan

MIXER_CLASS = "MambaMixer"
MIXER_ATTRIBUTES = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "time_step_rank", "ssm_state_size")


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
    mixers = [m for m in model.modules() if type(m).__name__ == MIXER_CLASS]
    if not mixers:
        raise ValueError(f"model has no {MIXER_CLASS} modules: is it a transformers Mamba model?")
    for mixer in mixers:
        missing = [name for name in MIXER_ATTRIBUTES if not hasattr(mixer, name)]
        if missing:
            raise ValueError(f"{MIXER_CLASS} lacks {missing}: this transformers version is not supported")
        if not hasattr(mixer, "_hcr_original_forward"):
            mixer._hcr_original_forward = mixer.forward
        mixer._hcr_backend = backend
        mixer.forward = types.MethodType(_mixer_forward, mixer)
    return model


def remove_hcr_kernels_from_mamba(model: torch.nn.Module) -> torch.nn.Module:
    for mixer in model.modules():
        if hasattr(mixer, "_hcr_original_forward"):
            del mixer.forward, mixer._hcr_original_forward, mixer._hcr_backend
    return model
