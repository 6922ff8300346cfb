"""decode_linear: F.linear (reference) vs the native few-row kernel, on CPU.

Two weight sets, each timed as one call per matrix in turn (so the weights are as cold
as in a real decode step, not one matrix hot in L2):

* ``tiny Qwen2``: the 29 matrices of the generation benchmark's model (hidden 256,
  4 layers, intermediate 1024, vocabulary 512; 15.7 MB in fp32): q, k, v, o, gate,
  up, down per layer and the lm_head.
* ``1.5B MLP``: one MLP of R1-Distill-Qwen-1.5B (gate and up 8960 x 1536, down
  1536 x 8960; 82 MB in bf16).

M is the number of input rows (the batch of a decode step). ``bytes`` is what the
op must stream (the weights; inputs and outputs are tiny), ``copy`` a warmed ``copy_``
moving as many bytes (``bandwidth.py``). ``auto`` is the automatic choice (the native
kernel up to the row count it was measured faster for on this machine, see
``hcr_kernels.autotune``; measured before timing): it must never be slower than
``reference``. ``HCR_CPU_ISA=avx2`` (or ``baseline``) times another ISA's kernels.

``test_decode_linear_interleaved`` times ``reference``, ``native``, ``auto`` and ``copy`` alternating
in a few of these cases (``interleaved.py``): the ratios to trust on a shared machine, and the share of
a copy's bandwidth (the target where ``F.linear`` is itself near the memory bound) taken in the same rounds.

The ``1.5B MLP`` (79-158 MiB) fits in a large L3 (300-480 MiB on this project's Intel
Xeons), where a real step's other 27 layers would have pushed it out between two calls:
both tests read a buffer of twice the last-level cache before each of its timed calls
(``bandwidth.last_level_cache_eviction``, untimed), as decode_attention's do. The tiny
model's weights stay in an L3 in use too, and are timed as they are.

``python -m pytest benchmarks/test_bench_decode_linear.py --benchmark-only``
"""

from __future__ import annotations

import functools

import pytest
import torch

from bandwidth import last_level_cache_eviction, warm_copy  # noqa: E402
from interleaved import record_interleaved  # noqa: E402

from hcr_kernels import decode_linear

TINY_QWEN2 = [(256, 256), (128, 256), (128, 256), (256, 256), (1024, 256), (1024, 256), (256, 1024)] * 4 + [(512, 256)]
MLP_1_5B = [(8960, 1536), (8960, 1536), (1536, 8960)]
WEIGHT_SETS = {"tiny Qwen2": TINY_QWEN2, "1.5B MLP": MLP_1_5B}
WEIGHTS_FROM_MEMORY = ("1.5B MLP",)  # a model too large for an L3: its weights come from memory in use

CASES = [  # (weights, dtype, rows)
    *[("tiny Qwen2", torch.float32, rows) for rows in (1, 4, 8, 16, 32)],
    *[("tiny Qwen2", torch.bfloat16, rows) for rows in (1, 4, 8)],
    *[("tiny Qwen2", torch.float16, rows) for rows in (1, 4, 8)],
    ("1.5B MLP", torch.float32, 1),
    *[("1.5B MLP", torch.bfloat16, rows) for rows in (1, 8)],
]
INTERLEAVED_CASES = [
    *[("tiny Qwen2", dtype, 1) for dtype in (torch.float32, torch.bfloat16, torch.float16)],
    ("tiny Qwen2", torch.float32, 32),
    *[("1.5B MLP", torch.bfloat16, rows) for rows in (1, 8)],
]


def case_ids(cases) -> list[str]:
    return [f"{w.split()[0]}-{str(d)[6:]}-M{r}" for w, d, r in cases]


def layer_stack(shapes, dtype, rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(*shape, generator=generator) / shape[1] ** 0.5).to(dtype) for shape in shapes]
    inputs = {k: torch.randn(rows, 1, k, generator=generator).to(dtype) for k in {shape[1] for shape in shapes}}
    return weights, inputs


def stack_pass(matrices, inputs, backend: str):
    """One call per matrix in turn through ``backend`` (``auto``: the automatic choice, measured here,
    before any timing)."""
    chosen = None if backend == "auto" else backend
    for weight in matrices:
        decode_linear(inputs[weight.shape[1]], weight, backend=chosen)

    def run():
        for weight in matrices:
            decode_linear(inputs[weight.shape[1]], weight, backend=chosen)

    return run


@functools.lru_cache(maxsize=1)  # the paths of a case run one after another (the parametrize order below)
def case_stack(weights: str, dtype: torch.dtype, rows: int):
    """The case's ``layer_stack``, one for all its paths. Why: the tiny model's 16 MiB stay in an L3 of 32 MiB,
    and how fast a stack reads from there depends on where it landed: six stacks of the same shapes, timed one at
    a time, took 384-554 us on the AVX2 EPYC (Zen 3) where alternating they all took 955-998 us from memory. With a
    stack of its own each path had its own placement, and the sequential groups' ratios moved by +-40 %."""
    return layer_stack(WEIGHT_SETS[weights], dtype, rows)


@pytest.fixture(scope="module", autouse=True)
def _drop_case_stack():
    yield
    case_stack.cache_clear()  # up to 158 MiB the rest of the session need not hold


@pytest.mark.parametrize("backend", ["reference", "native", "auto", "copy"])
@pytest.mark.parametrize("weights,dtype,rows", CASES, ids=case_ids(CASES))
def test_decode_linear(benchmark, backend, weights, dtype, rows):
    matrices, inputs = case_stack(weights, dtype, rows)
    moved = sum(w.numel() for w in matrices) * matrices[0].element_size()
    benchmark.group = f"decode_linear, {weights} ({moved / 2**20:.0f} MiB), {str(dtype)[6:]}, M={rows} rows"
    benchmark.extra_info.update(backend=backend, bytes=moved)
    run = warm_copy(moved, dtype) if backend == "copy" else stack_pass(matrices, inputs, backend)
    setup = last_level_cache_eviction() if weights in WEIGHTS_FROM_MEMORY else None
    with torch.inference_mode():
        benchmark.pedantic(run, setup=setup, rounds=20 if weights == "tiny Qwen2" else 7, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("weights,dtype,rows", INTERLEAVED_CASES, ids=case_ids(INTERLEAVED_CASES))
def test_decode_linear_interleaved(benchmark, weights, dtype, rows):
    matrices, inputs = layer_stack(WEIGHT_SETS[weights], dtype, rows)
    moved = sum(w.numel() for w in matrices) * matrices[0].element_size()
    benchmark.group = f"decode_linear interleaved, {weights} ({moved / 2**20:.0f} MiB), {str(dtype)[6:]}, M={rows} rows"
    benchmark.extra_info.update(bytes=moved)
    with torch.inference_mode():
        paths = {backend: stack_pass(matrices, inputs, backend) for backend in ("reference", "native", "auto")}
        paths["copy"] = warm_copy(moved, dtype)
        record_interleaved(benchmark, paths, rounds=40 if weights == "tiny Qwen2" else 10,
                           baselines=["reference", "copy"],
                           warmup_rounds=2,
                           between=last_level_cache_eviction() if weights in WEIGHTS_FROM_MEMORY else None)
