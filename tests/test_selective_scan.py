"""selective_scan: the native CPU scan against the reference recurrence.

Outputs and gradients of every input (the last state's gradient included), odd
shapes (d_state 16, channels 60, lengths 1, 63, 257), with and without D, z,
delta_bias, softplus; shared and grouped B/C; bad input.
"""

from __future__ import annotations

import pytest
import torch

from hcr_kernels.selective_scan import MAX_STATE, selective_scan, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# The native scan computes in fp32 like the reference; differences come from the
# order of operations and its vectorised exp (~2 ulp), compounded over the sequence.
TOLERANCES = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 3e-2)}


def make_inputs(batch=2, channels=60, length=63, state=16, groups=None, with_D=True, with_z=True,
                with_bias=True, dtype=torch.float32):
    shape_BC = (batch, state, length) if groups is None else (batch, groups, state, length)
    tensors = {
        "u": torch.randn(batch, channels, length),
        "delta": torch.randn(batch, channels, length) * 0.5,
        "A": -torch.rand(channels, state) * 2 - 0.05,
        "B": torch.randn(shape_BC),
        "C": torch.randn(shape_BC),
        "D": torch.randn(channels) if with_D else None,
        "z": torch.randn(batch, channels, length) if with_z else None,
        "delta_bias": torch.randn(channels) * 0.3 if with_bias else None,
    }
    return {k: (v.to(dtype) if v is not None and k not in ("A",) else v) for k, v in tensors.items()}


def run(inputs, backend, softplus, grad_out, grad_last):
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, last = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend=backend)
    loss = (out.float() * grad_out).sum() + (last * grad_last).sum()
    loss.backward()
    return out.detach(), last.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


CASES = [
    pytest.param(dict(), True, id="all-options-L63"),
    pytest.param(dict(length=1), True, id="L1"),
    pytest.param(dict(length=257), True, id="L257-several-checkpoints"),
    pytest.param(dict(with_D=False, with_z=False, with_bias=False), False, id="bare"),
    pytest.param(dict(with_z=False), True, id="no-z"),
    pytest.param(dict(groups=3), True, id="grouped-BC-G3"),
    pytest.param(dict(channels=5, state=1, length=9), False, id="N1-channels5"),
    pytest.param(dict(batch=1, channels=64, state=4, length=20), True, id="two-full-chunks"),
]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("kwargs,softplus", CASES)
def test_native_matches_reference(kwargs, softplus):
    inputs = make_inputs(**kwargs)
    out_shape = inputs["u"].shape
    grad_out = torch.randn(out_shape)
    grad_last = torch.randn(out_shape[0], out_shape[1], inputs["A"].shape[1])
    out, last, grads = run(inputs, "native", softplus, grad_out, grad_last)
    ref_out, ref_last, ref_grads = run(inputs, "reference", softplus, grad_out, grad_last)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(last, ref_last, torch.float32, "last state")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == inputs[name].shape, name
        assert_close(grads[name], ref_grads[name], torch.float32, f"grad of {name}")


def test_bf16_inputs_return_bf16():
    inputs = make_inputs(length=17, dtype=torch.bfloat16)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), torch.bfloat16, "out")


def test_only_out_gradient_and_no_grad_mode():
    inputs = make_inputs(length=12)
    with torch.no_grad():
        out = selective_scan(**inputs, delta_softplus=True, backend="native")
    assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), torch.float32, "out")
    u = inputs["u"].clone().requires_grad_()
    out = selective_scan(**{**inputs, "u": u}, delta_softplus=True, backend="native")
    (grad,) = torch.autograd.grad(out.sum(), u)
    u_ref = inputs["u"].clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(selective_scan_ref(**{**inputs, "u": u_ref}, delta_softplus=True).sum(), u_ref)
    assert_close(grad, ref_grad, torch.float32, "grad of u")


def test_non_contiguous_inputs():
    inputs = make_inputs(length=30)
    inputs["u"] = torch.randn(2, 30, 60).transpose(1, 2)  # channels-last view, as in Mamba
    inputs["B"] = torch.randn(2, 30, 16).transpose(1, 2)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), torch.float32, "out")


def test_zero_length():
    inputs = make_inputs(length=0)
    out, last = selective_scan(**inputs, return_last_state=True, backend="native")
    assert out.shape == (2, 60, 0) and torch.equal(last, torch.zeros(2, 60, 16))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_zero_length_gradients_are_zeros(backend):
    """No steps: every input's gradient is a tensor of zeros in every backend (the oracle had given None for
    delta, A, B, C and delta_bias, which the kernels give as zeros)."""
    inputs = make_inputs(length=0)
    _, _, grads = run(inputs, backend, True, torch.zeros(2, 60, 0), torch.randn(2, 60, 16))
    for name, value in inputs.items():
        assert grads[name] is not None and grads[name].shape == value.shape, name
        assert torch.equal(grads[name], torch.zeros_like(value)), name


BAD = [
    pytest.param(lambda i: {**i, "delta": i["delta"][..., :-1]}, ValueError, "delta must have u's shape", id="delta-shape"),
    pytest.param(lambda i: {**i, "A": torch.complex(i["A"], i["A"])}, TypeError, "complex A", id="complex-A"),
    pytest.param(lambda i: {**i, "A": -torch.rand(60, MAX_STATE + 1), "B": torch.randn(2, MAX_STATE + 1, 63),
                            "C": torch.randn(2, MAX_STATE + 1, 63)}, ValueError, "state size N", id="state-too-large"),
    pytest.param(lambda i: {**i, "B": torch.randn(60, 16)}, ValueError, "time-invariant", id="time-invariant-B"),
    pytest.param(lambda i: {**i, "C": torch.randn(2, 7, 16, 63)}, ValueError, "G=7 groups", id="groups-not-dividing"),
    pytest.param(lambda i: {**i, "B": torch.randn(2, 16, 62)}, ValueError, "B must be", id="B-length"),
    pytest.param(lambda i: {**i, "D": torch.randn(59)}, ValueError, "D must be", id="D-shape"),
    pytest.param(lambda i: {**i, "z": torch.randn(2, 60, 62)}, ValueError, "z must have", id="z-shape"),
    pytest.param(lambda i: {**i, "u": i["u"].long()}, TypeError, "u must be a floating-point", id="u-int"),
    pytest.param(lambda i: {**i, "D": i["D"].to("meta")}, ValueError, "one device", id="device-mismatch"),
    pytest.param(lambda i: {**i, "delta_softplus": "no"}, TypeError, "delta_softplus must be True or False",
                 id="flag-text"),  # a truthy "no" had applied the softplus in the reference
    pytest.param(lambda i: {**i, "return_last_state": 1}, TypeError, "return_last_state must be True or False",
                 id="flag-int"),
]


@pytest.mark.parametrize("corrupt,error,message", BAD)
def test_bad_input(corrupt, error, message):
    with pytest.raises(error, match=message):
        selective_scan(**corrupt(make_inputs()), backend="native")


def test_native_refuses_other_devices():
    inputs = {k: (v.to("meta") if v is not None else None) for k, v in make_inputs(length=4).items()}
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        selective_scan(**inputs, backend="native")


def test_cuda_backend_needs_gpu_tensors():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**make_inputs(length=4), backend="cuda")
