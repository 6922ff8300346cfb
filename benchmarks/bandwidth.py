"""The ``copy`` yardstick of the benchmarks: what this machine's memory moves, warmed up;
and ``last_level_cache_eviction``, which puts a call's operands back in memory.

A ``clone()`` allocates its output on every call; where the allocator hands back
fresh pages, it times page faults more than bandwidth (3 GB/s for 158 MiB on one of
this project's machines, where ``F.linear`` streamed the same bytes at 17.8 GB/s).
So the yardstick is a ``copy_`` between two buffers allocated once and touched once
before timing: it reads half the bytes and writes the other half.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from hcr_kernels.cpu_identity import cache_bytes


def warm_copy(moved: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Callable:
    """A call that moves ``moved`` bytes (reads ``moved / 2``, writes ``moved / 2``) between preallocated buffers."""
    elements = max(1, moved // 2 // torch.empty((), dtype=dtype).element_size())
    source = torch.randn(elements, device=device).to(dtype)
    target = torch.empty_like(source)
    target.copy_(source)  # touches every page of both once

    def copy():
        return target.copy_(source)

    return copy


def last_level_cache_bytes() -> int:
    """The size of the largest CPU cache the OS reports (the L3 on this project's machines; 0 if it does not say)."""
    return max(cache_bytes().values(), default=0)


@functools.cache  # one buffer for a session's benchmarks
def last_level_cache_eviction(limit: int = 2**30) -> Callable:
    """A call reading a buffer of twice the last-level cache (at most ``limit`` bytes): run before a timed call,
    it leaves that call's operands in memory, as a model's step leaves them when its weights stream through
    the cache between two calls of a layer. It reads (a sum), as the weights are read: written lines would be
    written back to memory during the timed call, taking bandwidth from it."""
    buffer = torch.ones(min(limit, 2 * max(last_level_cache_bytes(), 2**20)) // 4, dtype=torch.float32)

    def evict() -> None:  # returns nothing: pytest-benchmark takes what a pedantic setup returns as arguments
        buffer.sum()

    return evict
