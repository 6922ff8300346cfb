"""Two builds of hcr timed against each other: decode_attention and decode_linear steps, build against build.

Why a tool: a switch between two versions inside one build times both with the new build's code size and register
pressure (on the AVX2 EPYC a switch showed 0.75-0.92 where the builds gave about 0.98: ``HISTORY.md``, *a re-encode
step's rows summed together*); and one process per build, minutes apart, mixes in the host's slow minutes and each
process's own luck: there the same build against itself came out at 0.84-1.16 from one pair of processes to the next,
and in some cases the process started first ran 10-25 % slower (*earlier in-build figures checked build against
build*). So each build gets a resident worker process, the two take turns (``--calls`` calls each, the order swapped
every turn) for ``--turns`` turns, and this is repeated with ``--pairs`` fresh pairs of processes, started in
alternating order. A pair's figure is the median of its turns' ratios (time NEW / OLD); the report gives the median
over pairs, their quartiles, and the medians of the pairs started old-first and new-first apart, so a start-order
effect shows. Run it with OLD = NEW first: what that gives is the floor a difference must clear.

    python benchmarks/compare_builds.py OLD NEW CASE... [--pairs 12] [--turns 30] [--calls 5] [--threads 1] [--cpus 1]

OLD, NEW: checkouts with ``_C`` built in place (``setup.py build_ext --inplace``; e.g. a ``git worktree`` at the
commit before). The inputs come from this checkout's benchmark files, the kernels from each build. CASE:
``attention:MODEL:SLOTS:STEPS[:DTYPE]`` (MODEL from ``test_bench_decode_attention.MODELS``, in its own dtype unless
DTYPE is given; the 1.5B models' caches are read from memory, an L3 eviction before each call) or ``linear:WEIGHTS:DTYPE:ROWS`` (WEIGHTS ``tiny`` or ``1.5B``, the
latter from memory; DTYPE ``float32``, ``bfloat16`` or ``float16``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hcr.argtypes import positive_int

CASE_FORMS = "attention:MODEL:SLOTS:STEPS[:DTYPE] or linear:WEIGHTS:DTYPE:ROWS"
LINEAR_WEIGHTS = {"tiny": "tiny Qwen2", "1.5B": "1.5B MLP"}
DTYPES = ("float32", "bfloat16", "float16")


def check_case(case: str) -> str:
    """``case`` if it names a known step (see the module docstring), else a ValueError naming it."""
    parts = case.split(":")
    problem = None
    if parts[0] == "attention" and len(parts) in (4, 5):
        from test_bench_decode_attention import MODELS
        if parts[1] not in MODELS:
            problem = f"MODEL must be one of {sorted(MODELS)}"
        elif not (parts[2].isdigit() and parts[3].isdigit() and 0 < int(parts[3]) <= int(parts[2])):
            problem = "SLOTS and STEPS must be positive integers, STEPS <= SLOTS"
        elif len(parts) == 5 and parts[4] not in DTYPES:
            problem = f"DTYPE must be one of {list(DTYPES)}"
    elif parts[0] == "linear" and len(parts) == 4:
        if parts[1] not in LINEAR_WEIGHTS:
            problem = f"WEIGHTS must be one of {sorted(LINEAR_WEIGHTS)}"
        elif parts[2] not in DTYPES:
            problem = f"DTYPE must be one of {list(DTYPES)}"
        elif not (parts[3].isdigit() and int(parts[3]) > 0):
            problem = "ROWS must be a positive integer"
    else:
        problem = f"expected {CASE_FORMS}"
    if problem:
        raise ValueError(f"case {case!r}: {problem}")
    return case


def step_of(case: str):
    """(one call of the case's step through the native kernels, whether its inputs come from memory)."""
    import torch
    kind, name, *rest = check_case(case).split(":")
    if kind == "attention":
        from test_bench_decode_attention import CACHES_FROM_MEMORY, MODELS, one_step, step_inputs
        slots, steps, *dtype = rest
        from_memory = name in CACHES_FROM_MEMORY  # as the benchmark times that model
        if dtype:  # the model's shapes and cache layout with another dtype, under a name of its own
            MODELS[f"{name}:{dtype[0]}"] = (*MODELS[name][:-1], getattr(torch, dtype[0]))
            name = f"{name}:{dtype[0]}"
        return one_step(step_inputs(name, int(slots), int(steps)), "native"), from_memory
    from test_bench_decode_linear import WEIGHT_SETS, WEIGHTS_FROM_MEMORY, layer_stack, stack_pass
    dtype, rows = rest
    weights = LINEAR_WEIGHTS[name]
    matrices, inputs = layer_stack(WEIGHT_SETS[weights], getattr(torch, dtype), int(rows))
    run = stack_pass(matrices, inputs, "native")

    def step():
        with torch.inference_mode():
            run()
    return step, weights in WEIGHTS_FROM_MEMORY


def worker(cases: list[str], threads: int, cpus: list[int] | None) -> None:
    """Resident side: prepares every case, says ``ready``, then for each line ``calls`` on stdin times each case
    ``calls`` times and prints their medians (seconds), one line."""
    import time

    import torch

    import hcr_kernels
    from bandwidth import last_level_cache_eviction
    root = Path(os.environ["HCR_COMPARE_ROOT"]).resolve()
    if root not in Path(hcr_kernels.__file__).resolve().parents:
        sys.exit(f"hcr_kernels came from {hcr_kernels.__file__}, not from the build under test {root}")
    if cpus:
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    evict = last_level_cache_eviction()
    steps = [step_of(case) for case in cases]
    for step, _ in steps:
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        medians = []
        for step, from_memory in steps:
            times = []
            for _ in range(int(line)):
                if from_memory:
                    evict()
                began = time.perf_counter()
                step()
                times.append(time.perf_counter() - began)
            medians.append(statistics.median(times))
        print(" ".join(repr(m) for m in medians), flush=True)


class Worker:
    """A worker process timing ``cases`` with the build at ``root``."""

    def __init__(self, root: Path, cases: list[str], threads: int, cpus: list[int] | None):
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads), *cases]
        if cpus:
            command += ["--cpus", ",".join(map(str, cpus))]
        env = dict(os.environ, PYTHONPATH=str(root), HCR_COMPARE_ROOT=str(root))
        self.process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the worker for {root} did not start (its error is above)")

    def turn(self, calls: int) -> list[float]:
        self.process.stdin.write(f"{calls}\n")
        self.process.stdin.flush()
        return [float(x) for x in self.process.stdout.readline().split()]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@dataclass
