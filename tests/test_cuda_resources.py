"""The CUDA kernels of ``hcr_kernels._C`` are reported per arch, and fit a real GPU, without a GPU.

The samples are real ``cuobjdump --dump-resource-usage`` output (CUDA 13.1, the one
in the Triton wheel), cut short; only the build folder in ``identifier`` is changed.
``REAL_SAMPLE`` is from the extension built with the default ``8.0;9.0+PTX``;
``SPILLING_SAMPLE`` from a test kernel built with ``-maxrregcount=24``, for which
``ptxas -v`` said "10368 bytes stack frame, 10372 bytes spill stores, 23560 bytes
spill loads": cuobjdump shows the spills only as the stack frame.
"""

import os
import re
from pathlib import Path

import pytest
import torch

from hcr_kernels import _extension, cuda_resources, triton_aot

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SETUP_PY = CSRC.parent / "setup.py"

REAL_SAMPLE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /src/hcr/csrc/pool_rows_cuda.cu

Resource usage:
 Common:
  GLOBAL:316 CONSTANT[4]:320
 Function _ZN3hcr50_GLOBAL__N__8b617c8e_17_pool_rows_cuda_cu_76a6390630pool_rows_backward_cuda_kernelIdEEvPKT_PKlPS2_S7_lll:
  REG:39 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN3hcr50_GLOBAL__N__8b617c8e_17_pool_rows_cuda_cu_76a6390621pool_rows_cuda_kernelIN3c108BFloat16EEEvPKT_PKlS6_PS4_lll:
  REG:31 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /src/hcr/csrc/pool_rows_cuda.cu

Resource usage:
 Common:
  GLOBAL:316 CONSTANT[4]:320
 Function _ZN3hcr50_GLOBAL__N__8b617c8e_17_pool_rows_cuda_cu_76a6390621pool_rows_cuda_kernelIdEEvPKT_PKlS4_PS2_lll:
  REG:42 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
