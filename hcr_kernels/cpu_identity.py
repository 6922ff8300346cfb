"""Which CPU this is, beyond its marketing name, and the cache sizes the OS reports for it.

Measured choices are cached per machine (``autotune``) and every benchmark figure is given with
the machine it came from. Cloud machines often name only a family: this project's AVX2 Zen 3
(512 KiB of L2 a core) and its AVX-512 Zen 4 (1 MiB) both say "AMD EPYC", and a kernel tuned on
one of them was measured slower than PyTorch on the other. So the identity adds the vendor's
family, model and stepping numbers and the caches' sizes, and a cache file on a home directory
shared by different machines keeps their decisions apart.

The sizes come from sysfs: Python's ``os.sysconf`` knows no ``SC_LEVEL2_CACHE_SIZE`` (glibc's
extension), which had left ``autotune``'s eviction at its 1 MiB-a-core fallback on every machine.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

CPU_INFO = Path("/proc/cpuinfo")
CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}  # the suffixes of sysfs' size files
_NUMBERS = ("cpu family", "model", "stepping")  # /proc/cpuinfo's fields that tell a CPU generation apart


def cache_bytes(caches: Path = CPU0_CACHES) -> dict[int, int]:
    """Bytes of the data (or unified) cache at each level that the first CPU sees, as the OS reports
    them; {} where it does not (no sysfs: not Linux, or a container without it)."""
    sizes: dict[int, int] = {}
    for index in sorted(caches.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
            size = int(text[:-1]) * _SIZE_UNITS[text[-1]] if text[-1:] in _SIZE_UNITS else int(text)
        except (OSError, ValueError):
            continue
        if kind != "Instruction":
            sizes[level] = max(size, sizes.get(level, 0))
    return sizes


def _first_processor(cpuinfo: Path) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` ({} where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _size_text(size: int) -> str:
    return f"{size >> 20} MiB" if size % 2**20 == 0 else f"{size >> 10} KiB"


def describe_cpu(cpuinfo: Path = CPU_INFO, caches: Path = CPU0_CACHES) -> str:
    """"AMD EPYC (cpu family 25, model 1, stepping 1; L1 32 KiB, L2 512 KiB, L3 32 MiB)": the model name
    with whichever of the numbers and cache sizes the OS reports (the processor's name alone elsewhere)."""
    fields = _first_processor(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    numbers = ", ".join(f"{key} {fields[key]}" for key in _NUMBERS if key in fields)
    sizes = ", ".join(f"L{level} {_size_text(size)}" for level, size in sorted(cache_bytes(caches).items()))
    details = "; ".join(part for part in (numbers, sizes) if part)
    return f"{name} ({details})" if details else name


@functools.cache
def cpu_identity() -> str:
    """``describe_cpu`` of this machine (it cannot change within a process)."""
    return describe_cpu()
