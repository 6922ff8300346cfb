"""Depthwise causal conv1d in plain PyTorch: the oracle (``causal_conv1d_fn`` semantics).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k]),  x[..., < 0] = 0
"""

from __future__ import annotations

import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """``x [batch, channels, L]``, ``weight [channels, K]``, ``bias [channels]``; activation None or silu/swish."""
    dtype = x.dtype
    channels, width = weight.shape
    out = F.conv1d(x.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(),
                   padding=width - 1, groups=channels)[..., : x.shape[-1]]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(dtype)
