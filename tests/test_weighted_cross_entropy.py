"""weighted_cross_entropy: every backend against the reference.

Forward and the gradients to logits and weights, per-dtype tolerances, odd shapes
(vocabularies of 151,936 and 1,000, a few tokens and a few thousand), ignored
tokens, zero weights, -inf logits, a grad_output other than 1, and bad input
rejected with an error that names the argument.
"""

from __future__ import annotations

import pytest
import torch

import hcr_kernels
from hcr_kernels import weighted_cross_entropy, weighted_cross_entropy_ref
from param_sets import DTYPES, NATIVE_AND_TRITON, assert_close_by_rule

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FAST_BACKENDS = NATIVE_AND_TRITON
GRAD_OUTPUT = 2.5  # d(total)/d(loss) in run(): a grad_output other than 1
# (N, V, case, runs under the Triton interpreter). The interpreter runs one program per
# token on the CPU, so the few-thousand-token shape is native/GPU only.
SHAPES = [
    pytest.param(3, 151936, "random", True, id="N3-V151936"),
    pytest.param(37, 1000, "random", True, id="N37-V1000"),
    pytest.param(2049, 1000, "random", False, id="N2049-V1000"),
    pytest.param(5, 1, "random", True, id="N5-V1"),
    pytest.param(9, 333, "all-ignored", True, id="N9-V333-all-ignored"),
    pytest.param(9, 333, "zero-weights", True, id="N9-V333-zero-weights"),
    pytest.param(6, 4097, "neg-inf", True, id="N6-V4097-neg-inf-logits"),
    pytest.param(0, 50, "random", True, id="N0-V50"),
]


