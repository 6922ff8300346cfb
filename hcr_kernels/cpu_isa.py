"""Which instruction set the native CPU kernels run with: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or ``baseline``.

The extension compiles every hot loop once per ISA (with that ISA's vector width)
and picks the best the CPU has when it loads. ``avx512_bf16`` is AVX-512 plus the
bf16 dot-product instruction (AMD Zen 4 and later, Intel Cooper Lake and Sapphire
Rapids): every kernel runs its AVX-512 code there, and decode_linear's bf16 rows and
decode_attention's bf16 scores multiply bf16 values as stored, without widening them. ``amx`` is that plus Intel's AMX tiles
(Sapphire Rapids and later, where the OS grants them): decode_attention's bf16
scores and decode_linear's bf16 rows use tile dot products. ``HCR_CPU_ISA`` (read when ``hcr_kernels`` is imported) or
``set_cpu_isa`` chooses another, so every path a machine can run is tested and timed
on it; asking for one the CPU lacks is an error.
``python -m hcr_kernels.info`` reports the active one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from hcr_kernels import _extension

CPU_ISA_ENV_VAR = "HCR_CPU_ISA"
CPU_ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "baseline")


def active_cpu_isa() -> str | None:
    """The ISA the CPU kernels run with now (None without the compiled extension)."""
    return _extension._C.cpu_isa() if _extension.extension_loaded() else None


def supported_cpu_isas() -> tuple[str, ...]:
    """The ISAs this CPU can run, best first (empty without the compiled extension)."""
    return tuple(_extension._C.supported_cpu_isas()) if _extension.extension_loaded() else ()


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels with ``name``; a name not in ``CPU_ISAS`` or one this CPU lacks is a ValueError."""
    if not _extension.extension_loaded():
        raise RuntimeError(f"cannot select CPU ISA {name!r}: the compiled extension hcr_kernels._C is not loaded "
                           f"({_extension.import_error()})")
    _extension._C.set_cpu_isa(str(name).strip().lower())


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[str]:
    """Inside the block the CPU kernels run with ``name``; the previous ISA comes back on exit."""
    previous = active_cpu_isa()
    set_cpu_isa(name)
    try:
        yield name
    finally:
        set_cpu_isa(previous)


def apply_env() -> None:
    """Select the ISA named by ``HCR_CPU_ISA``, if set (called once, when hcr_kernels is imported)."""
    requested = os.environ.get(CPU_ISA_ENV_VAR, "").strip()
    if not requested or not _extension.extension_loaded():
        return
    try:
        set_cpu_isa(requested)
    except ValueError as error:
        raise ValueError(f"{CPU_ISA_ENV_VAR}={requested!r}: {error}") from None
