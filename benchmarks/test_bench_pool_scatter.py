"""pool_scatter: reference vs native at the compression trainer's shapes, on CPU.

A batch of 8 traces of 1k-4k tokens, D = 1536 (R1-Distill-Qwen-1.5B), window W in
{2, 10}. Each row is one training stage with about half of its reasoning
compressed: k = 0.45 * L / W windows, so the compressed row has L - k*W + k + 2
tokens and its k placeholder slots form one block after a 10% prefix. The pooled
hidden states are [sum k, W, D]. Targets on the CPU: native >= 2x reference for
forward+backward, and >= 50% of the bandwidth of a plain copy of the same bytes.
``native-reused-output`` times the forward kernel writing into an output allocated
once. The op's own output is an allocation of ~150 MiB per call; where glibc hands it
fresh pages, page faults (not the kernel) take most of the ``native`` and ``reference``
times, so the session keeps freed memory for reuse (``page_faults``) and every path
records its page faults per call.

``python -m pytest benchmarks/ --benchmark-only`` runs them; the ratios are printed
at the end of the run.
"""

from __future__ import annotations

import pytest
import torch

from bandwidth import warm_copy  # noqa: E402
from page_faults import pedantic_counting_faults

from hcr_kernels import pool_scatter

DIM = 1536
BATCH = 8
ROUNDS = 7
WARMUP = 2  # lets the reused heap grow to what a call needs (see page_faults)


def compression_batch(window: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1024, 4097, (BATCH,), generator=generator).tolist()
    windows = [int(0.45 * length / window) for length in lengths]
    compressed = [length - k * window + k + 2 for length, k in zip(lengths, windows)]
    mask = torch.zeros(BATCH, max(compressed), dtype=torch.bool)
    for row, (length, k) in enumerate(zip(lengths, windows)):
        start = length // 10 + 1
        mask[row, start : start + k] = True
    template = torch.randn(BATCH, mask.shape[1], DIM, generator=generator).to(dtype)
    hidden = torch.randn(sum(windows), window, DIM, generator=generator).to(dtype)
    return template, mask, hidden


def bytes_moved(template, mask, hidden, *, backward: bool, template_grad: bool) -> int:
    """What a single-pass kernel must read and write."""
    size = template.element_size()
    rows, slots = mask.numel(), int(mask.sum())
    dim, window = template.shape[-1], hidden.shape[1]
    moved = ((rows - slots) * dim + rows * dim + slots * window * dim) * size  # read template + hidden, write out
    if backward:
        moved += (rows * dim + slots * window * dim) * size  # read grad_out, write grad_hidden
        if template_grad:
            moved += rows * dim * size  # write grad_template
    return moved


def kernel_into_reused_output(template, mask, hidden):
    """The native kernel alone, writing an output allocated and touched once: what the op costs without its
    allocation (~150 MiB at these shapes, fresh pages on every call where glibc maps such blocks)."""
    from hcr_kernels.pool_scatter import native, op

    window_of_row, _ = op._window_of_row(mask)
    flat = template.reshape(-1, template.shape[-1])
    out = torch.zeros_like(flat)

    def fn():
        native.pool_rows_(flat, window_of_row, hidden, out)
        return out

    return fn


@pytest.mark.parametrize("window", [2, 10], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("backend", ["reference", "native", "native-reused-output", "copy"])
def test_forward(benchmark, backend, window):
    template, mask, hidden = compression_batch(window)
    moved = bytes_moved(template, mask, hidden, backward=False, template_grad=False)
    benchmark.group = f"pool_scatter forward fp32 W={window}"
    benchmark.extra_info.update(backend=backend, bytes=moved)
    if backend == "copy":
        fn = warm_copy(moved, template.dtype)
    elif backend == "native-reused-output":
        fn = kernel_into_reused_output(template, mask, hidden)
    else:
        def fn():
            return pool_scatter(template, mask, hidden, backend=backend)
    with torch.no_grad():
        pedantic_counting_faults(benchmark, fn, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("template_grad", [False, True], ids=["grad-hidden", "grad-both"])
@pytest.mark.parametrize("window", [2, 10], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("backend", ["reference", "native", "copy"])
def test_forward_backward(benchmark, backend, window, template_grad):
    template, mask, hidden = compression_batch(window)
    template.requires_grad_(template_grad)
    hidden.requires_grad_()
    grad_out = torch.randn_like(template)
    inputs = [template, hidden] if template_grad else [hidden]
    moved = bytes_moved(template, mask, hidden, backward=True, template_grad=template_grad)
    what = "template+hidden" if template_grad else "hidden (frozen template)"
    benchmark.group = f"pool_scatter forward+backward fp32 W={window}, grad to {what}"
    benchmark.extra_info.update(backend=backend, bytes=moved)
    if backend == "copy":
        fn = warm_copy(moved, template.dtype)
    else:
        def fn():
            out = pool_scatter(template, mask, hidden, backend=backend)
            return torch.autograd.grad(out, inputs, grad_out)
    pedantic_counting_faults(benchmark, fn, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_forward_backward_bf16(benchmark, backend):
    template, mask, hidden = compression_batch(2, dtype=torch.bfloat16)
    hidden.requires_grad_()
    grad_out = torch.randn_like(template)
    benchmark.group = "pool_scatter forward+backward bf16 W=2, grad to hidden"
    benchmark.extra_info.update(backend=backend, bytes=bytes_moved(template, mask, hidden, backward=True, template_grad=False))

    def fn():
        out = pool_scatter(template, mask, hidden, backend=backend)
        return torch.autograd.grad(out, [hidden], grad_out)

    pedantic_counting_faults(benchmark, fn, rounds=ROUNDS, warmup_rounds=WARMUP)
