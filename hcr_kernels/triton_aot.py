"""Compile every Triton kernel of ``hcr_kernels`` ahead of time for real GPUs, on any machine.

Why: CI has no GPU, so the kernels only ever run in the interpreter there; a kernel
that does not compile for sm_80/sm_90, or spills registers, or asks for more shared
memory than a block may have, would first show up on a user's GPU. Triton compiles
for a target it is not running on (PTX, then a cubin with the ``ptxas`` of the
triton wheel), so all of that is checked here without a GPU.

The launch configurations are not a hand-kept list: each ``triton_kernels`` module's
Python wrappers are called on ``meta`` tensors with their kernels swapped for
recorders (``PROBES``), and each recorded launch is bound by Triton's own JIT
binder, so the signature, constexprs, specialisation attributes and ``num_warps``
compiled here are the ones the wrapper would launch. Only the input space (dtypes,
flags, sizes) is listed in ``PROBES``; a kernel the walk finds that no probe
launches is reported as uncovered.

``python -m hcr_kernels.triton_aot [--json]`` compiles in this process (it refuses
under ``TRITON_INTERPRET=1``, where ``@triton.jit`` gives interpreter objects);
``compile_isolated()`` runs that in a subprocess without the variable. Each run
compiles into a fresh cache directory it deletes afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

import hcr_kernels

# Maximum (opt-in dynamic) shared memory per thread block, bytes. CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability": 163 KB for 8.0 (A100),
# 227 KB for 9.0 (H100).
ARCHS = {80: 163 * 1024, 90: 227 * 1024}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""What the ops accept (``check_tensor(..., floating=True)``; fp8 excluded: not a supported input)."""


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _probe_pool_scatter(module) -> None:
    """As ``PoolRowsFunction`` calls the launchers: with and without template, both backwards."""
    rows, windows, window, dim = 24, 8, 2, 1536
    window_of_row = _meta(rows, dtype=torch.int64)
    for dtype in FLOAT_DTYPES:
        hidden = _meta(windows, window, dim, dtype=dtype)
        for template in (_meta(rows, dim, dtype=dtype), None):
            module.pool_rows_(template, window_of_row, hidden, _meta(rows, dim, dtype=dtype))
        for grad_template in (_meta(rows, dim, dtype=dtype), None):
            module.pool_rows_backward_(_meta(rows, dim, dtype=dtype), window_of_row, torch.empty_like(hidden),
                                       grad_template)


def _probe_cross_entropy(module) -> None:
    """As ``weighted_cross_entropy`` / ``fused_linear_cross_entropy`` call the launcher, over vocab sizes
    that reach every block size it can pick (powers of two up to twice its cap, plus an odd one)."""
    from hcr_kernels.cross_entropy import IGNORE_INDEX
    from hcr_kernels.cross_entropy.common import accumulation_dtype

    tokens = 8
    vocabs = [2**k for k in range((2 * module.MAX_BLOCK).bit_length())] + [50257]
    labels = _meta(tokens, dtype=torch.int64)  # the ops pass labels.long()
    for dtype in FLOAT_DTYPES:
        weights = _meta(tokens, dtype=accumulation_dtype(dtype))
        for vocab in vocabs:
            logits = _meta(tokens, vocab, dtype=dtype)
            for grad_logits in (torch.empty_like(logits), None):
                module.weighted_cross_entropy_fwd_(logits, labels, weights, IGNORE_INDEX, torch.empty_like(weights),
                                                   grad_logits)


# triton_kernels module -> the calls of its wrappers that reach every launch configuration.
PROBES = {
    "hcr_kernels.pool_scatter.triton_kernels": _probe_pool_scatter,
    "hcr_kernels.cross_entropy.triton_kernels": _probe_cross_entropy,
}


