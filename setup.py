"""Build of the compiled extension ``hcr_kernels._C``.

The C++ CPU sources are always built. The CUDA sources are built when torch has
CUDA and ``nvcc`` is found, or when ``FORCE_CUDA=1``. ``HCR_SKIP_CUDA=1`` skips
them (a fast CPU-only build). Everything else (metadata, dependencies) lives in
``pyproject.toml``.

Two things torch gets wrong on some machines are found here, so nobody sets
them by hand:

* ``CUDA_HOME``: torch guesses it from the location of the ``nvcc`` on the PATH.
  When that ``nvcc`` is a wrapper script, the guess is the wrapper's folder, not
  the toolkit. ``nvcc --dryrun`` prints the toolkit root it really uses (``TOP=``).
* The cuBLAS / cuSPARSE headers that ``ATen/cuda/CUDAContext.h`` includes ship in
  the ``nvidia-*`` wheels (``site-packages/nvidia/cu13/include``), not always in
  the toolkit's own ``include/``.
"""

from __future__ import annotations

import glob
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


def _wheel_cuda_include_dirs() -> list[str]:
    """Header folders of the ``nvidia-*`` wheels that hold cuBLAS / cuSPARSE."""
    found = []
    for site in sys.path:
        for header in glob.glob(os.path.join(site, "nvidia", "*", "include", "cublas_v2.h")):
            found.append(os.path.dirname(header))
        for header in glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")):
            found.append(os.path.dirname(header))
    return sorted(set(found))


# CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads it once.
_cuda_home = _find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _want_cuda() -> bool:
    if _env_flag("HCR_SKIP_CUDA"):
        return False
    if _env_flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and _cuda_home is not None


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not _want_cuda():
        return CppExtension(
            "hcr_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    include_dirs = _wheel_cuda_include_dirs()
    print(
        f"hcr: building CUDA sources with CUDA_HOME={os.environ.get('CUDA_HOME')}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected GPUs)')}, "
        f"extra include dirs={include_dirs}"
    )
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    return CUDAExtension(
        "hcr_kernels._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("HCR_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
