"""Selective scan (Mamba's S6 recurrence) with a native CPU forward and backward.

Without a GPU, ``transformers``' Mamba runs the recurrence as a Python loop of
small tensor ops and differentiates through it: a 4-layer toy model takes tens
of seconds per training step. The ``native`` backend runs the scan and its
reverse (adjoint) scan in C++ (``csrc/selective_scan_cpu.cpp``), parallel over
batch rows and chunks of channels, with the state in cache and checkpoints every
``CHECKPOINT_SEGMENT`` steps instead of an autograd graph per step.

Backends: ``reference`` (the recurrence in PyTorch, fp32), ``native`` (CPU; computes
in fp32 and returns ``u.dtype``), ``cuda`` (``mamba_ssm``'s kernel, when installed and
the tensors are on a GPU).

Supported subset of ``mamba_ssm.selective_scan_fn``: real ``A [channels, N]`` with
N <= 256; input-dependent ``B``/``C`` shared by all channels ``[batch, N, L]`` or
grouped ``[batch, G, N, L]`` (G divides channels). Time-invariant ``B``/``C``
(``[channels, N]``) and complex A are rejected with an error.
"""

from hcr_kernels.selective_scan.native import CHECKPOINT_SEGMENT
from hcr_kernels.selective_scan.op import (
    BACKEND_CHECKS,
    MAX_STATE,
    SelectiveScanFunction,
    selective_scan,
)
from hcr_kernels.selective_scan.reference import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "SelectiveScanFunction", "BACKEND_CHECKS", "MAX_STATE",
           "CHECKPOINT_SEGMENT"]
