"""Every backend that claims CUDA has a GPU test; the ``cuda`` backends (mamba-ssm, causal-conv1d) get theirs here.

The native and Triton backends are tested on CUDA by their op's own test file (the
``*-cuda`` parameters). ``GPU_TESTS`` names each such test; a backend added later
that admits CUDA tensors without a GPU test fails ``test_every_cuda_backend_has_a_gpu_test``
here, on CPU, in CI. The ``cuda`` backends' tests import mamba-ssm / causal-conv1d only
inside the test (they import on CUDA machines alone) and skip without them.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from hcr_kernels import _dispatch, _extension
from hcr_kernels.causal_conv1d import causal_conv1d
from hcr_kernels.info import OPS
from test_causal_conv1d import CASES as CONV_CASES
from test_selective_scan import CASES as SCAN_CASES
from test_selective_scan import make_inputs, run

GPU = "cuda"

# (op, backend) -> (test module, test function, id of its CUDA parameter or None for a function marked gpu)
GPU_TESTS = {
    ("window_mean_pool", "native"): ("test_pool_scatter", "test_window_mean_pool_matches_reference", "native-cuda"),
    ("window_mean_pool", "triton"): ("test_pool_scatter", "test_window_mean_pool_matches_reference", "triton-cuda"),
    ("pool_scatter", "native"): ("test_pool_scatter", "test_pool_scatter_matches_reference", "native-cuda"),
    ("pool_scatter", "triton"): ("test_pool_scatter", "test_pool_scatter_matches_reference", "triton-cuda"),
    ("weighted_cross_entropy", "triton"): ("test_weighted_cross_entropy", "test_matches_reference", "triton-cuda"),
    ("fused_linear_cross_entropy", "triton"): ("test_fused_linear_cross_entropy", "test_matches_reference",
                                               "triton-cuda"),
    ("ragged_cache_write_", "native"): ("test_ragged_cache_write", "test_matches_definition", "native-cuda"),
    ("selective_scan", "cuda"): (__name__, "test_selective_scan_cuda_matches_reference", None),
    ("causal_conv1d", "cuda"): (__name__, "test_causal_conv1d_cuda_matches_reference", None),
}


def claims_cuda(check) -> bool:
    """Whether a backend check admits CUDA tensors by design (it may still refuse here: no CUDA build, no package)."""
    if check is _dispatch.require_nothing:
        return False  # the reference: the oracle every GPU test runs on CUDA beside the backend it checks
    if check is _extension.require_native or check is _dispatch.require_triton:
        return True
    factory = check.__qualname__.split(".<locals>")[0]
    if factory == "cuda_package_check":
        return True
    if factory == "native_cpu_check":
        return False
    raise AssertionError(f"unknown backend check {check.__qualname__}: say in claims_cuda whether it admits CUDA")


def _is_gpu(mark) -> bool:
    return mark.name == "gpu"


def gpu_case(module_name: str, function_name: str, param_id: str | None) -> bool:
    """Whether the test exists and runs on a GPU: marked gpu, or a parameter ``param_id`` marked gpu."""
    module = sys.modules[module_name] if module_name == __name__ else importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if function is None:
        return False
    marks = getattr(function, "pytestmark", [])
    marked = any(_is_gpu(mark) for mark in marks)
    if param_id is None:
        return marked
    return any(
        getattr(value, "id", None) == param_id and (marked or any(_is_gpu(mark) for mark in value.marks))
        for mark in marks if mark.name == "parametrize"
        for value in mark.args[1]
    )


def test_every_cuda_backend_has_a_gpu_test():
    claimed = {(op, backend) for op, checks in OPS.items() for backend, check in checks.items() if claims_cuda(check)}
    assert claimed - set(GPU_TESTS) == set(), "backends that admit CUDA tensors without a GPU test in GPU_TESTS"
    assert set(GPU_TESTS) - claimed == set(), "GPU_TESTS names backends that do not admit CUDA tensors"


@pytest.mark.parametrize("op,backend", list(GPU_TESTS), ids=lambda value: value)
def test_registered_gpu_tests_exist_and_are_marked_gpu(op, backend):
    assert gpu_case(*GPU_TESTS[op, backend]), GPU_TESTS[op, backend]


def test_the_registry_checks_can_fail():
    assert not gpu_case("test_pool_scatter", "test_pool_scatter_matches_reference", "native-cpu")  # not marked gpu
    assert not gpu_case("test_selective_scan", "test_native_matches_reference", None)
    assert not gpu_case("test_selective_scan", "no_such_test", None)
    assert claims_cuda(_dispatch.cuda_package_check("op", "module", "package"))
    assert not claims_cuda(_dispatch.native_cpu_check("op", "cuda"))
    with pytest.raises(AssertionError, match="unknown backend check"):
        claims_cuda(lambda device: None)


def _assert_close_scaled(actual, expected, atol, rtol, what):
    """``atol`` relative to the largest expected value, as the CPU tests of these ops compare."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


