"""Optional import of the compiled extension ``hcr_kernels._C``.

Importing it registers the ``torch.ops.hcr.*`` operators. A missing or broken
build never breaks ``import hcr_kernels``: the ``native`` backend is simply not
available, and asking for it explicitly raises an error that says how to rebuild.

The one loader of ``_C``: each op's ``native.py`` imports this module, registers its
fakes with ``register_fake`` and is the only caller of its ``torch.ops.hcr`` ops; the
module-level functions of ``_C`` (ISA choice, build info) are reached as ``_extension._C``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

REBUILD_COMMAND = 'pip install --no-build-isolation -e ".[test]"'

BUILD_REPORT = Path(__file__).with_name("_build.json")  # written by setup.py next to _C


def build_report() -> dict:
    """What ``setup.py`` recorded about the last build (torch version, why CUDA was skipped); {} if none."""
    try:
        return json.loads(BUILD_REPORT.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _explain_import_error(error: ImportError) -> ImportError:
    """Name the torch the extension was built against when it differs from the one importing it."""
    built_with = build_report().get("torch_version")
    if built_with and built_with != torch.__version__:
        return ImportError(f"{error} (hcr_kernels._C was built against torch {built_with}, this is torch "
                           f"{torch.__version__}: rebuild with {REBUILD_COMMAND})")
    return error


try:
    from hcr_kernels import _C  # noqa: F401  (registers torch.ops.hcr)

    _IMPORT_ERROR: BaseException | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = _explain_import_error(error)


def extension_loaded() -> bool:
    return _C is not None


def environment_variable(name: str) -> str | None:
    """``os.environ.get(name)``, for variables read on every call (``HCR_BACKEND``, ``HCR_AUTOTUNE``).

    Through ``_C`` when it is loaded: ``os.environ.get`` of an unset variable raises and
    catches two KeyErrors (~0.6 us, a fifth of a direct ``decode_linear`` call's Python),
    the C environment answers in ~0.07 us and says the same (``os.environ`` writes through
    putenv and unsetenv). torch.compile traces ``os.environ``, not ``_C``'s functions.
    """
    if _C is None or torch.compiler.is_compiling():
        return os.environ.get(name)
    return _C.environment_variable(name)


def weight_choice(weight: torch.Tensor) -> int | None:
    """A choice remembered for weights like ``weight`` (same device, dtype, shape, row contiguity) in this
    process's state (CPU ISA, thread count, the variables of ``set_weight_choice_environment``), else None.

    Kept by ``_C`` (``remember_weight_choice``), which reads that whole key from the weight and the process in
    one call: the same key built in Python took 1.2-1.4 us longer, more than the rest of a direct call's dispatch. None
    without ``_C`` or while torch.compile traces (which traces the Python key instead).
    """
    if _C is None or torch.compiler.is_compiling():
        return None
    return _C.weight_choice(weight)


def decode_linear_chosen(input, weight, bias, buckets: int | None) -> torch.Tensor | None:
    """``input @ weight.T + bias`` in one call into ``_C`` where the path is known: the native kernel where
    ``buckets`` (None: the choice remembered for this weight, ``weight_choice``) takes it at this row count,
    ``F.linear`` where it does not; None where nothing is known or anything is unusual (not plain CPU tensors,
    shapes or dtypes that do not fit, weight rows not contiguous, a gradient asked of the native kernel), and the
    caller's Python path decides. None without ``_C`` or while torch.compile traces (the op and its fake instead).
    """
    if _C is None or torch.compiler.is_compiling():
        return None
    return _C.decode_linear_chosen(input, weight, bias, buckets)


def remember_weight_choice(weight: torch.Tensor, choice: int) -> None:
    """Keep ``choice`` for weights like ``weight`` in this process's state (see ``weight_choice``)."""
    if _C is not None and not torch.compiler.is_compiling():
        _C.remember_weight_choice(weight, choice)


def set_weight_choice_environment(*names: str) -> None:
    """The environment variables a remembered weight choice depends on (read on every lookup); clears the table."""
    if _C is not None:
        _C.set_weight_choice_environment(list(names))


def forget_weight_choices() -> None:
    """Drop every remembered weight choice (``autotune.forget``)."""
    if _C is not None:
        _C.forget_weight_choices()


def register_fake(op_name: str):
    """``torch.library.register_fake("hcr::<op_name>")`` for torch.compile, when ``_C`` (which defines it) is loaded.

    The one way a ``native.py`` declares its ops' fakes: without ``_C`` there is no op to register against.
    """

    def register(fake):
        if _C is not None:
            torch.library.register_fake(f"hcr::{op_name}")(fake)
        return fake

    return register


def import_error() -> BaseException | None:
    """Why ``_C`` could not be imported (None when it was)."""
    return _IMPORT_ERROR


_NO_EXTENSION = {"cpu": False, "cuda": False, "cuda_runtime_version": None, "openmp": False}
_cached_info: tuple = (object(), _NO_EXTENSION)  # (the _C it describes, what that _C was built with)


def _info() -> dict:
    """What ``_C`` was built with, read once per ``_C``: the backend checks ask on every op call."""
    global _cached_info
    if _cached_info[0] is not _C:
        info = dict(_NO_EXTENSION) if _C is None else dict(_C.build_info())
        info["cuda_skipped_reason"] = None if info["cuda"] else build_report().get("cuda_skipped_reason")
        _cached_info = (_C, info)
    return _cached_info[1]


_info()  # read now: a first op call under torch.compile must not trace into _C.build_info()


def build_info() -> dict:
    """What the compiled extension contains: ``{"cpu": bool, "cuda": bool, ...}``."""
    return dict(_info())


@functools.cache
def build_fingerprint() -> str:
    """A short hash of the compiled ``_C`` file ("none" without it): what was measured with one
    build says nothing about the next (a kernel change, another compiler), so the measured
    choices (``autotune``) are kept per build."""
    if _C is None:
        return "none"
    digest = hashlib.sha256()
    with open(_C.__file__, "rb") as library:
        for block in iter(lambda: library.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def native_supports(device: torch.device) -> bool:
    """Whether ``_C`` has kernels for tensors on ``device``."""
    return bool(_info().get(device.type, False))


def require_native(device: torch.device) -> None:
    """Raise a clear error when the native kernels for ``device`` are missing."""
    if native_supports(device):
        return
    if _C is None:
        reason = f"the compiled extension hcr_kernels._C could not be imported ({_IMPORT_ERROR})"
    else:
        reason = f"hcr_kernels._C was built without {device.type.upper()} kernels"
        skipped = _info().get("cuda_skipped_reason") if device.type == "cuda" else None
        if skipped:
            reason += f" ({skipped})"
    hint = ""
    if device.type == "cuda":
        hint = " with a CUDA build of torch and nvcc on the PATH (or FORCE_CUDA=1)"
    raise RuntimeError(
        f"backend 'native' is not available for {device.type} tensors: {reason}. "
        f"Rebuild it from the repository root{hint}: {REBUILD_COMMAND}"
    )
