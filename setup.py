"""Build of the compiled extension ``hcr_kernels._C``.

The C++ CPU sources are always built. The CUDA sources are built when torch has
CUDA and ``nvcc`` is found, or when ``FORCE_CUDA=1``. ``HCR_SKIP_CUDA=1`` skips
them (a fast CPU-only build). Everything else (metadata, dependencies) lives in
``pyproject.toml``.

The CUDA part is optional: when it cannot be built (headers that do not match
``nvcc``, a compiler error), the CPU kernels are built alone, the reason is
printed, and it is written to ``hcr_kernels/_build.json``, which ``hcr info``
reports. ``FORCE_CUDA=1`` turns that fallback off (the build fails instead).

Two things torch gets wrong on some machines are found here, so nobody sets
them by hand:

* ``CUDA_HOME``: torch guesses it from the location of the ``nvcc`` on the PATH.
  When that ``nvcc`` is a wrapper script, the guess is the wrapper's folder, not
  the toolkit. ``nvcc --dryrun`` prints the toolkit root it really uses (``TOP=``).
* The cuBLAS / cuSPARSE headers that ``ATen/cuda/CUDAContext.h`` includes ship in
  the ``nvidia-*`` wheels (``site-packages/nvidia/cu13/include``), not always in
  the toolkit's own ``include/``. Only the header files the toolkit lacks are taken
  from there (linked into ``build/``), so the wheels' copies of the toolkit's own
  headers (CUDA runtime, CCCL) never shadow the ones ``nvcc`` was made with.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Default GPU architectures when no GPU can be queried at build time: Ampere (8.0)
# and Hopper (9.0), plus PTX for 9.0 so newer GPUs JIT-compile it. Documented in
# the README; TORCH_CUDA_ARCH_LIST overrides it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
CSRC = "csrc"
# Where the header files taken from the nvidia-* wheels are linked (relative: the build runs in the checkout).
WHEEL_HEADER_DIR = os.path.join("build", "hcr_wheel_cuda_headers")
BUILD_REPORT = "_build.json"  # next to _C in the hcr_kernels package


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root that ``nvcc`` really uses, wrapper scripts included."""
    try:
        dryrun = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    if not match:
        return None
    root = os.path.normpath(match.group(1).strip().strip('"'))
    return root if os.path.isfile(os.path.join(root, "bin", "nvcc")) else None


def _find_cuda_home() -> str | None:
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_root_from_nvcc(nvcc) or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _cuda_version_of_headers(include_dir: str) -> tuple[int, int] | None:
    """``(major, minor)`` from ``CUDA_VERSION`` in ``include_dir/cuda.h`` (e.g. 13000 → (13, 0))."""
    try:
        with open(os.path.join(include_dir, "cuda.h"), encoding="utf-8", errors="replace") as header:
            match = re.search(r"^#define\s+CUDA_VERSION\s+(\d+)", header.read(), re.MULTILINE)
    except OSError:
        return None
    return (int(match.group(1)) // 1000, int(match.group(1)) % 1000 // 10) if match else None


def _wheel_cuda_include_dirs() -> list[str]:
    """Header folders of the ``nvidia-*`` wheels that hold cuBLAS / cuSPARSE."""
    found = set()
    for site in sys.path:
        for name in ("cublas_v2.h", "cusparse.h"):
            for header in glob.glob(os.path.join(site, "nvidia", "*", "include", name)):
                found.add(os.path.dirname(header))
    return sorted(found)


def _link_wheel_headers_missing_from_toolkit(cuda_home: str) -> tuple[list[str], list[str]]:
    """Link the wheels' header *files* that the toolkit lacks into ``WHEEL_HEADER_DIR``.

    Returns ``(include_dirs, notes)``. Folders (CCCL's ``cuda/``, ``cub/``, ``thrust/``)
    and files the toolkit has are never taken: a newer copy of them is what broke
    the build under pip's build isolation. Wheels whose CUDA major version differs
    from the toolkit's are not used at all.
    """
    toolkit_include = os.path.join(cuda_home, "include")
    toolkit_version = _cuda_version_of_headers(toolkit_include)
    toolkit_names = set(os.listdir(toolkit_include)) if os.path.isdir(toolkit_include) else set()
    for sub in ("cccl",):  # nvcc also searches include/cccl
        if os.path.isdir(os.path.join(toolkit_include, sub)):
            toolkit_names |= set(os.listdir(os.path.join(toolkit_include, sub)))
    taken: dict[str, str] = {}
    notes = []
    for wheel_dir in _wheel_cuda_include_dirs():
        wheel_version = _cuda_version_of_headers(wheel_dir)
        if toolkit_version and wheel_version and wheel_version[0] != toolkit_version[0]:
            notes.append(f"not using {wheel_dir}: its headers are CUDA {wheel_version[0]}.{wheel_version[1]}, "
                         f"nvcc's toolkit is CUDA {toolkit_version[0]}.{toolkit_version[1]}")
            continue
        if toolkit_version and wheel_version and wheel_version != toolkit_version:
            notes.append(f"{wheel_dir} is CUDA {wheel_version[0]}.{wheel_version[1]}, the toolkit "
                         f"{toolkit_version[0]}.{toolkit_version[1]}: only the header files the toolkit lacks are used")
        for name in sorted(os.listdir(wheel_dir)):
            path = os.path.join(wheel_dir, name)
            if name.endswith(".h") and os.path.isfile(path) and name not in toolkit_names:
                taken.setdefault(name, path)
    if not taken:
        return [], notes
    shutil.rmtree(WHEEL_HEADER_DIR, ignore_errors=True)
    os.makedirs(WHEEL_HEADER_DIR)
    for name, path in taken.items():
        try:
            os.symlink(path, os.path.join(WHEEL_HEADER_DIR, name))
        except OSError:
            shutil.copyfile(path, os.path.join(WHEEL_HEADER_DIR, name))
    notes.append(f"{len(taken)} header files the toolkit lacks ({', '.join(sorted(taken)[:4])}, ...) "
                 f"taken from the nvidia-* wheels")
    return [os.path.abspath(WHEEL_HEADER_DIR)], notes


# CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads it once.
_cuda_home = _find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]