def make_inputs(tokens, vocab, case, dtype, device):
    logits = (torch.randn(tokens, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    weights = torch.rand(tokens, device=device) + 0.1
    labels[1::4] = -100  # some ignored tokens in every case
    if case == "all-ignored":
        labels.fill_(-100)
    elif case == "zero-weights":
        weights.zero_()
    elif case == "neg-inf":  # masked vocabulary entries (never the label)
        logits[:, : vocab // 2] = float("-inf")
        labels = torch.where(labels >= 0, labels % (vocab - vocab // 2) + vocab // 2, labels)
    return logits, labels, weights


def run(fn, logits, labels, weights, scale=GRAD_OUTPUT):
    logits = logits.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    loss = fn(logits, labels, weights)
    (loss * scale).backward()
    return loss.detach(), logits.grad, weights.grad


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,vocab,case,interpretable", SHAPES)
@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_matches_reference(backend, device, tokens, vocab, case, interpretable, dtype):
    if backend == "triton" and device == "cpu" and not interpretable:
        pytest.skip("too many tokens for the Triton interpreter")
    logits, labels, weights = make_inputs(tokens, vocab, case, dtype, device)
    loss, grad_logits, grad_weights = run(
        lambda x, y, w: weighted_cross_entropy(x, y, w, backend=backend), logits, labels, weights
    )
    ref_loss, ref_grad_logits, ref_grad_weights = run(weighted_cross_entropy_ref, logits, labels, weights)

    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == accumulate and loss.shape == ()
    assert grad_logits.dtype == dtype
    # param_sets.tolerance, n = V: every value goes through a softmax over V classes, so it
    # carries the relative error of a V-term normaliser; the loss sums N tokens on top. With
    # random logits CE_i is about logsumexp_i, so nothing cancels but p - 1 at the label.
    assert_close_by_rule(loss, ref_loss, vocab + tokens, 0.0, what="loss")
    assert_close_by_rule(grad_weights, ref_grad_weights, vocab, 0.0, what="grad of weights")
    at_label = torch.zeros_like(grad_logits, dtype=torch.bool)
    kept = (labels != -100).nonzero().flatten()
    at_label[kept, labels[kept]] = True
    assert_close_by_rule(grad_logits[~at_label], ref_grad_logits[~at_label], vocab, 0.0, what="grad of logits")
    # scale * w * (p - 1): the error of p (relative, up to p ~ 1) stays at the size of scale * w.
    label_scale = (GRAD_OUTPUT * weights[kept]).max().item() if kept.numel() else 0.0
    assert_close_by_rule(
        grad_logits[at_label], ref_grad_logits[at_label], vocab, label_scale, what="grad at the labels"
    )
    if case == "all-ignored" or case == "zero-weights":
        assert loss == 0 and not grad_logits.any()
    ignored = labels == -100
    assert not grad_logits[ignored].any() and not grad_weights[ignored].any()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_loss_is_the_weighted_sum_of_per_token_cross_entropy(backend):
    """Independent of the reference: sum_i w_i * CE_i with torch's own cross_entropy per token."""
    logits, labels, weights = make_inputs(11, 70, "random", torch.float32, "cpu")
    per_token = [
        torch.nn.functional.cross_entropy(logits[i : i + 1], labels[i : i + 1]) if labels[i] != -100 else torch.tensor(0.0)
        for i in range(11)
    ]
    expected = sum(w * ce for w, ce in zip(weights, per_token))
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights, backend=backend), expected)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_custom_ignore_index_and_int32_labels(backend):
    logits, labels, weights = make_inputs(13, 40, "random", torch.float32, "cpu")
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels).int()
    labels[::3] = 7
    loss = weighted_cross_entropy(logits, labels, weights, ignore_index=7, backend=backend)
    torch.testing.assert_close(loss, weighted_cross_entropy_ref(logits, labels.long(), weights, ignore_index=7))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backward_twice_with_retained_graph(backend):
    """The saved gradient is scaled out of place, so a second backward gives the same gradient."""
    logits, labels, weights = make_inputs(7, 50, "random", torch.float32, "cpu")
    logits.requires_grad_()
    loss = weighted_cross_entropy(logits, labels, weights, backend=backend)
    (first,) = torch.autograd.grad(loss * 3.0, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3.0, logits)
    assert torch.equal(first, second)
    (ref,) = torch.autograd.grad(weighted_cross_entropy_ref(logits, labels, weights) * 3.0, logits)
    assert_close_by_rule(first, ref, 50)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_an_ignored_tokens_logits_are_not_read(backend):
    """A NaN in an ignored token's row (a position the loss skips) reaches neither the loss nor any gradient,
    in every backend: the reference had given that row a NaN gradient where the kernels give 0."""
    logits, labels, weights = make_inputs(6, 40, "random", torch.float32, "cpu")
    labels[2] = -100
    logits[2, 5] = float("nan")
    logits.requires_grad_()
    loss = weighted_cross_entropy(logits, labels, weights, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[2], torch.zeros(40))
    clean = logits.detach().clone()
    clean[2] = 0.0  # what the row holds does not matter
    torch.testing.assert_close(loss, weighted_cross_entropy_ref(clean, labels, weights))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_no_gradient_wanted(backend):
    logits, labels, weights = make_inputs(7, 50, "random", torch.float32, "cpu")
    with torch.no_grad():
        loss = weighted_cross_entropy(logits, labels, weights, backend=backend)
    torch.testing.assert_close(loss, weighted_cross_entropy_ref(logits, labels, weights))
    non_contiguous = torch.randn(50, 7).t()
    torch.testing.assert_close(
        weighted_cross_entropy(non_contiguous, labels, weights, backend=backend),
        weighted_cross_entropy_ref(non_contiguous, labels, weights),
    )


def test_automatic_backend_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv(hcr_kernels.BACKEND_ENV_VAR, raising=False)
    from hcr_kernels import _dispatch
    from hcr_kernels.cross_entropy import BACKEND_CHECKS

    assert _dispatch.choose_backend("weighted_cross_entropy", torch.device("cpu"), None, BACKEND_CHECKS) == "native"
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        BACKEND_CHECKS["native"](torch.device("cuda"))


# ---------------------------------------------------------------- bad input


def valid_inputs():
    return torch.randn(4, 10), torch.tensor([1, 9, -100, 0]), torch.ones(4)


BAD_INPUTS = [
    pytest.param(lambda x, y, w: (x, y, w[:3]), ValueError, "weights has 3 tokens but there are N=4", id="weights-short"),
    pytest.param(lambda x, y, w: (x, y[:3], w), ValueError, "labels has 3 tokens but there are N=4", id="labels-short"),
    pytest.param(lambda x, y, w: (x, torch.tensor([1, 10, 0, 0]), w), ValueError, r"labels\[1\] = 10", id="label-V"),
    pytest.param(lambda x, y, w: (x, torch.tensor([1, 2, -5, 0]), w), ValueError, r"in \[0, 10\).*labels\[2\] = -5", id="label-neg"),
    pytest.param(lambda x, y, w: (x, y, w.to("meta")), ValueError, "weights on meta", id="weights-meta"),
    pytest.param(lambda x, y, w: (x[0], y, w), ValueError, "logits must be a 2-D", id="logits-1d"),
    pytest.param(lambda x, y, w: (x.long(), y, w), TypeError, "logits must be a floating-point", id="logits-int"),
    pytest.param(lambda x, y, w: (x, y.float(), w), TypeError, "labels must be an integer", id="labels-float"),
    pytest.param(lambda x, y, w: (x, y, w.long()), TypeError, "weights must be a floating-point", id="weights-int"),
    pytest.param(lambda x, y, w: (x, y[None], w), ValueError, "labels must be a 1-D", id="labels-2d"),
    pytest.param(lambda x, y, w: (x, y, 1.0), TypeError, "weights must be a torch.Tensor", id="weights-float"),
    pytest.param(lambda x, y, w: (x[:, :0], torch.full_like(y, -100), w), ValueError,
                 r"the vocabulary is empty \(V = 0\) for N = 4 tokens", id="V0-all-ignored"),
]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("corrupt,error,message", BAD_INPUTS)
def test_bad_input_is_rejected(backend, corrupt, error, message):
    with pytest.raises(error, match=message):
        weighted_cross_entropy(*corrupt(*valid_inputs()), backend=backend)


def test_bad_ignore_index_and_backend():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        weighted_cross_entropy(*valid_inputs(), ignore_index=-100.0)
    with pytest.raises(ValueError, match="backend= must be one of"):
        weighted_cross_entropy(*valid_inputs(), backend="fast")


def test_kernel_checks_labels_itself():
    """The compiled op is reachable on its own (torch.ops.hcr); it must not read out of bounds either."""
    logits, weights = torch.randn(2, 5), torch.ones(2)
    losses = torch.empty(2)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 5 is outside \[0, 5\)"):
        torch.ops.hcr.weighted_cross_entropy_fwd_(logits, torch.tensor([0, 5]), weights, -100, losses, None)
