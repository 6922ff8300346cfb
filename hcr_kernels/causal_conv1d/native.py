"""Host wrappers of the compiled causal conv1d (``torch.ops.hcr.causal_conv1d_fwd`` / ``_bwd``), and their fakes.

The kernels work channels-last in fp32: ``x [batch, L, channels]``, ``weight [K, channels]``,
``bias [channels]``. Their schemas are functional (the C++ allocates the outputs), so these
only launch; the Function lays the inputs out and saves them for the backward.
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension


@_extension.register_fake("causal_conv1d_fwd")
def _causal_conv1d_fwd_fake(x, weight, bias, silu):
    return torch.empty_like(x)


@_extension.register_fake("causal_conv1d_bwd")
def _causal_conv1d_bwd_fake(grad_out, x, weight, bias, silu):
    batch, _, channels = x.shape
    # dweight and dbias are per batch row; the caller sums them.
    return [torch.empty_like(x), x.new_empty((batch, weight.shape[0], channels)), x.new_empty((batch, channels))]


def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu: bool) -> torch.Tensor:
    """``out [batch, L, channels]``, fp32."""
    return torch.ops.hcr.causal_conv1d_fwd(x, weight, bias, silu)


def causal_conv1d_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      silu: bool) -> list[torch.Tensor]:
    """``[dx, dweight per batch row [batch, K, channels], dbias per batch row [batch, channels]]``."""
    return torch.ops.hcr.causal_conv1d_bwd(grad_out, x, weight, bias, silu)
