"""The public op: argument checks, the backend choice per layer, the autograd Function."""

from __future__ import annotations

import sys

import torch

from hcr_kernels import _dispatch
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.decode_linear.native import decode_linear_native
from hcr_kernels.decode_linear.reference import decode_linear_ref

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("decode_linear", "reference"),
}

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to how many rows the automatic choice takes the native kernel: where it beat
# F.linear in benchmarks/test_bench_decode_linear.py on this project's CPU (medians,
# native vs F.linear): fp32 2.8x at 1 row, 3.0x at 4, 1.1x at 8, 0.9x at 16; bf16 2.2x
# at 1, 1.5x at 4, 1.1x at 8 on the tiny model but 0.55x at 8 on a 1.5B MLP; fp16 0.6x
# at 1 row (F.linear has a fast fp16 one-row path), so fp16 takes the native kernel
# only when asked for.
NATIVE_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 0}


class DecodeLinearFunction(torch.autograd.Function):
    """The native forward; the backward is two matmuls and a sum in plain PyTorch (training never decodes)."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return decode_linear_native(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_out @ weight
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t() @ input.reshape(-1, input.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_input, grad_weight, grad_bias


def decode_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``input @ weight.T + bias`` (``F.linear``'s contract): ``[..., K]``, ``[N, K]``, ``[N]`` -> ``[..., N]``.

    Differentiable. ``backend``: None (``HCR_BACKEND`` or the automatic choice: native
    for CPU tensors of a native dtype with at most ``NATIVE_MAX_ROWS`` rows and weight
    rows contiguous, else reference), ``"reference"`` or ``"native"`` (any row count;
    a dtype it lacks is an error).
    """
    _check_args(input, weight, bias)
    return apply_decode_linear(input, weight, bias, native_row_limit(weight, backend))


def native_row_limit(weight: torch.Tensor, backend: str | None = None) -> int:
    """Up to how many input rows a linear with this weight takes the native kernel (0: never).

    Everything here depends on the layer, not on the call (device, dtype, whether the
    extension is built, the weight's layout, ``backend``/``HCR_BACKEND``), so
    ``decode_linears`` asks once per layer and each call only compares its row count.
    """
    chosen = _dispatch.choose_backend("decode_linear", weight.device, backend, BACKEND_CHECKS)
    if chosen == "reference":
        return 0
    if backend is None:  # automatic or HCR_BACKEND: native only where it is the faster path
        contiguous_rows = weight.shape[-1] <= 1 or weight.stride(-1) == 1
        return NATIVE_MAX_ROWS.get(weight.dtype, 0) if contiguous_rows else 0
    if weight.dtype not in NATIVE_DTYPES:
        raise TypeError(f"decode_linear: backend 'native' supports {NATIVE_DTYPES}, got {weight.dtype}; "
                        "use backend='reference'")
    return sys.maxsize


def apply_decode_linear(input, weight, bias, row_limit: int) -> torch.Tensor:
    """The linear, native when ``input`` has at most ``row_limit`` rows (arguments already checked)."""
    if input.numel() > row_limit * input.shape[-1] or input.dtype != weight.dtype:
        return decode_linear_ref(input, weight, bias)
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return DecodeLinearFunction.apply(input, weight, bias)
    return decode_linear_native(input, weight, bias)


def _check_args(input, weight, bias) -> None:
    check_tensor("input", input)
    check_tensor("weight", weight, dim=2)
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"decode_linear: input must be [..., K] with K = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(input.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"decode_linear: bias must be None or [N] = [{weight.shape[0]}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    tensors = {"input": input, "weight": weight} if bias is None else {"input": input, "weight": weight, "bias": bias}
    check_same_device(**tensors)
    check_same_dtype(**tensors)
