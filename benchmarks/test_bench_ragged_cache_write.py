"""ragged_cache_write_: reference vs native for one layer of a tiny-Qwen2 decode step, on CPU.

Batch 8, 2 KV heads, head dim 64, a static cache of 4096 slots, rows at lengths of
1k-4k tokens, fp32, states as the attention layer gives them (transposed views of
``[B, T, H, Dh]``). Two steps of the compressing generator: an ordinary decode step
(T = 1, every row appends one token) and a compression step (T = 16: four rows crop
back and re-encode 12-16 tokens, three decode, one has finished). The write is tiny
(16 and 118 KiB read and written), so the per-call overhead (argument checks, dispatch, the reference's
index building) is what is measured: it is paid once per layer per generated token.

``python -m pytest benchmarks/test_bench_ragged_cache_write.py --benchmark-only``
"""

from __future__ import annotations

import pytest
import torch

from hcr_kernels import ragged_cache_write_

BATCH, HEADS, HEAD_DIM, SLOTS = 8, 2, 64, 4096
ROUNDS, ITERATIONS = 100, 10

STEPS = {
    # name: (T, count per row); start = the row's length, minus a crop for re-encoding rows
    "decode T=1": (1, [1] * BATCH),
    "compression T=16": (16, [16, 12, 14, 13, 1, 1, 1, 0]),
}


def decode_step(steps: int, counts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    caches = [torch.randn(BATCH, HEADS, SLOTS, HEAD_DIM, generator=generator) for _ in "kv"]
    states = [torch.randn(BATCH, steps, HEADS, HEAD_DIM, generator=generator).transpose(1, 2) for _ in "kv"]
    lengths = torch.randint(1024, 4000, (BATCH,), generator=generator)
    count = torch.tensor(counts)
    crop = torch.where(count > 1, count - 2, 0)  # a compression re-encodes from just before its end marker
    return caches, states, lengths - crop, count


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_ragged_cache_write(benchmark, backend, step):
    steps, counts = STEPS[step]
    caches, states, start, count = decode_step(steps, counts)
    benchmark.group = f"ragged_cache_write_ fp32 B={BATCH} H={HEADS} Dh={HEAD_DIM} S={SLOTS}, {step}"
    moved = 2 * 2 * int(count.sum()) * HEADS * HEAD_DIM * caches[0].element_size()  # read + write, K and V
    benchmark.extra_info.update(backend=backend, bytes=moved)

    def fn():
        ragged_cache_write_(*caches, *states, start, count, backend=backend)

    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=5)
