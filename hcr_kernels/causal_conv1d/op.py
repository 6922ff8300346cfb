"""causal_conv1d: argument checks, the backend choice, the autograd Function of the native kernels."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_same_device, check_tensor
from hcr_kernels.causal_conv1d import native
from hcr_kernels.causal_conv1d.reference import causal_conv1d_ref

__all__ = ["causal_conv1d", "BACKEND_CHECKS", "ACTIVATIONS", "CausalConv1dFunction"]

ACTIVATIONS = (None, "silu", "swish")

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("causal_conv1d", "cuda"),
    "cuda": _dispatch.cuda_package_check("causal_conv1d", "causal_conv1d", "causal-conv1d"),
}


class CausalConv1dFunction(torch.autograd.Function):
    """The native kernel works channels-last: ``[batch, L, channels]``, weights ``[K, channels]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        x_last = x.float().transpose(1, 2).contiguous()  # free when x is a transposed channels-last view
        weight_kc = weight.float().t().contiguous()
        bias_c = bias.float().contiguous() if bias is not None else x.new_zeros(x.shape[1], dtype=torch.float32)
        out = native.causal_conv1d_fwd(x_last, weight_kc, bias_c, silu)
        ctx.save_for_backward(x_last, weight_kc, bias_c)
        ctx.silu = silu
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out.transpose(1, 2).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_last, weight_kc, bias_c = ctx.saved_tensors
        grad_last = grad_out.float().transpose(1, 2).contiguous()
        dx, dw, dbias = native.causal_conv1d_bwd(grad_last, x_last, weight_kc, bias_c, ctx.silu)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_bias = dbias.sum(0).to(b_dtype) if b_dtype is not None else None
        return dx.transpose(1, 2).to(x_dtype), dw.sum(0).t().to(w_dtype), grad_bias, None


def causal_conv1d(x, weight, bias=None, activation=None, *, backend: str | None = None) -> torch.Tensor:
    """``causal_conv1d_fn`` semantics: ``x [batch, channels, L]``, ``weight [channels, K]``,
    ``bias [channels]`` or None, ``activation`` None, ``"silu"`` or ``"swish"``. Returns
    ``[batch, channels, L]`` in ``x.dtype``; differentiable in x, weight and bias."""
    check_tensor("x", x, dim=3, floating=True)
    check_tensor("weight", weight, dim=2, floating=True)
    if weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"weight must be [channels={x.shape[1]}, K >= 1], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=1, floating=True)
        if bias.shape[0] != x.shape[1]:
            raise ValueError(f"bias must be [channels={x.shape[1]}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(**{n: t for n, t in dict(x=x, weight=weight, bias=bias).items() if t is not None})
    chosen = _dispatch.choose_backend("causal_conv1d", x.device, backend, BACKEND_CHECKS)
    if chosen == "cuda":
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x, weight, bias, activation=activation)
    if chosen == "native":
        return CausalConv1dFunction.apply(x, weight, bias, activation is not None)
    return causal_conv1d_ref(x, weight, bias, activation)
