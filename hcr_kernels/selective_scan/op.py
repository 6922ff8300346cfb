"""selective_scan: argument checks, the backend choice, the autograd Function of the native kernels."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_same_device, check_tensor
from hcr_kernels.selective_scan import native
from hcr_kernels.selective_scan.reference import selective_scan_ref

__all__ = ["selective_scan", "SelectiveScanFunction", "BACKEND_CHECKS", "MAX_STATE"]

MAX_STATE = 256

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("selective_scan", "cuda"),
    "cuda": _dispatch.cuda_package_check("selective_scan", "mamba_ssm.ops.selective_scan_interface", "mamba-ssm"),
}


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``[batch, channels, L]`` -> contiguous fp32 ``[batch, L, channels]`` (free for a transposed view)."""
    return x.float().transpose(1, 2).contiguous()


def _grouped_layout(BC: torch.Tensor) -> torch.Tensor:
    """``[batch, (G,) N, L]`` -> contiguous fp32 ``[batch, G, L, N]``."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    return BC.float().transpose(-1, -2).contiguous()


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        zeros = u.new_zeros(u.shape[1], dtype=torch.float32)
        args = (
            _kernel_layout(u),
            _kernel_layout(delta),
            A.float().contiguous(),
            _grouped_layout(B),
            _grouped_layout(C),
            D.float().contiguous() if D is not None else zeros,
            _kernel_layout(z) if z is not None else None,
            delta_bias.float().contiguous() if delta_bias is not None else zeros,
        )
        out, checkpoints = native.selective_scan_fwd(*args, delta_softplus)
        ctx.save_for_backward(*args[:6], args[6] if z is not None else checkpoints, args[7], checkpoints)
        ctx.has_z = z is not None
        ctx.delta_softplus = delta_softplus
        ctx.shared_BC = (B.dim() == 3, C.dim() == 3)
        ctx.dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        if u.shape[2]:
            last_state = checkpoints[:, -1].transpose(1, 2).contiguous()
        else:
            last_state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        return out.transpose(1, 2).to(u.dtype), last_state

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        z = z if ctx.has_z else None
        grad_out = _kernel_layout(grad_out) if grad_out is not None else torch.zeros_like(u)
        grad_last = grad_last_state.float().transpose(1, 2).contiguous() if grad_last_state is not None else None
        du, ddelta, dz, dA, dB, dC, dD, dbias = native.selective_scan_bwd(
            grad_out, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints, grad_last
        )
        dB, dC = (g.sum(2).transpose(-1, -2) for g in (dB, dC))  # sum the chunks' partial sums
        grads = [
            du.transpose(1, 2),
            ddelta.transpose(1, 2),
            dA.sum(0).t(),
            dB.squeeze(1) if ctx.shared_BC[0] else dB,
            dC.squeeze(1) if ctx.shared_BC[1] else dC,
            dD.sum(0),
            dz.transpose(1, 2) if ctx.has_z else None,
            dbias.sum(0),
        ]
        grads = [g.to(dtype) if dtype is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None)


def _check_args(u, delta, A, B, C, D, z, delta_bias) -> None:
    check_tensor("u", u, dim=3, floating=True)
    batch, channels, length = u.shape
    check_tensor("delta", delta, floating=True)
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.is_complex():
        raise TypeError("A must be real: complex A is not supported by hcr_kernels.selective_scan")
    check_tensor("A", A, dim=2, floating=True)
    if A.shape[0] != channels:
        raise ValueError(f"A must be [channels={channels}, N], got {tuple(A.shape)}")
    state = A.shape[1]
    if not 1 <= state <= MAX_STATE:
        raise ValueError(f"the state size N (A.shape[1]) must be in [1, {MAX_STATE}], got {state}")
    for name, BC in (("B", B), ("C", C)):
        check_tensor(name, BC, floating=True)
        if BC.dim() == 2:
            raise ValueError(f"{name} is time-invariant [channels, N]: not supported; pass [batch, (G,) N, L]")
        if BC.dim() not in (3, 4) or BC.shape[0] != batch or BC.shape[-2:] != (state, length):
            raise ValueError(
                f"{name} must be [batch={batch}, N={state}, L={length}] or [batch, G, N, L], got {tuple(BC.shape)}"
            )
        if BC.dim() == 4 and (BC.shape[1] < 1 or channels % BC.shape[1]):
            raise ValueError(f"{name} has G={BC.shape[1]} groups, which must divide channels={channels}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None:
            check_tensor(name, vector, dim=1, floating=True)
            if vector.shape[0] != channels:
                raise ValueError(f"{name} must be [channels={channels}], got {tuple(vector.shape)}")
    if z is not None:
        check_tensor("z", z, floating=True)
        if z.shape != u.shape:
            raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    present = {n: t for n, t in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items() if t is not None}
    check_same_device(**present)


def _refuse_last_state_gradient(grad: torch.Tensor) -> None:
    """mamba-ssm's backward ignores the last state's gradient: fail rather than train on a wrong one."""
    if bool(grad.any()):
        raise RuntimeError(
            "selective_scan backend 'cuda' (mamba_ssm.selective_scan_fn) does not propagate the gradient of the "
            "returned last state, and this loss depends on it; use backend='reference', or detach the last state")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str | None = None,
):
    """``mamba_ssm.selective_scan_fn`` semantics: ``u, delta, z [batch, channels, L]``, ``A [channels, N]``,
    ``B, C [batch, (G,) N, L]``, ``D, delta_bias [channels]``. Returns ``out [batch, channels, L]`` in
    ``u.dtype`` and, with ``return_last_state``, the fp32 state ``[batch, channels, N]`` after the last step.
    Differentiable in every tensor input (the last state's gradient included; the ``cuda`` backend raises
    in backward when the last state gets a non-zero gradient, which mamba-ssm would drop)."""
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, bool):  # a truthy "no" had meant yes
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    chosen = _dispatch.choose_backend("selective_scan", u.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chosen == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        result = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if return_last_state and result[1].requires_grad:
            result[1].register_hook(_refuse_last_state_gradient)
        return result
    out, last_state = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out
