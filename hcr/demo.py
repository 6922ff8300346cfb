"""``hcr demo``: the environment report plus a short pool-scatter benchmark.

The benchmark times the compression model's splice step (window mean-pool +
scatter, forward and backward to the pooled hidden states) with every backend
that runs here, at a seed-like shape scaled to finish in seconds. The full
benchmark suite is ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from hcr_kernels import pool_scatter
from hcr_kernels.info import collect, report


def splice_batch(batch: int, length: int, dim: int, window: int, generator: torch.Generator):
    """A compressed batch: one block of placeholder slots per row, about a third of it."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    slots = length // 3
    mask[:, length // 10 : length // 10 + slots] = True
    template = torch.randn(batch, length, dim, generator=generator)
    hidden = torch.randn(batch * slots, window, dim, generator=generator, requires_grad=True)
    return template, mask, hidden


def time_backend(backend: str, template, mask, hidden, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    grad_out = torch.ones_like(template)
    timings = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        out = pool_scatter(template, mask, hidden, backend=backend)
        torch.autograd.grad(out, [hidden], grad_out)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[1:])


def run(batch: int = 8, length: int = 1024, dim: int = 1536, window: int = 2, repeats: int = 5) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    template, mask, hidden = splice_batch(batch, length, dim, window, generator)
    backends = [b for b in ("reference", "native") if b == "reference" or collect()["extension_cpu"]]
    results = {}
    for backend in tqdm(backends, desc="pool_scatter forward+backward", unit="backend"):
        results[backend] = time_backend(backend, template, mask, hidden, repeats)
    return results


def main(args) -> int:
    print(report())
    print()
    print(
        f"pool_scatter forward+backward, fp32, B={args.batch} T={args.length} D={args.dim} W={args.window} "
        f"(median of {args.repeats}):"
    )
    results = run(args.batch, args.length, args.dim, args.window, args.repeats)
    reference = results["reference"]
    for backend, seconds in results.items():
        print(f"  {backend:<10} {seconds * 1e3:8.2f} ms   {reference / seconds:5.2f}x vs reference")
    return 0
