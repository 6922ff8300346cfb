"""Registers, stack and shared memory of the CUDA kernels compiled into ``hcr_kernels._C``, without a GPU.

Why: ``pip install`` compiles ``csrc/*.cu`` with nvcc for the default architectures
(``DEFAULT_CUDA_ARCH_LIST`` in setup.py), but nobody sees what ptxas made of them;
a kernel that spills or asks for more shared memory than a block may have would
first show up on a user's GPU. The cubins are in the built library, so
``cuobjdump --dump-resource-usage`` reads the figures back from it, the same
figures ``triton_aot`` gets for the Triton kernels, and with the same limits.

What cuobjdump reports per kernel and arch: ``REG`` (registers per thread),
``STACK`` (stack frame per thread, bytes), ``SHARED`` (static shared memory per
block), ``LOCAL``. It has no spill counts: ptxas puts spilled registers in the stack
frame (``ptxas -v`` prints "N bytes stack frame, N bytes spill stores, ..." with the
same N), and so are local arrays, which cuobjdump does not tell apart; ``LOCAL``
stays 0 for both. So a stack frame (or local memory) above 0 is the spill
indicator here, and a problem: these kernels have neither spills nor local arrays.

``python -m hcr_kernels.cuda_resources [--json]`` prints the table;
``python -m hcr_kernels.info --gpu`` prints it after the Triton one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess

from hcr_kernels import _extension
from hcr_kernels.triton_aot import ARCHS, aligned_columns

CUOBJDUMP = "cuobjdump"


def extension_library() -> str | None:
    """The file of the loaded ``_C`` when it holds CUDA kernels (None otherwise)."""
    if not _extension.extension_loaded() or not _extension.build_info()["cuda"]:
        return None
    return _extension._C.__file__


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one on the PATH, else the one the Triton wheel ships."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            candidate = os.path.join(os.environ[name], "bin", CUOBJDUMP)
            if os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which(CUOBJDUMP)
    if on_path:
        return on_path
    try:
        import triton
    except ImportError:
        return None
    candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", CUOBJDUMP)
    return candidate if os.access(candidate, os.X_OK) else None


def unavailable_reason() -> str | None:
    """Why there is no report here (None when there is one to make)."""
    if not _extension.extension_loaded():
        return f"the extension hcr_kernels._C is not loaded ({_extension.import_error()})"
    if not _extension.build_info()["cuda"]:
        return "the extension hcr_kernels._C was built without CUDA kernels"
    if find_cuobjdump() is None:
        return "no cuobjdump found (looked in $CUDA_HOME/bin, on the PATH and in the Triton wheel)"
    return None


def _mangled_base_name(mangled: str) -> tuple[str, str]:
    """(unqualified name, what follows it) of an Itanium-mangled function name.

    For when there is no c++filt: ``_ZN3hcr<anon ns>21pool_rows_cuda_kernelIfEEv...``
    gives ``("pool_rows_cuda_kernel", "IfEEv...")``.
    """
    match = re.match(r"_ZN?", mangled)
    if match is None:
        return mangled, ""
    position, name = match.end(), mangled
    while (length := re.match(r"\d+", mangled[position:])) is not None:
        start = position + length.end()
        position = start + int(length.group())
        name = mangled[start:position]
    return name, mangled[position:]


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::kernel<c10::Half>(args...)`` -> ``kernel<Half>``."""
    name = demangled.removeprefix("void ")
    if name.endswith(")"):  # cut the parameter list: the parenthesis that closes the last one
        depth = 0
        for index in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[index], 0)
            if depth == 0:
                name = name[:index]
                break
    return re.sub(r"(?:\(anonymous namespace\)|\w+)::", "", name)


def _readable_names(mangled: list[str]) -> dict[str, tuple[str, str]]:
    """mangled -> (readable name, unqualified function name): c++filt when present, else the mangled tail."""
    names = {m: (base + tail, base) for m in mangled for base, tail in [_mangled_base_name(m)]}
    demangler = shutil.which("c++filt")
    if demangler and mangled:
        done = subprocess.run([demangler], input="\n".join(mangled), capture_output=True, text=True, timeout=60)
        lines = done.stdout.splitlines()
        if done.returncode == 0 and len(lines) == len(mangled):
            for m, demangled in zip(mangled, lines):
                short = _short_name(demangled)
                names[m] = (short, short.partition("<")[0])
    return names