class Comparison:
    """One case: each pair's median ratio (time new / old), whether that pair started old first, the times (s)."""
    ratios: list[float]
    old_first: list[bool]
    old_times: list[float]
    new_times: list[float]

    def report(self, case: str) -> str:
        def median_of(first: bool) -> str:
            chosen = [r for r, f in zip(self.ratios, self.old_first) if f == first]
            return f"{statistics.median(chosen):.3f}" if chosen else "-"
        quartiles = statistics.quantiles(self.ratios, n=4) if len(self.ratios) > 1 else self.ratios * 3
        return (f"{case}: new / old {statistics.median(self.ratios):.3f} [{quartiles[0]:.3f}-{quartiles[2]:.3f}] over "
                f"{len(self.ratios)} pairs (old started first {median_of(True)}, new first {median_of(False)}); "
                f"old {statistics.median(self.old_times) * 1e3:.3f} ms, "
                f"new {statistics.median(self.new_times) * 1e3:.3f} ms")


def compare(old: Path, new: Path, cases: list[str], *, pairs: int = 12, turns: int = 30, calls: int = 5,
            threads: int = 1, cpus: list[int] | None = None, progress=None) -> dict[str, Comparison]:
    """Time ``cases`` with the builds at ``old`` and ``new`` against each other (see the module docstring)."""
    for case in cases:
        check_case(case)
    for name, value in (("pairs", pairs), ("turns", turns), ("calls", calls), ("threads", threads)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    results = {case: Comparison([], [], [], []) for case in cases}
    roots = {"old": old, "new": new}
    for pair in range(pairs):
        started = ("old", "new") if pair % 2 == 0 else ("new", "old")
        workers = {side: Worker(roots[side], cases, threads, cpus) for side in started}  # started in this order
        turn_ratios: dict[str, list[float]] = {case: [] for case in cases}
        try:
            for turn in range(turns):
                order = ("old", "new") if turn % 2 == 0 else ("new", "old")
                times = {side: workers[side].turn(calls) for side in order}
                for k, case in enumerate(cases):
                    turn_ratios[case].append(times["new"][k] / times["old"][k])
                    results[case].old_times.append(times["old"][k])
                    results[case].new_times.append(times["new"][k])
        finally:
            for worker_process in workers.values():
                worker_process.close()
        for case in cases:
            results[case].ratios.append(statistics.median(turn_ratios[case]))
            results[case].old_first.append(pair % 2 == 0)
        if progress:
            progress(pair + 1, pairs, {case: results[case].ratios[-1] for case in cases})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("builds_and_cases", nargs="+", metavar="OLD NEW CASE",
                        help=f"two build roots, then cases: {CASE_FORMS}")
    parser.add_argument("--pairs", type=positive_int, default=12,
                        help="fresh pairs of worker processes (default %(default)s)")
    parser.add_argument("--turns", type=positive_int, default=30,
                        help="turns each of a pair takes (default %(default)s)")
    parser.add_argument("--calls", type=positive_int, default=5,
                        help="calls of each case a turn (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads in each worker (default %(default)s)")
    parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        help="CPUs both workers are pinned to, e.g. 1 or 0,1 (default: not pinned)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.builds_and_cases, args.threads, args.cpus)
    if len(args.builds_and_cases) < 3:
        parser.error("give OLD, NEW and at least one CASE")
    old, new, *cases = args.builds_and_cases
    for name, root in (("OLD", old), ("NEW", new)):
        if not any((Path(root) / "hcr_kernels").glob("_C*.so")):
            parser.error(f"{name} {root!r}: no hcr_kernels/_C*.so there (build it with setup.py build_ext --inplace)")
    try:
        cases = [check_case(case) for case in cases]
    except ValueError as error:
        parser.error(str(error))

    def progress(done, total, ratios):
        shown = ", ".join(f"{case} {ratio:.3f}" for case, ratio in ratios.items())
        print(f"pair {done}/{total}: {shown}", file=sys.stderr, flush=True)
    results = compare(Path(old).resolve(), Path(new).resolve(), cases, pairs=args.pairs, turns=args.turns,
                      calls=args.calls, threads=args.threads, cpus=args.cpus, progress=progress)
    for case, result in results.items():
        print(result.report(case))


if __name__ == "__main__":  # run as a script, this file's folder (the benchmark files) leads sys.path
    main()