def find_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` kernel defined in the package, by ``module.name``.

    Only modules whose source mentions triton are imported (a kernel cannot be defined
    elsewhere), so the walk does not pull in the heavy model code.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.walk_packages(hcr_kernels.__path__, prefix="hcr_kernels."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as source:
            if "triton" not in source.read():
                continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, InterpretedFunction):
                raise RuntimeError("TRITON_INTERPRET=1 is set: kernels are interpreter objects; use compile_isolated()")
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


def record_launches(kernels: dict[str, object]) -> list[tuple[str, tuple, dict]]:
    """(kernel, args, kwargs) of every launch the probes make, the module's kernels swapped out meanwhile."""
    calls: list = []
    for module_name, probe in PROBES.items():
        module = importlib.import_module(module_name)
        names = [k.rpartition(".")[2] for k in kernels if k.rpartition(".")[0] == module_name]
        try:
            for name in names:
                setattr(module, name, _Recorder(f"{module_name}.{name}", calls))
            probe(module)
        finally:
            for name in names:
                setattr(module, name, kernels[f"{module_name}.{name}"])
    return calls


@dataclass(frozen=True)
class Job:
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def config(self) -> str:
        """Pointer dtypes, constexprs, warps and integer specialisations: what tells two compilations apart."""
        names = list(self.signature)
        dtypes = "/".join(dict.fromkeys(v[1:] for v in self.signature.values() if v.startswith("*")))
        consts = ",".join(f"{names[k[0]]}={v}" for k, v in self.constexprs.items())
        ints = "".join(f",{n}%16" for i, n in enumerate(names)
                       if self.signature[n] in ("i32", "i64") and self.attrs.get((i,)))
        return f"{dtypes} {consts}{ints} w{self.options['num_warps']}"


def launch_jobs(kernels: dict[str, object]) -> list[Job]:
    """The recorded launches bound by Triton's JIT binder for each target, duplicates removed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    calls = record_launches(kernels)
    jobs, seen = [], set()
    for arch in ARCHS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for name, args, kwargs in calls:
            fn = kernels[name]
            kwargs = dict(kwargs, debug=fn.debug or False)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            key = (name, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
            if key not in seen:
                seen.add(key)
                jobs.append(Job(name, arch, signature, constexprs, attrs, dict(options.__dict__)))
    return jobs


def _compile(job: Job) -> dict:
    """Compile one job and read registers/spills from ptxas's own ``-v`` log, shared memory from the metadata."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, _, name = job.kernel.rpartition(".")
    fn = getattr(importlib.import_module(module_name), name)
    knobs.nvidia.dump_ptxas_log = True  # the log triton's make_cubin gets from `ptxas -v`, printed to stdout
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("cuda", job.arch, 32), options=job.options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None or not compiled.asm.get("cubin"):
        raise RuntimeError(f"no ptxas -v report for {job.kernel} ({job.config}, sm_{job.arch}):\n{text}")
    return {
        "kernel": job.kernel.rpartition(".")[2],
        "module": module_name,
        "config": job.config,
        "arch": f"sm_{job.arch}",
        "registers": int(regs.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": ARCHS[job.arch],
        "num_warps": job.options["num_warps"],
    }


def compile_all(workers: int | None = None) -> dict:
    """``{"rows": [...], "uncovered": [...]}``: every kernel × launch config × arch, compiled.

    Into a throwaway cache directory: a cache hit would skip ptxas (no report), and
    nothing must carry over from one run to the next.
    """
    kernels = find_kernels()
    jobs = launch_jobs(kernels)
    uncovered = sorted(set(kernels) - {job.kernel for job in jobs})
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    previous = os.environ.get("TRITON_CACHE_DIR")
    cache = tempfile.mkdtemp(prefix="hcr-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # triton reads it at each compile; the workers inherit it
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = list(pool.map(_compile, jobs, chunksize=4))
        else:
            rows = [_compile(job) for job in jobs]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
    return {"rows": rows, "uncovered": uncovered}


def compile_isolated(timeout: float = 600) -> dict:
    """``compile_all()`` in a subprocess without ``TRITON_INTERPRET``.

    The interpreter flag decides at import what ``@triton.jit`` returns, so it cannot be
    undone in a process (the tests set it) that has imported the kernels already.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "hcr_kernels.triton_aot", "--json"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout)


def problems(result: dict) -> list[str]:
    """What makes the kernels unfit for a real GPU: spills, too much shared memory, kernels never compiled."""
    found = [f"{name}: no launch configuration covers it (add a probe to PROBES)" for name in result["uncovered"]]
    for row in result["rows"]:
        where = f"{row['kernel']} [{row['config']}] {row['arch']}"
        if row["spill_bytes"]:
            found.append(f"{where}: spills {row['spill_bytes']} bytes")
        if row["shared_bytes"] > row["shared_limit"]:
            found.append(f"{where}: {row['shared_bytes']} bytes shared memory > {row['shared_limit']}")
    return found


def aligned_columns(head: tuple[str, ...], body: list[tuple]) -> list[str]:
    """Plain-text table lines, each column as wide as its widest cell (the resource reports share it)."""
    cells = [tuple(map(str, row)) for row in [head, *body]]
    widths = [max(len(x) for x in col) for col in zip(*cells)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = aligned_columns(("kernel", "config", "arch", "regs", "spills", "shared"),
                            [(r["kernel"], r["config"], r["arch"], r["registers"], r["spill_bytes"], r["shared_bytes"])
                             for r in rows])
    lines.append(f"{len(rows)} compilations; registers per thread, spill bytes (stores + loads), "
                 f"shared memory bytes per block (limits: "
                 + ", ".join(f"sm_{a} {b // 1024} KiB" for a, b in ARCHS.items()) + ")")
    lines += [f"PROBLEM: {p}" for p in problems(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.triton_aot", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = compile_all()
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