def parse_resource_usage(text: str) -> dict:
    """``{"rows": [...], "archs": [...], "ptx": [...]}`` from ``cuobjdump --dump-resource-usage`` output.

    One row per kernel and cubin arch; ``archs`` are the cubins' archs, ``ptx`` the
    archs of the embedded PTX (what newer GPUs JIT-compile).
    """
    rows, archs, ptx = [], set(), set()
    kind = arch = source = function = None
    for line in text.splitlines():
        line = line.strip()
        if header := re.fullmatch(r"Fatbin (elf|ptx) code:", line):
            kind, arch, source = header.group(1), None, None
        elif found := re.fullmatch(r"arch = (sm_\d+\w*)", line):
            arch = found.group(1)
            (archs if kind == "elf" else ptx).add(arch)
        elif found := re.fullmatch(r"identifier = (.+)", line):
            source = os.path.basename(found.group(1))
        elif found := re.fullmatch(r"Function (\S+):", line):
            function = found.group(1)
        elif function and line.startswith("REG:"):
            usage = {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            number = int(re.sub(r"\D", "", arch))
            rows.append({
                "mangled": function,
                "source": source,
                "arch": arch,
                "registers": usage["REG"],
                "stack_bytes": usage.get("STACK", 0),
                "local_bytes": usage.get("LOCAL", 0),
                "shared_bytes": usage.get("SHARED", 0),
                "shared_limit": ARCHS.get(number),
            })
            function = None
    names = _readable_names(list(dict.fromkeys(row["mangled"] for row in rows)))
    for row in rows:
        row["kernel"], row["function"] = names[row["mangled"]]
    rows.sort(key=lambda row: (row["kernel"], row["arch"]))
    return {"rows": rows, "archs": sorted(archs), "ptx": sorted(ptx)}


def collect(library: str | None = None, cuobjdump: str | None = None) -> dict:
    """The resource usage of every kernel in ``library`` (default: the loaded ``_C``)."""
    library = library or extension_library()
    cuobjdump = cuobjdump or find_cuobjdump()
    if library is None or cuobjdump is None:
        raise RuntimeError(f"no CUDA resource report: {unavailable_reason()}")
    done = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise RuntimeError(f"{cuobjdump} --dump-resource-usage failed (exit {done.returncode}): "
                           f"{output.splitlines()[-1] if output else 'no output'}\n{output[-4000:]}")
    return dict(parse_resource_usage(done.stdout), library=library, cuobjdump=cuobjdump)


def problems(result: dict) -> list[str]:
    """What makes the kernels unfit for a real GPU: a stack frame or local memory (spills), too much shared memory."""
    found = []
    for row in result["rows"]:
        where = f"{row['kernel']} {row['arch']}"
        if row["stack_bytes"] or row["local_bytes"]:
            found.append(f"{where}: {row['stack_bytes']} bytes stack frame, {row['local_bytes']} bytes local memory "
                         "per thread (spills or local arrays)")
        if row["shared_limit"] is not None and row["shared_bytes"] > row["shared_limit"]:
            found.append(f"{where}: {row['shared_bytes']} bytes shared memory > {row['shared_limit']}")
    return found


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = aligned_columns(("kernel", "arch", "regs", "stack", "local", "shared"),
                            [(r["kernel"], r["arch"], r["registers"], r["stack_bytes"], r["local_bytes"],
                              r["shared_bytes"]) for r in rows])
    unchecked = sorted({r["arch"] for r in rows if r["shared_limit"] is None})
    lines.append(f"{len(rows)} rows, kernel x arch (cubins: {', '.join(result['archs']) or '-'}; "
                 f"PTX: {', '.join(result['ptx']) or '-'}); registers per thread, stack frame and local memory "
                 "bytes per thread (spills land there; cuobjdump has no separate spill count), static shared memory "
                 "bytes per block (limits: " + ", ".join(f"sm_{a} {b // 1024} KiB" for a, b in ARCHS.items())
                 + (f"; none known for {', '.join(unchecked)}" if unchecked else "") + ")")
    lines += [f"PROBLEM: {p}" for p in problems(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.cuda_resources", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"no CUDA resource report: {reason}")
        return 1
    result = collect()
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