def _cuda_skip_reason() -> str | None:
    """Why the CUDA sources are not even tried, or None when they are."""
    if _env_flag("HCR_SKIP_CUDA"):
        return "HCR_SKIP_CUDA is set"
    if _env_flag("FORCE_CUDA"):
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _cuda_home is None:
        return "no nvcc on the PATH and neither CUDA_HOME nor CUDA_PATH is set"
    return None


def _cpu_extension() -> CppExtension:
    return CppExtension("hcr_kernels._C", sorted(glob.glob(os.path.join(CSRC, "*.cpp"))),
                        extra_compile_args={"cxx": list(CXX_FLAGS)}, extra_link_args=list(LINK_FLAGS))


def _cuda_extension() -> CUDAExtension:
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    include_dirs, notes = _link_wheel_headers_missing_from_toolkit(os.environ["CUDA_HOME"]) if _cuda_home else ([], [])
    print(f"hcr: building CUDA sources with CUDA_HOME={os.environ.get('CUDA_HOME')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected GPUs)')}")
    for note in notes:
        print(f"hcr: {note}")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    return CUDAExtension(
        "hcr_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("HCR_WITH_CUDA", "1")],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=list(LINK_FLAGS),
    )


class BuildWithOptionalCuda(BuildExtension):
    """Builds the CPU kernels alone when the CUDA part fails, and records why in ``_build.json``."""

    def build_extension(self, ext) -> None:
        skipped = _cuda_skip_reason()
        has_cuda = any(source.endswith(".cu") for source in ext.sources)
        if has_cuda:
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 (any compiler or linker failure)
                if _env_flag("FORCE_CUDA"):
                    raise
                skipped = (f"the CUDA sources failed to build ({type(error).__name__}: {error}); "
                           "see the compiler output above")
                print("\n" + "=" * 78 + f"\nhcr: {skipped}\nhcr: building the CPU kernels alone "
                      "(FORCE_CUDA=1 makes this an error instead)\n" + "=" * 78 + "\n", file=sys.stderr)
                self._become_cpu_only(ext)
                super().build_extension(ext)
        else:
            super().build_extension(ext)
        self._write_report(ext, skipped)

    @staticmethod
    def _become_cpu_only(ext) -> None:
        """Keep torch's flags on ``ext``, drop the CUDA sources, macro, headers and libraries."""
        cpu = _cpu_extension()
        ext.sources = cpu.sources
        ext.define_macros = [macro for macro in ext.define_macros if macro[0] != "HCR_WITH_CUDA"]
        ext.include_dirs = cpu.include_dirs
        ext.library_dirs = cpu.library_dirs
        ext.libraries = cpu.libraries

    def _write_report(self, ext, cuda_skipped: str | None) -> None:
        report = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_built": any(source.endswith(".cu") for source in ext.sources),
                  "cuda_skipped_reason": cuda_skipped}
        # Both where the build puts _C and in the checkout: setuptools builds an editable
        # install in build/ and copies only _C itself into the package folder.
        for folder in {os.path.dirname(self.get_ext_fullpath(ext.name)), "hcr_kernels"}:
            with open(os.path.join(folder, BUILD_REPORT), "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1)


def _extension():
    reason = _cuda_skip_reason()
    if reason is None:
        return _cuda_extension()
    print(f"hcr: building the CPU kernels only: {reason}")
    return _cpu_extension()


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithOptionalCuda.with_options(use_ninja=shutil.which("ninja") is not None)},
)