# mamba-ssm's own tests of selective_scan_fn (fp32): outputs rtol 6e-4, atol 2e-3; the gradients of delta, A,
# B, C and delta_bias (sums over the sequence through the exp) 5x rtol and 10x atol.
SCAN_TOLERANCE = (2e-3, 6e-4)
SCAN_SUMMED_TOLERANCE = (2e-2, 3e-3)
SCAN_SUMMED = ("delta", "A", "B", "C", "delta_bias")


def _scan_on_gpu(kwargs):
    return {name: value.to(GPU) if value is not None else None for name, value in make_inputs(**kwargs).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs,softplus", SCAN_CASES)
def test_selective_scan_cuda_matches_reference(kwargs, softplus):
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface", reason="the cuda backend needs mamba-ssm")
    inputs = _scan_on_gpu(kwargs)
    grad_out = torch.randn(inputs["u"].shape, device=GPU)
    # mamba-ssm drops the last state's gradient (test below); its value is still compared
    no_state_grad = torch.zeros(*inputs["u"].shape[:2], inputs["A"].shape[1], device=GPU)
    out, last, grads = run(inputs, "cuda", softplus, grad_out, no_state_grad)
    ref_out, ref_last, ref_grads = run(inputs, "reference", softplus, grad_out, no_state_grad)
    _assert_close_scaled(out, ref_out, *SCAN_TOLERANCE, "out")
    _assert_close_scaled(last, ref_last, *SCAN_TOLERANCE, "last state")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        tolerance = SCAN_SUMMED_TOLERANCE if name in SCAN_SUMMED else SCAN_TOLERANCE
        _assert_close_scaled(grad, ref_grads[name], *tolerance, f"grad of {name}")


@pytest.mark.gpu
def test_selective_scan_cuda_refuses_a_last_state_gradient_it_would_drop():
    """mamba_ssm's selective_scan_fn ignores the last state's gradient (its docstring says so): hcr raises."""
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface", reason="the cuda backend needs mamba-ssm")
    inputs = _scan_on_gpu({})
    no_out_grad = torch.zeros(inputs["u"].shape, device=GPU)
    grad_last = torch.randn(*inputs["u"].shape[:2], inputs["A"].shape[1], device=GPU)
    with pytest.raises(RuntimeError, match="does not propagate the gradient of the returned last state"):
        run(inputs, "cuda", True, no_out_grad, grad_last)


# causal-conv1d's kernel takes widths 2 to 4; its own tests compare fp32 with rtol 3e-4, atol 1e-3.
CUDA_CONV_CASES = [case for case in CONV_CASES if 2 <= case.values[3] <= 4]
CONV_TOLERANCE = (1e-3, 3e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,channels,length,width,activation,with_bias", CUDA_CONV_CASES)
def test_causal_conv1d_cuda_matches_reference(batch, channels, length, width, activation, with_bias):
    pytest.importorskip("causal_conv1d", reason="the cuda backend needs causal-conv1d")
    x = torch.randn(batch, channels, length, device=GPU)
    weight = torch.randn(channels, width, device=GPU)
    bias = torch.randn(channels, device=GPU) if with_bias else None
    grad_out = torch.randn(batch, channels, length, device=GPU)
    results = []
    for backend in ("cuda", "reference"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        out = causal_conv1d(*leaves, activation=activation, backend=backend)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves if t is not None])
    for what, actual, expected in zip(("out", "grad of x", "grad of weight", "grad of bias"), *results):
        _assert_close_scaled(actual, expected, *CONV_TOLERANCE, what)


def test_the_cuda_scan_guard_lets_zero_last_state_gradients_pass_and_refuses_others():
    from hcr_kernels.selective_scan.op import _refuse_last_state_gradient

    _refuse_last_state_gradient(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="use backend='reference', or detach the last state"):
        _refuse_last_state_gradient(torch.zeros(2, 3, 4).index_fill_(2, torch.tensor([1]), 1e-3))
