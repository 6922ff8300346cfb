"""Backend choice, the same for every op.

Order: an explicit ``backend=`` argument > the ``HCR_BACKEND`` environment
variable > the fastest backend available for the tensors' device > reference.
A backend that was asked for (argument or variable) and is unavailable raises an
error naming the fix; an automatic choice falls back silently. ``HCR_BACKEND`` is
a global choice: an op that does not implement that backend at all chooses
automatically (an explicit ``backend=`` it lacks is an error).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from hcr_kernels import _extension

BACKENDS = ("reference", "native", "triton", "cuda")
BACKEND_ENV_VAR = "HCR_BACKEND"

# Preference of the automatic choice per device type: fastest first.
AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "native", "reference"),
    "cpu": ("native", "reference"),
}


def triton_available(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (tests only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device) -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return (
        f"triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported, for tests); got {device.type} tensors"
    )


def choose_backend(
    op_name: str,
    device: torch.device,
    requested: str | None,
    checks: dict[str, Callable[[torch.device], None]],
) -> str:
    """Pick the backend of ``op_name`` for tensors on ``device``.

    ``checks`` maps each backend the op implements to a function that raises a
    clear error when that backend cannot run on ``device`` (and returns None when
    it can). ``reference`` is always implemented.
    """
    source = "backend="
    if requested is None and (from_environment := _extension.environment_variable(BACKEND_ENV_VAR)):
        requested, source = from_environment.strip().lower(), BACKEND_ENV_VAR
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op_name}: {source} must be one of {BACKENDS}, got {requested!r}")
        if requested not in checks:
            if source == BACKEND_ENV_VAR:  # a global choice: ops without that backend choose for themselves
                return _auto_choice(device, checks)
            raise ValueError(f"{op_name}: backend {requested!r} is not implemented; it has {tuple(checks)}")
        checks[requested](device)
        return requested
    return _auto_choice(device, checks)


def _auto_choice(device: torch.device, checks: dict) -> str:
    """The first backend in the device's preference order that can run here."""
    for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
        if candidate not in checks:
            continue
        try:
            checks[candidate](device)
        except RuntimeError:
            continue
        return candidate
    return "reference"


def require_triton(device: torch.device) -> None:
    if not triton_available(device):
        raise RuntimeError(f"backend 'triton' is not available: {triton_unavailable_reason(device)}")


def require_nothing(device: torch.device) -> None:
    """The reference backend runs everywhere torch does."""


def cuda_package_check(op_name: str, module: str, package: str) -> Callable[[torch.device], None]:
    """Check of a ``cuda`` backend served by an optional CUDA-only package (mamba-ssm, causal-conv1d)."""

    def check(device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' of {op_name} ({package}) needs CUDA tensors, got {device.type} tensors")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise RuntimeError(
                f"backend 'cuda' of {op_name} needs {package} ({error}); install it with: pip install '.[mamba-cuda]'"
            ) from error

    return check


def native_cpu_check(op_name: str, gpu_backend: str) -> Callable[[torch.device], None]:
    """Check of a ``native`` backend that has CPU kernels only; ``gpu_backend`` is named as the way on GPUs."""

    def check(device: torch.device) -> None:
        if device.type != "cpu":
            raise RuntimeError(
                f"backend 'native' of {op_name} runs on CPU tensors, got {device.type} tensors"
                + (f"; use backend={gpu_backend!r} on GPUs" if device.type == "cuda" else "")
            )
        _extension.require_native(device)

    return check
