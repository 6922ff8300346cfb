"""Measured choices: whether a fast path beats its reference on *this* machine.

Where the faster of two equivalent paths depends on the CPU (its ISA, caches,
core count, the BLAS torch was built with), a threshold tuned on one machine was
measured slower than plain PyTorch on another. So such choices are measured here,
at first use: both paths run interleaved a few times, each call starting with the
cores' caches cleared of its operands (as between two calls of one layer in a model's
step), and the fast path is taken only if its median time is below ``MARGIN`` times the
reference's. A tie or a loss keeps the reference, so a measured choice is never slower
than not having the fast path (up to the noise of a short measurement).

Decisions are cached per machine (``cpu_identity``: the CPU's name, family, model,
stepping and cache sizes; the active ISA, thread count, torch version), per build of
the compiled kernels (a hash of ``_C``: a rebuilt kernel is measured again, and the
old build's decisions are dropped from the file) and per shape class: in memory,
and in ``autotune.json`` under ``HCR_CACHE_DIR`` (default ``~/.cache/hcr``) so the
next process does not measure again. ``HCR_AUTOTUNE=0`` turns measuring off: every
machine-dependent choice then takes the reference path. ``python -m hcr_kernels.info``
lists the cached decisions.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hcr_kernels import _extension, cpu_isa
from hcr_kernels.cpu_identity import cache_bytes, cpu_identity

AUTOTUNE_ENV_VAR = "HCR_AUTOTUNE"
CACHE_DIR_ENV_VAR = "HCR_CACHE_DIR"
MARGIN = 0.95  # the fast path must save at least 5 % to be chosen: below that, noise could decide
ROUNDS = 7  # timed calls of each path (after one warm-up call each), interleaved

_decisions: dict[tuple[str, str, str], str] = {}
_derived: dict[tuple, object] = {}
_NOT_DERIVED = object()  # a derived value may be None
_measuring = [0.0]  # wall seconds this process has spent measuring decisions


def measuring_seconds() -> float:
    """Wall seconds this process has spent measuring decisions so far: a one-time cost (per machine and
    shape class) that a job timing itself can set aside rather than count as its own work."""
    return _measuring[0]


def enabled() -> bool:
    """False when ``HCR_AUTOTUNE`` is 0/false/off/no."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in {"0", "false", "off", "no"}


_BUILD_FIELD = " | hcr_kernels._C "
# How decisions are measured; part of the key, so decisions measured another way are measured again
# (2: each timed call starts with the cores' caches written over, see ``measure``; 3: decode_linear times a
# round over copies of the weight, see ``decode_linear.op.weight_rotation``; 4: its kernel side is timed as a
# direct call runs it, one call into _C, not the op through torch's dispatcher).
MEASURE_METHOD = 4


def machine_key() -> str:
    """What a measured decision depends on besides the shape: the machine, the build of the kernels, and
    how decisions are measured (the last two after ``_BUILD_FIELD``: another build's or method's decisions
    for this machine are dropped from the file when a decision is written)."""
    return (f"{cpu_identity()} | isa {cpu_isa.active_cpu_isa()} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}{_BUILD_FIELD}{_extension.build_fingerprint()} | measured {MEASURE_METHOD}")


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "hcr")
    return Path(root) / "autotune.json"


def _read_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as file:
            data = json.load(file)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure again
        return {}


def _write_cache(machine: str, key: str, record: dict) -> None:
    """Add one decision to the cache file (atomically replaced; a lost race only costs a re-measurement)."""
    path = cache_path()
    data = _read_cache()
    same_machine = machine.rsplit(_BUILD_FIELD, 1)[0]
    for stale in [other for other in data if other != machine and other.rsplit(_BUILD_FIELD, 1)[0] == same_machine]:
        del data[stale]  # another build's decisions on this machine: they no longer hold
    data.setdefault(machine, {})[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".autotune-", suffix=".json",
                                         delete=False, encoding="utf-8") as file:
            json.dump(data, file, indent=1, sort_keys=True)
        os.replace(file.name, path)
    except OSError:  # a read-only home: the decision still holds for this process
        pass


def core_caches_bytes(threads: int | None = None) -> int:
    """Twice the L2 of each core torch runs on (at least 1 MiB a core, and that where the OS does not say):
    what a measurement moves through the cores so that a call finds its operands out of them."""
    return 2 * max(cache_bytes().get(2, 0), 1 << 20) * (torch.get_num_threads() if threads is None else threads)


