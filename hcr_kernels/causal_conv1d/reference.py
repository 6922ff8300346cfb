"""Depthwise causal conv1d in plain PyTorch: the oracle (``causal_conv1d_fn`` semantics).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k]),  x[..., < 0] = 0
"""

from __future__ import annotations

import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """``x [batch, channels, L]``, ``weight [channels, K]``, ``bias [channels]``; activation None or silu/swish."""
    dtype = x.dtype
    channels, width = weight.shape
    if x.numel() == 0:  # no steps or no channels: F.conv1d refuses what the native kernel returns empty; the
        # empty result still depends on every input, so each gets its (empty or zero) gradient, as from the kernel
        connected = weight.float().sum() + (0.0 if bias is None else bias.float().sum())
        return (x.float() + 0.0 * connected).to(dtype)
    out = F.conv1d(x.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(),
                   padding=width - 1, groups=channels)[..., : x.shape[-1]]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(dtype)
