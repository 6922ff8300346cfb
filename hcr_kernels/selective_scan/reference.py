"""The selective scan as a plain recurrence in PyTorch (fp32): the oracle.

Semantics of ``mamba_ssm``'s ``selective_scan_fn`` (real A; B and C input
dependent, shared by all channels ``[batch, N, L]`` or grouped ``[batch, G, N, L]``):

    dt_t = softplus(delta_t + delta_bias)   (softplus only with delta_softplus)
    x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t,   x_{-1} = 0
    y_t  = <C_t, x_t> + D * u_t,   out_t = y_t * silu(z_t)   (when z is given)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_channel(BC: torch.Tensor, channels: int) -> torch.Tensor:
    """``[batch, N, L]`` or ``[batch, G, N, L]`` -> ``[batch, channels, N, L]``."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, channels, -1, -1)
    return BC.repeat_interleave(channels // BC.shape[1], dim=1)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """``out [batch, channels, L]`` in ``u.dtype`` (and the fp32 last state ``[batch, channels, N]``)."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    B, C = per_channel(B.float(), channels), per_channel(C.float(), channels)
    decay = torch.exp(delta.unsqueeze(-1) * A.float().unsqueeze(1))  # [b, d, L, N]
    drive = (delta * u).unsqueeze(-1) * B.transpose(2, 3)  # [b, d, L, N]
    state = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append((state * C[:, :, :, t]).sum(-1))
    if ys:
        out = torch.stack(ys, dim=-1)
    else:  # no steps: the empty sums built from the same operands, so each input's gradient is zeros (not None)
        out = (decay * drive * C.transpose(2, 3)).sum(-1)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype)
    return (out, state) if return_last_state else out
