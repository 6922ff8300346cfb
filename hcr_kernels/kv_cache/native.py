"""Host wrapper of the compiled ragged cache write (``torch.ops.hcr.ragged_cache_write_``), and its fake.

It writes the caches in place: there is nothing to allocate.
"""

from __future__ import annotations

import torch

from hcr_kernels import _extension


@_extension.register_fake("ragged_cache_write_")
def _ragged_cache_write_fake(key_cache, value_cache, key_states, value_states, start, count):
    """Under torch.compile: the op only writes its two caches in place (declared in its schema)."""
    return None


def _dh_contiguous(states: torch.Tensor) -> torch.Tensor:
    """The kernels need stride 1 along Dh; the attention layer's transposed views already have it."""
    return states if states.shape[-1] <= 1 or states.stride(-1) == 1 else states.contiguous()


def ragged_cache_write_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
) -> None:
    torch.ops.hcr.ragged_cache_write_(
        key_cache, value_cache, _dh_contiguous(key_states), _dh_contiguous(value_states),
        start.contiguous(), count.contiguous(),
    )
