"""Loss kernels: weighted cross entropy, the doublethink answer weights, fused linear + cross entropy.

* ``weighted_cross_entropy``: per-token CE times a per-token weight, summed; the fast
  paths compute the loss and its gradient in one pass over the logits.
* ``answer_loss_weights``: the weights of the doublethink loss (reasoning vs final answer).
* ``fused_linear_cross_entropy``: ``lm_head`` projection + CE in chunks of tokens, so the
  ``[N, V]`` logits never exist in full.
* ``IGNORE_INDEX`` (-100): the label the losses skip unless told another.

Backends: ``reference`` (plain PyTorch, fp32, the oracle), ``native`` (the compiled
extension, CPU), ``triton`` (CUDA tensors; CPU under ``TRITON_INTERPRET=1``).
``answer_loss_weights`` has no backends: it is a handful of vectorised integer ops.

Layout: three ops share one kernel (``weighted_cross_entropy_fwd_`` in ``native.py`` and
``triton_kernels.py``), so each op keeps a module named after it (``weighted.py``,
``fused_linear.py``, ``answer_weights.py``) in place of one ``op.py``, and what the two
kernel users share (backend checks, launchers, weights, argument checks) is ``common.py``.
"""

from __future__ import annotations

from hcr_kernels.cross_entropy.answer_weights import answer_loss_weights
from hcr_kernels.cross_entropy.common import BACKEND_CHECKS
from hcr_kernels.cross_entropy.fused_linear import fused_linear_cross_entropy
from hcr_kernels.cross_entropy.reference import (
    IGNORE_INDEX,
    fused_linear_cross_entropy_ref,
    weighted_cross_entropy_ref,
)
from hcr_kernels.cross_entropy.weighted import weighted_cross_entropy

__all__ = [
    "BACKEND_CHECKS",
    "IGNORE_INDEX",
    "answer_loss_weights",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "weighted_cross_entropy",
    "weighted_cross_entropy_ref",
]
