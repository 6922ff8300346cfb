"""Parameter sets and the tolerance rule shared by the op test modules (readable ids)."""

from __future__ import annotations

import math

import pytest
import torch

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# Backends of ops with a CPU native path and a Triton path (the interpreter on CPU).
NATIVE_AND_TRITON = [
    pytest.param("native", "cpu", id="native-cpu"),
    pytest.param("triton", "cpu", id="triton-interpret"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
]


def tolerance(
    dtype: torch.dtype,
    reduction_length: int = 1,
    cancellation_scale: float = 0.0,
    *,
    rounded_to: torch.dtype | None = None,
    condition: float = 1.0,
) -> tuple[float, float]:
    """``(atol, rtol)`` of a kernel's result against the reference's: the one rule of the op tests.

    Both sides compute the same math in the accumulation precision (fp32 for fp32, fp16 and
    bf16 inputs, fp64 for fp64; machine epsilon ``eps_acc``) and store the result in
    ``dtype`` (``eps_out``). Two correct implementations then differ by

    1. the order of a reduction over n = ``reduction_length`` terms (block sizes, AVX2 vs
       AVX-512 vector widths, Triton blocks). Rounding errors of a sum grow like n·eps_acc
       times its partial sums in the worst case, like sqrt(n)·eps_acc typically (a random
       walk). Where the result is as large as its partial sums (same-sign terms, a mean, or
       anything divided by such a sum: a softmax over n classes, ``p - onehot`` away from
       the label) that error is relative: **rtol += 2·sqrt(n)·eps_acc**. Where the result
       can be much smaller than its partial sums (cancellation: ``p - 1`` at the label, a
       matmul with mixed signs) it stays at their size: **atol += 2·sqrt(n)·eps_acc·
       cancellation_scale**, the scale being the magnitude of those partial sums (0 when
       nothing cancels);
    2. the rounding of the result to ``dtype``, once or twice (a saved gradient scaled by
       ``grad_output`` in the output dtype), and a few ulp of elementwise math such as exp:
       **rtol += 2·eps_out**. Below the smallest normal number of ``dtype`` (fp16 values
       of ~1e-7) a rounding is absolute, half a step, and a later multiplication by
       ``grad_output`` scales it up: **atol += 4 subnormal steps of dtype**;
    3. only where one side rounds an intermediate to a lower precision ``rounded_to``
       (eps_mid) and the other does not (the fused CE computes its logits by a matmul in
       the input dtype): each intermediate is off by up to eps_mid/2 of itself, and the
       math after it amplifies that by its ``condition`` number (a softmax over rounded
       logits: max |logit|, the error of each logit; the normaliser averages them):
       **rtol += condition·eps_mid/2, atol += condition·eps_mid/2·cancellation_scale**.

    The factor 2 covers both sides' random walks. No constant is fitted to the errors of
    one machine: on an AVX2 CPU the CE, fused CE and decode_linear errors reach at most
    0.35 of these bounds (the fp16/bf16 output rounding, exact arithmetic, up to 0.78 of
    its term). Bit-exact results (copies, cache writes, masked scatters) are compared with
    ``torch.equal`` instead.
    """
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    out = torch.finfo(dtype)
    relative = 2 * math.sqrt(max(reduction_length, 1)) * eps_acc
    if rounded_to is not None:
        relative += condition * torch.finfo(rounded_to).eps / 2
    atol = relative * float(cancellation_scale) + 4 * out.smallest_normal * out.eps
    return atol, 2 * out.eps + relative


def assert_close_by_rule(actual, expected, reduction_length, cancellation_scale=None, *, what="", **kwargs):
    """``assert_close`` with ``tolerance(expected.dtype, ...)``. ``cancellation_scale=None`` assumes
    the worst: any result may have cancelled down from partial sums as large as ``max |expected|``."""
    if cancellation_scale is None:
        cancellation_scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    atol, rtol = tolerance(expected.dtype, reduction_length, cancellation_scale, **kwargs)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=(lambda m: f"{what}: {m}") if what else None)