@functools.cache
def _eviction_buffer(threads: int) -> torch.Tensor:
    """``core_caches_bytes``: the fill is shared among the threads, so every core that runs a timed call
    gets its L2 written over. Made outside inference mode: a first measurement under
    ``torch.inference_mode`` (a generation's) would otherwise leave an inference tensor that a later
    measurement outside it may not write."""
    with torch.inference_mode(False):
        return torch.empty(core_caches_bytes(threads), dtype=torch.uint8)


def evict_core_caches() -> None:
    """Push a timed call's operands out of the cores' L1 and L2, as the rest of a model's step does in use."""
    _eviction_buffer(torch.get_num_threads()).fill_(1)


def measure(fast: Callable[[], object], reference: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float]:
    """Median seconds of ``fast`` and ``reference``: one warm-up call each, then ``rounds`` alternating calls.

    Each timed call starts with its operands out of the cores' caches (``evict_core_caches``): in
    use, the other layers of a step run between two calls of one layer. Back to back, a small
    layer's weights stay in the L2, which hid the kernel's lead: a 256 x 256 fp32 layer, one row,
    measured 1.11x F.linear back to back and 1.28x with the L2 evicted (AVX-512, 2 threads), and
    generation took F.linear for it on a 7 vs 7 us tie, 8 % fewer tokens/s than with the kernel.
    """
    times: dict[Callable, list[float]] = {fast: [], reference: []}
    fast()
    reference()
    for i in range(rounds):
        for run in ((fast, reference) if i % 2 == 0 else (reference, fast)):
            evict_core_caches()
            start = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - start)
    return statistics.median(times[fast]), statistics.median(times[reference])


FASTER, TIE, SLOWER = "faster", "tie", "slower"  # the fast path's verdicts against its reference


def verdict(fast_s: float, reference_s: float) -> str:
    """``FASTER`` below ``MARGIN`` times the reference's time, ``SLOWER`` above it divided by ``MARGIN``,
    else ``TIE``: a difference the noise of a short measurement could have made either way."""
    if fast_s < MARGIN * reference_s:
        return FASTER
    return SLOWER if fast_s * MARGIN > reference_s else TIE


def compare(op: str, shape_class: str, fast: Callable[[], object], reference: Callable[[], object]) -> str | None:
    """``fast`` against ``reference`` for ``op`` at ``shape_class`` on this machine: a ``verdict``.

    Measured once per machine and shape class (then cached); None without measuring when
    autotuning is off. ``fast`` and ``reference`` are calls of the two paths on inputs of that class.
    """
    if not enabled():
        return None
    machine = machine_key()
    memo_key = (machine, op, shape_class)
    if memo_key in _decisions:
        return _decisions[memo_key]
    key = f"{op} | {shape_class}"
    record = _read_cache().get(machine, {}).get(key)
    try:
        times = float(record["fast_s"]), float(record["reference_s"])
    except (TypeError, KeyError, ValueError):  # not measured yet, or a damaged record: measure
        began = time.perf_counter()
        try:
            with torch.no_grad():
                times = measure(fast, reference)
        finally:
            _measuring[0] += time.perf_counter() - began
        _write_cache(machine, key, {"fast": verdict(*times) == FASTER, "fast_s": times[0], "reference_s": times[1]})
    _decisions[memo_key] = verdict(*times)
    return _decisions[memo_key]


def fast_path_wins(op: str, shape_class: str, fast: Callable[[], object], reference: Callable[[], object]) -> bool:
    """Whether ``compare`` finds ``fast`` clearly faster (False when autotuning is off): a tie keeps the reference."""
    return compare(op, shape_class, fast, reference) == FASTER


def cached_decisions() -> dict[str, dict]:
    """This machine's cached decisions, ``"op | shape class" -> {"fast": bool, "fast_s", "reference_s"}``."""
    return dict(_read_cache().get(machine_key(), {}))


def remembered(key: tuple, derive: Callable[[], object]) -> object:
    """``derive()`` (a value computed from measured decisions, e.g. a bucket mask of row counts), computed once per
    ``key`` on this machine with autotuning on or off, until ``forget``: per-call choices cost one lookup."""
    # The CPU model and torch version cannot change within a process: ISA, threads and the switch can.
    full_key = (cpu_isa.active_cpu_isa(), torch.get_num_threads(), _extension.environment_variable(AUTOTUNE_ENV_VAR),
                *key)
    value = _derived.get(full_key, _NOT_DERIVED)
    if value is _NOT_DERIVED:
        value = _derived[full_key] = derive()
    return value


def forget() -> None:
    """Drop the in-memory decisions (the cache file stays): the next choice reads the file or measures."""
    _decisions.clear()
    _derived.clear()
    _extension.forget_weight_choices()
