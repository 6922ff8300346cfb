"""The kernels on a CUDA GPU: the same shapes as the CPU benchmarks, GPU backends side by side.

Skipped without a GPU. Inputs come from the CPU modules' builders, moved to the
device, so a GPU figure and a CPU figure describe the same work:

* ``pool_scatter`` forward+backward (grad to the hidden states, frozen template):
  reference, the CUDA kernel of the extension (``native``), Triton, and a
  warmed ``copy_`` of the same bytes (``copy``, ``bandwidth.py``) as the bandwidth yardstick.
* ``weighted_cross_entropy`` forward+backward: reference vs Triton.
* ``fused_linear_cross_entropy`` forward+backward at the compression trainer's full
  shape (4,096 tokens x 151,936 x 1,536, frozen lm_head): time and peak GPU memory
  above the inputs (``torch.cuda.max_memory_allocated``), reference vs Triton.
* ``ragged_cache_write_`` for one layer of a decode step: reference vs the CUDA kernel.

Every timed call ends with ``torch.cuda.synchronize()``, so a median is the
kernels' time, not their launch time.
``python -m pytest benchmarks/test_bench_gpu_kernels.py --benchmark-only``
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from bandwidth import warm_copy  # noqa: E402
from test_bench_cross_entropy import CE_SHAPES, ce_inputs, fused_inputs, fused_step  # noqa: E402
from test_bench_pool_scatter import bytes_moved, compression_batch  # noqa: E402
from test_bench_ragged_cache_write import STEPS, decode_step  # noqa: E402

from hcr_kernels import pool_scatter, ragged_cache_write_, weighted_cross_entropy  # noqa: E402

GPU = torch.device("cuda")
ROUNDS = 20


def synchronized(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [2, 10], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("backend", ["reference", "native", "triton", "copy"])
def test_pool_scatter_forward_backward(benchmark, backend, window, dtype):
    template, mask, hidden = (t.to(GPU) for t in compression_batch(window, dtype=dtype))
    hidden.requires_grad_()
    grad_out = torch.randn_like(template)
    moved = bytes_moved(template, mask, hidden, backward=True, template_grad=False)
    benchmark.group = f"GPU pool_scatter forward+backward {str(dtype)[6:]} W={window}, grad to hidden"
    benchmark.extra_info.update(backend=backend, bytes=moved)
    if backend == "copy":
        fn = warm_copy(moved, dtype, GPU)
    else:
        def fn():
            out = pool_scatter(template, mask, hidden, backend=backend)
            return torch.autograd.grad(out, [hidden], grad_out)
    benchmark.pedantic(synchronized(fn), rounds=ROUNDS, warmup_rounds=3)


@pytest.mark.parametrize("shape", list(CE_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weighted_ce_forward_backward(benchmark, backend, dtype, shape):
    logits, labels, weights = (t.to(GPU) for t in ce_inputs(*CE_SHAPES[shape], dtype=dtype))
    logits.requires_grad_()
    benchmark.group = f"GPU weighted_cross_entropy forward+backward {shape} {str(dtype)[6:]}"
    benchmark.extra_info.update(backend=backend, bytes=2 * logits.numel() * logits.element_size())

    def fn():
        loss = weighted_cross_entropy(logits, labels, weights, backend=backend)
        return torch.autograd.grad(loss, logits)

    benchmark.pedantic(synchronized(fn), rounds=ROUNDS, warmup_rounds=3)


FUSED_FULL_SHAPE = (4096, 151936, 1536)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_linear_ce_forward_backward(benchmark, backend, dtype):
    hidden, weight, labels = fused_inputs(*FUSED_FULL_SHAPE)
    hidden = hidden.detach().to(GPU, dtype).requires_grad_()
    weight, labels = weight.to(GPU, dtype), labels.to(GPU)
    fused_step(hidden, weight, labels, backend)  # warm-up (compiles the Triton kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fused_step(hidden, weight, labels, backend)
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    tokens, vocab, dim = FUSED_FULL_SHAPE
    benchmark.group = f"GPU fused_linear_cross_entropy forward+backward {tokens}x{vocab}x{dim} {str(dtype)[6:]}, frozen lm_head"
    benchmark.extra_info.update(backend=backend, peak_mb=round(peak_mb, 1))
    benchmark.pedantic(synchronized(lambda: fused_step(hidden, weight, labels, backend)), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_ragged_cache_write(benchmark, backend, step):
    caches, states, start, count = decode_step(*STEPS[step])
    caches, states = [c.to(GPU) for c in caches], [s.to(GPU) for s in states]
    start, count = start.to(GPU), count.to(GPU)
    benchmark.group = f"GPU ragged_cache_write_ fp32, one layer, {step}"
    benchmark.extra_info.update(backend=backend)
    benchmark.pedantic(synchronized(lambda: ragged_cache_write_(*caches, *states, start, count, backend=backend)),
                       rounds=200, warmup_rounds=10)
