"""fused_linear_cross_entropy: every backend against the full-logits reference.

Forward and the gradients to hidden, lm_head weight, bias and token weights;
frozen lm_head (no weight gradient at all); chunk sizes from 1 token to more than
N; a 151,936-token vocabulary; mean and weighted reductions; all tokens ignored;
bad input rejected with an error that names the argument.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hcr_kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from hcr_kernels.cross_entropy.fused_linear import default_chunk_size
from param_sets import DTYPES, NATIVE_AND_TRITON, assert_close_by_rule

FAST_BACKENDS = NATIVE_AND_TRITON
# (N, H, V, chunk_size, case, runs under the Triton interpreter)
SHAPES = [
    pytest.param(37, 24, 101, 8, "random", True, id="N37-H24-V101-chunk8"),
    pytest.param(3, 16, 151936, None, "random", True, id="N3-H16-V151936"),
    pytest.param(2049, 20, 1000, 300, "random", False, id="N2049-H20-V1000-chunk300"),
    pytest.param(13, 8, 50, 1, "random", True, id="N13-H8-V50-chunk1"),
    pytest.param(9, 8, 333, 100, "all-ignored", True, id="N9-V333-all-ignored"),
    pytest.param(9, 8, 333, 4, "zero-weights", True, id="N9-V333-zero-weights"),
]


def make_inputs(tokens, dim, vocab, case, dtype, device):
    hidden = torch.randn(tokens, dim, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, device=device) / dim**0.5).to(dtype)
    bias = (torch.randn(vocab, device=device) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[2::5] = -100
    weights = torch.rand(tokens, device=device)
    if case == "all-ignored":
        labels.fill_(-100)
    elif case == "zero-weights":
        weights.zero_()
    return hidden, weight, bias, labels, weights


def run(fn, hidden, weight, bias, labels, weights, *, train_head=True, scale=1.5):
    leaves = {
        "hidden": hidden.detach().clone().requires_grad_(),
        "weight": weight.detach().clone().requires_grad_(train_head),
        "bias": None if bias is None else bias.detach().clone().requires_grad_(train_head),
        "weights": None if weights is None else weights.detach().clone().requires_grad_(),
    }
    loss = fn(leaves["hidden"], leaves["weight"], labels, leaves["weights"], bias=leaves["bias"])
    (loss * scale).backward()
    grads = {name: None if leaf is None else leaf.grad for name, leaf in leaves.items()}
    return loss.detach(), grads


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("reduction", ["mean", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim,vocab,chunk,case,interpretable", SHAPES)
@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_matches_reference(backend, device, tokens, dim, vocab, chunk, case, interpretable, dtype, reduction):
    if backend == "triton" and device == "cpu" and not interpretable:
        pytest.skip("too many tokens for the Triton interpreter")
    hidden, weight, bias, labels, weights = make_inputs(tokens, dim, vocab, case, dtype, device)
    if reduction == "mean":
        weights = None
    loss, grads = run(
        lambda h, w, y, tw, bias: fused_linear_cross_entropy(h, w, y, tw, bias=bias, chunk_size=chunk, backend=backend),
        hidden, weight, bias, labels, weights,
    )
    ref_loss, ref_grads = run(fused_linear_cross_entropy_ref, hidden, weight, bias, labels, weights)
    # param_sets.tolerance: the logits reduce H terms, the softmax V, the token sums N. The
    # gradients of hidden, weight and bias are matmuls with mixed signs (cancellation at max
    # |reference|); the loss and the token weights' gradient are sums of positive CEs. For
    # fp16/bf16 the fused path rounds the logits (and their gradient) to the input dtype, the
    # reference keeps them in fp32: condition max |logit| for the softmax, +1 for the gradient.
    n = dim + vocab + tokens
    rounding = {}
    if dtype in (torch.float16, torch.bfloat16):
        logits = F.linear(hidden.float(), weight.float(), bias.float())
        rounding = dict(rounded_to=dtype, condition=logits.abs().max().item() + 1 if logits.numel() else 1.0)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_by_rule(loss, ref_loss, n, 0.0, what="loss", **rounding)
    for name, grad in grads.items():
        if ref_grads[name] is None:
            assert grad is None
            continue
        assert grad.dtype == ref_grads[name].dtype, name
        no_cancellation = 0.0 if name == "weights" else None
        assert_close_by_rule(grad, ref_grads[name], n, no_cancellation, what=f"grad of {name}", **rounding)
    if case in ("all-ignored", "zero-weights") and not (case == "zero-weights" and reduction == "mean"):
        assert loss == 0 and not grads["hidden"].any() and not grads["weight"].any()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_frozen_lm_head_gets_no_gradient(backend):
    """The compression model: the lm_head is frozen, only the hidden states are trained."""
    hidden, weight, bias, labels, _ = make_inputs(21, 12, 77, "random", torch.float32, "cpu")
    loss, grads = run(
        lambda h, w, y, tw, bias: fused_linear_cross_entropy(h, w, y, tw, bias=bias, chunk_size=5, backend=backend),
        hidden, weight, None, labels, None, train_head=False,
    )
    ref_loss, ref_grads = run(fused_linear_cross_entropy_ref, hidden, weight, None, labels, None, train_head=False)
    assert grads["weight"] is None
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads["hidden"], ref_grads["hidden"])


@pytest.mark.parametrize("chunk", [1, 4, 16, 17, 1000, None], ids=lambda c: f"chunk{c}")
def test_chunk_size_does_not_change_the_result(chunk):
    hidden, weight, bias, labels, weights = make_inputs(17, 10, 64, "random", torch.float64, "cpu")
    loss, grads = run(
        lambda h, w, y, tw, bias: fused_linear_cross_entropy(h, w, y, tw, bias=bias, chunk_size=chunk, backend="native"),
        hidden, weight, bias, labels, weights,
    )
    ref_loss, ref_grads = run(fused_linear_cross_entropy_ref, hidden, weight, bias, labels, weights)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-12, rtol=1e-10)


def test_mean_is_cross_entropy_loss():
    """weights=None is torch.nn.CrossEntropyLoss on the materialised logits."""
    hidden, weight, bias, labels, _ = make_inputs(30, 16, 90, "random", torch.float32, "cpu")
    expected = torch.nn.CrossEntropyLoss()(hidden @ weight.t() + bias, labels)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=7), expected)


def test_default_chunk_size_bounds_the_logits():
    assert default_chunk_size(151936) * 151936 <= 2**25 < (default_chunk_size(151936) + 1) * 151936
    assert default_chunk_size(10**9) == 1


# ---------------------------------------------------------------- bad input


def valid_inputs():
    return torch.randn(4, 6), torch.randn(10, 6), torch.tensor([1, 9, -100, 0])


BAD_INPUTS = [
    pytest.param(lambda h, w, y: ((h, w[:, :5], y), {}), ValueError, r"lm_head_weight must be \[V, H\] with H=6", id="H-mismatch"),
    pytest.param(lambda h, w, y: ((h, w, y[:3]), {}), ValueError, "labels has 3 tokens but there are N=4", id="labels-short"),
    pytest.param(lambda h, w, y: ((h, w, torch.tensor([1, 10, 0, 0])), {}), ValueError, r"in \[0, 10\).*labels\[1\] = 10", id="label-V"),
    pytest.param(lambda h, w, y: ((h, w.double(), y), {}), TypeError, "one dtype", id="dtype-mismatch"),
    pytest.param(lambda h, w, y: ((h, w, y, torch.ones(4, device="meta")), {}), ValueError, "weights on meta", id="weights-meta"),
    pytest.param(lambda h, w, y: ((h, w, y, torch.ones(5)), {}), ValueError, "weights has 5 tokens", id="weights-long"),
    pytest.param(lambda h, w, y: ((h, w, y), {"bias": torch.ones(9)}), ValueError, r"bias must be \[V\] with V=10", id="bias-shape"),
    pytest.param(lambda h, w, y: ((h, w, y), {"chunk_size": 0}), ValueError, "chunk_size must be a positive int", id="chunk-0"),
    pytest.param(lambda h, w, y: ((h[0], w, y), {}), ValueError, "hidden must be a 2-D", id="hidden-1d"),
    pytest.param(lambda h, w, y: ((h, w[:0], torch.full_like(y, -100)), {}), ValueError,
                 r"the vocabulary is empty \(V = 0\) for N = 4 tokens", id="V0-all-ignored"),
]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("corrupt,error,message", BAD_INPUTS)
def test_bad_input_is_rejected(backend, corrupt, error, message):
    args, kwargs = corrupt(*valid_inputs())
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(*args, **kwargs, backend=backend)
