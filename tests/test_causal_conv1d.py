"""causal_conv1d: the native CPU kernel against F.conv1d with causal padding."""

import pytest
import torch

from hcr_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref

CASES = [
    pytest.param(2, 60, 63, 4, "silu", True, id="D60-L63-K4-silu"),
    pytest.param(1, 5, 1, 3, None, False, id="L1-K3-nobias"),
    pytest.param(3, 16, 257, 1, "swish", True, id="K1-swish"),
    pytest.param(2, 33, 10, 4, None, True, id="K4-linear"),
    pytest.param(1, 8, 2, 4, "silu", True, id="L-shorter-than-K"),
]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("batch,channels,length,width,activation,with_bias", CASES)
def test_native_matches_reference(batch, channels, length, width, activation, with_bias):
    x = torch.randn(batch, channels, length)
    weight = torch.randn(channels, width)
    bias = torch.randn(channels) if with_bias else None
    grad_out = torch.randn(batch, channels, length)
    results = []
    for backend in ("native", "reference"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        out = causal_conv1d(*leaves, activation=activation, backend=backend)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves if t is not None])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_channels_last_view_and_bf16():
    x = torch.randn(2, 40, 24).transpose(1, 2).to(torch.bfloat16)  # [2, 24, 40] view
    weight = torch.randn(24, 4)
    out = causal_conv1d(x, weight, None, activation="silu", backend="native")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), causal_conv1d_ref(x, weight, None, "silu").float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "args,error,message",
    [
        pytest.param((torch.randn(2, 4, 5), torch.randn(3, 4)), ValueError, "weight must be", id="weight-shape"),
        pytest.param((torch.randn(2, 4, 5), torch.randn(4, 4), torch.randn(3)), ValueError, "bias must be", id="bias"),
        pytest.param((torch.randn(4, 5), torch.randn(4, 4)), ValueError, "x must be a 3-D", id="x-2d"),
        pytest.param((torch.ones(2, 4, 5, dtype=torch.long), torch.randn(4, 4)), TypeError, "floating", id="x-int"),
    ],
)
def test_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        causal_conv1d(*args, backend="native")


@pytest.mark.parametrize("shape", [(2, 3, 0), (2, 0, 5)], ids=["no-steps", "no-channels"])
def test_empty_input_in_both_backends(shape):
    """The reference returns what the kernel returns (F.conv1d refuses both shapes), gradients included."""
    grads = {}
    for backend in ("reference", "native"):
        x, weight, bias = torch.randn(*shape), torch.randn(shape[1], 4), torch.randn(shape[1])
        for t in (x, weight, bias):
            t.requires_grad_()
        out = causal_conv1d(x, weight, bias, activation="silu", backend=backend)
        out.sum().backward()
        assert out.shape == shape
        grads[backend] = [t.grad for t in (x, weight, bias)]
    for ours, theirs in zip(grads["reference"], grads["native"]):
        assert torch.equal(ours, theirs)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 2), activation="relu")
