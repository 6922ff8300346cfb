"""``with decode_linears(model):`` route a model's ``nn.Linear`` layers through ``decode_linear``.

For generation on CPU: a decode step multiplies one row per sequence through every
layer, the case the native kernel exists for. Only modules whose type is exactly
``torch.nn.Linear`` are routed (subclasses such as quantised linears keep their own
forward; LoRA wrappers keep theirs and their inner ``nn.Linear`` layers are routed).
Each call still decides for itself: few rows on CPU take the native kernel, the rest
``F.linear``, exactly as before. The model is untouched outside the block, and on
exit (also by an exception) every layer gets its own forward back.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch

from hcr_kernels.decode_linear.op import apply_decode_linear, native_row_limit


def _routed_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return apply_decode_linear(input, self.weight, self.bias, self._hcr_native_rows)


@contextlib.contextmanager
def decode_linears(model: torch.nn.Module, *, backend: str | None = None) -> Iterator[torch.nn.Module]:
    """Inside the block every plain ``nn.Linear`` of ``model`` runs ``decode_linear(..., backend=backend)``.

    The backend is chosen per layer on entry (``HCR_BACKEND`` is read then); a call
    only compares its row count with the layer's limit. Layers whose ``forward`` was
    already replaced on the instance (by an outer ``decode_linears`` or anything
    else) are left alone, so blocks nest.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"decode_linears: model must be a torch.nn.Module, got {type(model).__name__}")
    routed = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    limits = [native_row_limit(m.weight, backend) for m in routed]  # raises before anything is patched
    for module, limit in zip(routed, limits):
        module._hcr_native_rows = limit
        module.forward = types.MethodType(_routed_forward, module)
    try:
        yield model
    finally:
        for module in routed:
            del module.forward, module._hcr_native_rows
