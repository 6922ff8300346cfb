"""The ``copy`` yardstick of the benchmarks: what this machine's memory moves, warmed up.

A ``clone()`` allocates its output on every call; where the allocator hands back
fresh pages, it times page faults more than bandwidth (3 GB/s for 158 MiB on one of
this project's machines, where ``F.linear`` streamed the same bytes at 17.8 GB/s).
So the yardstick is a ``copy_`` between two buffers allocated once and touched once
before timing: it reads half the bytes and writes the other half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def warm_copy(moved: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Callable:
    """A call that moves ``moved`` bytes (reads ``moved / 2``, writes ``moved / 2``) between preallocated buffers."""
    elements = max(1, moved // 2 // torch.empty((), dtype=dtype).element_size())
    source = torch.randn(elements, device=device).to(dtype)
    target = torch.empty_like(source)
    target.copy_(source)  # touches every page of both once

    def copy():
        return target.copy_(source)

    return copy
