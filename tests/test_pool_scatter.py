"""window_mean_pool / pool_scatter: every backend against the reference.

Forward and both gradients, per-dtype tolerances, odd shapes, empty and full
masks, non-contiguous inputs; slots that are not selected must be bit-identical
to the template, and bad input must raise an error naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hcr_kernels
from hcr_kernels import pool_scatter, pool_scatter_ref, window_mean_pool, window_mean_pool_ref
from param_sets import DTYPES

HAS_GPU = torch.cuda.is_available()

# (atol, rtol) per dtype: every backend accumulates in fp32 and rounds once, like
# the reference, so the only differences are the order of the W additions.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# The backends that run here, with the dtypes each supports.
FAST_BACKENDS = [
    pytest.param("native", "cpu", (torch.float32, torch.float64, torch.float16, torch.bfloat16), id="native-cpu"),
    pytest.param("triton", "cpu", (torch.float32, torch.float16, torch.bfloat16), id="triton-interpret"),
    pytest.param(
        "native", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        id="native-cuda", marks=pytest.mark.gpu,
    ),
    pytest.param("triton", "cuda", (torch.float32, torch.float16, torch.bfloat16), id="triton-cuda", marks=pytest.mark.gpu),
]


# (B, T, D, W, which slots): odd sizes, D over one Triton block, W = 1, empty and full masks.
SHAPES = [
    pytest.param(2, 63, 60, 3, "random", id="B2-T63-D60-W3"),
    pytest.param(1, 1, 1, 1, "all", id="B1-T1-D1-W1"),
    pytest.param(3, 17, 33, 10, "all", id="B3-T17-D33-W10-all"),
    pytest.param(2, 9, 8, 2, "none", id="B2-T9-D8-W2-empty"),
    pytest.param(2, 11, 300, 1, "block", id="B2-T11-D300-W1-block"),
]


def make_mask(batch: int, length: int, which: str, device) -> torch.Tensor:
    if which == "all":
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if which == "none":
        return torch.zeros(batch, length, dtype=torch.bool, device=device)
    if which == "block":  # the real layout: a contiguous run of placeholders per row
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for row in range(batch):
            mask[row, 2 + row : 2 + row + length // 2] = True
        return mask
    return torch.rand(batch, length, device=device) < 0.4


def make_inputs(batch, length, dim, window, which, dtype, device):
    mask = make_mask(batch, length, which, device)
    template = torch.randn(batch, length, dim, device=device).to(dtype)
    hidden = torch.randn(int(mask.sum()), window, dim, device=device).to(dtype)
    return template, mask, hidden


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def run_with_grads(fn, template, mask, hidden, grad_out):
    template = template.detach().clone().requires_grad_()
    hidden = hidden.detach().clone().requires_grad_()
    out = fn(template, mask, hidden)
    out.backward(grad_out)
    return out.detach(), template.grad, hidden.grad


def skip_unsupported(dtype, dtypes):
    if dtype not in dtypes:
        pytest.skip(f"{dtype} is not a dtype of this backend")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,length,dim,window,which", SHAPES)
@pytest.mark.parametrize("backend,device,dtypes", FAST_BACKENDS)
def test_pool_scatter_matches_reference(backend, device, dtypes, batch, length, dim, window, which, dtype):
    skip_unsupported(dtype, dtypes)
    template, mask, hidden = make_inputs(batch, length, dim, window, which, dtype, device)
    grad_out = torch.randn_like(template)

    out, grad_template, grad_hidden = run_with_grads(
        lambda t, m, h: pool_scatter(t, m, h, backend=backend), template, mask, hidden, grad_out
    )
    ref_out, ref_grad_template, ref_grad_hidden = run_with_grads(pool_scatter_ref, template, mask, hidden, grad_out)

    assert out.dtype == dtype and out.shape == template.shape
    assert_close(out, ref_out, dtype)
    assert torch.equal(out[~mask], template[~mask]), "slots that are not selected must be bit-identical"
    assert torch.equal(grad_template, ref_grad_template), "the template gradient is a masked copy: bit-exact"
    assert_close(grad_hidden, ref_grad_hidden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("windows,window,dim", [(7, 3, 60), (1, 1, 1), (0, 2, 5), (4, 10, 300)])
@pytest.mark.parametrize("backend,device,dtypes", FAST_BACKENDS)
def test_window_mean_pool_matches_reference(backend, device, dtypes, windows, window, dim, dtype):
    skip_unsupported(dtype, dtypes)
    hidden = torch.randn(windows, window, dim, device=device).to(dtype)
    grad_out = torch.randn(windows, dim, device=device).to(dtype)
    results = []
    for fn in (lambda h: window_mean_pool(h, backend=backend), window_mean_pool_ref):
        leaf = hidden.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out, grad), (ref_out, ref_grad) = results
    assert out.dtype == dtype and out.shape == (windows, dim)
    assert_close(out, ref_out, dtype)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gradient_only_where_required(backend):
    """Frozen embeddings (the compression model) give a template without grad."""
    template, mask, hidden = make_inputs(2, 13, 6, 2, "random", torch.float32, "cpu")
    hidden.requires_grad_()
    out = pool_scatter(template, mask, hidden, backend=backend)
    (grad_hidden,) = torch.autograd.grad(out, hidden, torch.ones_like(out))
    assert torch.equal(grad_hidden, torch.full_like(hidden, 0.5))

    template.requires_grad_()
    hidden = hidden.detach()
    out = pool_scatter(template, mask, hidden, backend=backend)
    (grad_template,) = torch.autograd.grad(out, template, torch.ones_like(out))
    assert torch.equal(grad_template, (~mask).unsqueeze(-1).expand_as(template).float())


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_non_contiguous_inputs(backend):
    base_template = torch.randn(3, 40, 21)
    template = base_template.transpose(0, 1)[:19].transpose(0, 1)  # [3, 19, 21], strided
    mask = (torch.rand(19, 3) < 0.5).t()  # [3, 19], transposed
    hidden = torch.randn(int(mask.sum()), 21, 4)[:, :, :3].transpose(1, 2)  # [N, 3, 21], strided
    assert not (template.is_contiguous() or mask.is_contiguous() or hidden.is_contiguous())
    out = pool_scatter(template, mask, hidden, backend=backend)
    assert_close(out, pool_scatter_ref(template, mask, hidden), torch.float32)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_template_is_not_modified(backend):
    template, mask, hidden = make_inputs(2, 10, 5, 2, "random", torch.float32, "cpu")
    before = template.clone()
    pool_scatter(template, mask, hidden, backend=backend)
    assert torch.equal(template, before)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 40),
    dim=st.integers(1, 70),
    window=st.integers(1, 6),
    data=st.data(),
)
def test_native_property_random_masks(batch, length, dim, window, data):
    """Any mask: slot i (row-major) gets window i; everything else keeps the template."""
    flags = data.draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    mask = torch.tensor(flags, dtype=torch.bool).view(batch, length)
    template = torch.randn(batch, length, dim)
    hidden = torch.randn(int(mask.sum()), window, dim)
    out = pool_scatter(template, mask, hidden, backend="native")
    assert torch.equal(out[~mask], template[~mask])
    slots = mask.nonzero().tolist()
    for i, (row, col) in enumerate(slots):
        torch.testing.assert_close(out[row, col], hidden[i].mean(0), atol=1e-6, rtol=1e-5)


def test_automatic_backend_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv(hcr_kernels.BACKEND_ENV_VAR, raising=False)
    from hcr_kernels import _dispatch
    from hcr_kernels.pool_scatter import BACKEND_CHECKS

    assert _dispatch.choose_backend("pool_scatter", torch.device("cpu"), None, BACKEND_CHECKS) == "native"


# ---------------------------------------------------------------- bad input


def valid_inputs():
    template = torch.randn(2, 6, 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 4] = True
    hidden = torch.randn(3, 2, 4)
    return template, mask, hidden


BAD_INPUTS = [
    pytest.param(lambda t, m, h: (t, m, h[:2]), ValueError, "3 True slots but hidden has N=2", id="too-few-windows"),
    pytest.param(lambda t, m, h: (t, m, torch.randn(4, 2, 4)), ValueError, "N=4", id="too-many-windows"),
    pytest.param(lambda t, m, h: (t, m, h[..., :3]), ValueError, "hidden has D=3 but template has D=4", id="D-mismatch"),
    pytest.param(lambda t, m, h: (t, m.int(), h), TypeError, "slot_mask must have dtype torch.bool", id="mask-not-bool"),
    pytest.param(lambda t, m, h: (t, m, h.long()), TypeError, "hidden must be a floating-point", id="hidden-int"),
    pytest.param(lambda t, m, h: (t, m, torch.randn(3, 0, 4)), ValueError, "window W >= 1", id="W-zero"),
    pytest.param(lambda t, m, h: (t, m[:, :5], h), ValueError, "slot_mask must be [B, T]", id="mask-shape"),
    pytest.param(lambda t, m, h: (t[0], m, h), ValueError, "template must be a 3-D", id="template-2d"),
    pytest.param(lambda t, m, h: (t, m, h[0]), ValueError, "hidden must be a 3-D", id="hidden-2d"),
    pytest.param(lambda t, m, h: (t.double(), m, h), TypeError, "one dtype", id="dtype-mismatch"),
    pytest.param(lambda t, m, h: (t, m, h.to("meta")), ValueError, "one device", id="device-mismatch"),
    pytest.param(lambda t, m, h: (t.numpy(), m, h), TypeError, "template must be a torch.Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("corrupt,error,message", BAD_INPUTS)
def test_bad_input_is_rejected(backend, corrupt, error, message):
    args = corrupt(*valid_inputs())
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        pool_scatter(*args, backend=backend)


def test_window_mean_pool_rejects_bad_hidden():
    with pytest.raises(ValueError, match="window W >= 1"):
        window_mean_pool(torch.randn(3, 0, 4))
    with pytest.raises(TypeError, match="floating-point"):
        window_mean_pool(torch.ones(3, 2, 4, dtype=torch.int32))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend= must be one of"):
        pool_scatter(*valid_inputs(), backend="bogus")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(hcr_kernels.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="HCR_BACKEND must be one of"):
        pool_scatter(*valid_inputs())
    monkeypatch.setenv(hcr_kernels.BACKEND_ENV_VAR, "reference")
    template, mask, hidden = valid_inputs()
    assert torch.equal(pool_scatter(template, mask, hidden), pool_scatter_ref(template, mask, hidden))


def test_explicit_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pool_scatter(*valid_inputs(), backend="triton")


@pytest.mark.gpu
def test_native_cuda_kernels_are_used_on_gpu():
    template, mask, hidden = make_inputs(2, 33, 70, 3, "random", torch.float32, "cuda")
    out = pool_scatter(template, mask, hidden, backend="native")
    assert out.is_cuda
    assert_close(out, pool_scatter_ref(template, mask, hidden), torch.float32)