code version = [9,0]
host = linux
compile_size = 64bit
compressed
identifier = /src/hcr/csrc/pool_rows_cuda.cu
ptxasOptions =  --generate-line-info 
"""

SPILLING_SAMPLE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4smemPf:
  REG:10 STACK:0 SHARED:16384 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5heavyPfPKfi:
  REG:24 STACK:10368 SHARED:0 LOCAL:0 CONSTANT[0]:372 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _source_kernels() -> set[str]:
    """Every ``__global__`` function defined in ``csrc/*.cu``: a kernel added later is expected too."""
    pattern = re.compile(r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(")
    return {name for source in CSRC.glob("*.cu") for name in pattern.findall(source.read_text(encoding="utf-8"))}


def test_parses_captured_output():
    result = cuda_resources.parse_resource_usage(REAL_SAMPLE)
    assert result["archs"] == ["sm_80", "sm_90"]
    assert result["ptx"] == ["sm_90"]
    figures = {(r["function"], r["arch"], r["registers"], r["stack_bytes"], r["local_bytes"], r["shared_bytes"],
                r["shared_limit"], r["source"]) for r in result["rows"]}
    assert figures == {
        ("pool_rows_backward_cuda_kernel", "sm_80", 39, 0, 0, 0, triton_aot.ARCHS[80], "pool_rows_cuda.cu"),
        ("pool_rows_cuda_kernel", "sm_80", 31, 0, 0, 0, triton_aot.ARCHS[80], "pool_rows_cuda.cu"),
        ("pool_rows_cuda_kernel", "sm_90", 42, 0, 0, 0, triton_aot.ARCHS[90], "pool_rows_cuda.cu"),
    }
    assert cuda_resources.problems(result) == []
    table = cuda_resources.format_table(result)
    assert "PROBLEM" not in table and "cubins: sm_80, sm_90; PTX: sm_90" in table


def test_readable_names_with_and_without_cxxfilt(monkeypatch):
    mangled = ("_ZN3hcr50_GLOBAL__N__8b617c8e_17_pool_rows_cuda_cu_76a6390621pool_rows_cuda_kernel"
               "IN3c108BFloat16EEEvPKT_PKlS6_PS4_lll")
    demangled = ("void hcr::(anonymous namespace)::pool_rows_cuda_kernel<c10::BFloat16>(c10::BFloat16 const*, "
                 "long const*, c10::BFloat16 const*, c10::BFloat16*, long, long, long)")  # what c++filt prints
    assert cuda_resources._short_name(demangled) == "pool_rows_cuda_kernel<BFloat16>"
    assert cuda_resources._mangled_base_name(mangled) == ("pool_rows_cuda_kernel",
                                                          "IN3c108BFloat16EEEvPKT_PKlS6_PS4_lll")
    assert cuda_resources._mangled_base_name("_Z5heavyPfPKfi") == ("heavy", "PfPKfi")
    monkeypatch.setattr(cuda_resources.shutil, "which", lambda name: None)
    (row, *_) = cuda_resources.parse_resource_usage(REAL_SAMPLE)["rows"]
    assert row["function"] == "pool_rows_backward_cuda_kernel"
    assert row["kernel"] == "pool_rows_backward_cuda_kernelIdEEvPKT_PKlPS2_S7_lll"


def test_problems_flags_a_spill_and_excess_shared_memory():
    result = cuda_resources.parse_resource_usage(SPILLING_SAMPLE)
    (spill,) = cuda_resources.problems(result)
    assert spill.startswith("heavy") and "10368 bytes stack frame" in spill
    too_much = dict(result["rows"][0], shared_bytes=triton_aot.ARCHS[90] + 1, shared_limit=triton_aot.ARCHS[90],
                    stack_bytes=0)
    local = dict(too_much, shared_bytes=0, local_bytes=16)
    unknown_arch = dict(too_much, arch="sm_86", shared_limit=None)  # no limit known: not checked
    found = cuda_resources.problems({"rows": [too_much, local, unknown_arch]})
    assert len(found) == 2 and "shared memory >" in found[0] and "16 bytes local memory" in found[1]
    assert "PROBLEM: heavy" in cuda_resources.format_table(result)


def test_finds_cuobjdump_in_cuda_home_first(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "cuobjdump"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cuobjdump fatal   : Could not open input file' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert cuda_resources.find_cuobjdump() == str(fake)
    with pytest.raises(RuntimeError, match="exit 1.*Could not open input file"):
        cuda_resources.collect(library=str(tmp_path / "missing.so"), cuobjdump=str(fake))


def test_says_why_there_is_no_report_for_a_cpu_only_build(monkeypatch):
    cpu_only = dict(_extension.build_info(), cuda=False)
    monkeypatch.setattr(_extension, "build_info", lambda: cpu_only)
    assert cuda_resources.extension_library() is None
    if _extension.extension_loaded():
        assert cuda_resources.unavailable_reason() == "the extension hcr_kernels._C was built without CUDA kernels"
    with pytest.raises(RuntimeError, match="no CUDA resource report"):
        cuda_resources.collect()


@pytest.fixture(scope="module")
def report():
    reason = cuda_resources.unavailable_reason()
    if reason:
        pytest.skip(f"no CUDA kernels to read: {reason}")
    return cuda_resources.collect()


def test_every_source_kernel_for_every_arch_without_problems(report):
    kernels = _source_kernels()
    assert kernels, f"no __global__ kernel found in {CSRC}"
    assert report["archs"], "the extension holds no cubin"
    listed = {(row["function"], row["arch"]) for row in report["rows"]}
    missing = {(k, a) for k in kernels for a in report["archs"]} - listed
    assert not missing, f"kernels of csrc/*.cu not in the built cubins: {sorted(missing)}"
    assert cuda_resources.problems(report) == []
    assert all(row["registers"] > 0 for row in report["rows"])


def test_default_build_holds_the_default_archs(report):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST is set: the build compiled for those archs")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the build compiled for the GPUs it found")
    default = re.search(r'DEFAULT_CUDA_ARCH_LIST = "([^"]+)"', SETUP_PY.read_text(encoding="utf-8")).group(1)
    archs = [f"sm_{entry.split('+')[0].replace('.', '')}" for entry in default.split(";")]
    ptx = [f"sm_{entry.split('+')[0].replace('.', '')}" for entry in default.split(";") if entry.endswith("+PTX")]
    assert (report["archs"], report["ptx"]) == (sorted(archs), sorted(ptx))
