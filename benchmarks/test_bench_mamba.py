"""Mamba on the CPU: one training step of the doublethink-sized model, and its ops.

The model: 4 layers, hidden 128, vocab 64 (intermediate 256, state 16), batch
64 x 64 tokens, forward + backward + AdamW step. Compared: transformers' slow
path (a Python loop over time steps: the reference), ``use_mambapy=True``, and
the model patched with ``apply_hcr_kernels_to_mamba`` (native scan and conv).
Targets: >= 10x faster than the slow path, >= 3x faster than mambapy.

The scan alone is compared with a warmed ``copy_`` (``bandwidth.py``) of the bytes it must read
and write (u, delta, z, B, C in; out and checkpoints out), the bound a single
pass over memory would give.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bandwidth import warm_copy  # noqa: E402

from hcr_kernels.causal_conv1d import causal_conv1d  # noqa: E402
from hcr_kernels.mamba_patch import apply_hcr_kernels_to_mamba  # noqa: E402
from hcr_kernels.selective_scan import selective_scan  # noqa: E402

BATCH, LENGTH, HIDDEN, LAYERS, VOCAB, STATE = 64, 64, 128, 4, 64, 16
CHANNELS = 2 * HIDDEN
ROUNDS = {"reference": 1, "mambapy": 2, "native": 5}


def train_step_fn(variant: str):
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATE, expand=2,
        conv_kernel=4, use_mambapy=variant == "mambapy",
    )
    model = transformers.MambaForCausalLM(config)
    if variant == "native":
        apply_hcr_kernels_to_mamba(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


@pytest.mark.parametrize("variant", ["reference", "mambapy", "native"])
def test_training_step(benchmark, variant):
    if variant == "mambapy":
        pytest.importorskip("mambapy")
    benchmark.group = f"Mamba {LAYERS}-layer training step, batch {BATCH} x {LENGTH} (reference = transformers slow path)"
    benchmark.extra_info.update(backend=variant)
    step = train_step_fn(variant)
    benchmark.pedantic(step, rounds=ROUNDS[variant], warmup_rounds=1 if variant == "native" else 0)


def scan_inputs(requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    tensors = dict(
        u=torch.randn(BATCH, LENGTH, CHANNELS, generator=generator).transpose(1, 2),
        delta=torch.randn(BATCH, LENGTH, CHANNELS, generator=generator).transpose(1, 2) * 0.5,
        A=-torch.rand(CHANNELS, STATE, generator=generator) * 2,
        B=torch.randn(BATCH, LENGTH, STATE, generator=generator).transpose(1, 2),
        C=torch.randn(BATCH, LENGTH, STATE, generator=generator).transpose(1, 2),
        D=torch.randn(CHANNELS, generator=generator),
        z=torch.randn(BATCH, LENGTH, CHANNELS, generator=generator).transpose(1, 2),
        delta_bias=torch.randn(CHANNELS, generator=generator) * 0.3,
    )
    return {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_selective_scan_forward_backward(benchmark, backend):
    inputs = scan_inputs(requires_grad=True)
    benchmark.group = f"selective_scan forward+backward, batch {BATCH}, channels {CHANNELS}, L {LENGTH}, N {STATE}"
    benchmark.extra_info.update(backend=backend)

    def step():
        out = selective_scan(**inputs, delta_softplus=True, backend=backend)
        return torch.autograd.grad(out.sum(), list(inputs.values()))

    benchmark.pedantic(step, rounds=1 if backend == "reference" else 10, warmup_rounds=1 if backend == "native" else 0)


def scan_bytes() -> int:
    """Bytes a single pass must move: u, delta, z in; B, C in; out and checkpoints out (fp32)."""
    sequence = BATCH * LENGTH * CHANNELS
    return 4 * (4 * sequence + 2 * BATCH * LENGTH * STATE + BATCH * CHANNELS * STATE)


@pytest.mark.parametrize("backend", ["native", "copy"])
def test_selective_scan_forward_vs_copy(benchmark, backend):
    benchmark.group = "selective_scan forward (no grad) vs a warmed copy of the same bytes"
    benchmark.extra_info.update(backend=backend, bytes=scan_bytes())
    if backend == "copy":
        benchmark.pedantic(warm_copy(scan_bytes()), rounds=20, warmup_rounds=2)
        return
    inputs = scan_inputs(requires_grad=False)
    benchmark.pedantic(lambda: selective_scan(**inputs, delta_softplus=True, backend="native"), rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_causal_conv1d_forward_backward(benchmark, backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, LENGTH, CHANNELS, generator=generator).transpose(1, 2).requires_grad_()
    weight = torch.randn(CHANNELS, 4, generator=generator, requires_grad=True)
    bias = torch.randn(CHANNELS, generator=generator, requires_grad=True)
    benchmark.group = f"causal_conv1d forward+backward, silu, batch {BATCH}, channels {CHANNELS}, L {LENGTH}, K 4"
    benchmark.extra_info.update(backend=backend)

    def step():
        out = causal_conv1d(x, weight, bias, activation="silu", backend=backend)
        return torch.autograd.grad(out.sum(), [x, weight, bias])

    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
