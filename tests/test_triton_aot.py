"""Every Triton kernel compiles for sm_80 and sm_90 in every launch configuration, without a GPU.

CI only runs the kernels in the interpreter; this catches what only a real GPU
would otherwise show: a kernel that does not compile, spills registers, or asks
for more shared memory than a block may have. ``conftest`` sets
``TRITON_INTERPRET=1``, under which ``@triton.jit`` returns interpreter objects that
cannot be compiled, so the compilation runs in a subprocess without it.
"""

import os

import pytest

from hcr_kernels import triton_aot

KNOWN_KERNELS = {"_pool_rows_fwd_kernel", "_pool_rows_bwd_kernel", "_weighted_ce_fwd_kernel"}


@pytest.fixture(scope="module")
def compiled():
    return triton_aot.compile_isolated()


def test_every_kernel_is_covered_and_compiled_for_every_arch(compiled):
    assert compiled["uncovered"] == [], "kernels no launch configuration reaches"
    kernels = {row["kernel"] for row in compiled["rows"]}
    assert KNOWN_KERNELS <= kernels
    for kernel in kernels:
        assert {row["arch"] for row in compiled["rows"] if row["kernel"] == kernel} == {"sm_80", "sm_90"}


def test_every_dtype_and_block_size_the_wrappers_launch(compiled):
    ce = [row for row in compiled["rows"] if row["kernel"] == "_weighted_ce_fwd_kernel"]
    blocks = {int(part.split("=")[1]) for row in ce for part in row["config"].replace(" ", ",").split(",")
              if part.startswith("BLOCK=")}
    assert blocks == {2**k for k in range(13)}  # min(next_power_of_2(V), MAX_BLOCK=4096)
    for name in KNOWN_KERNELS:
        dtypes = {row["config"].split("/")[0] for row in compiled["rows"] if row["kernel"] == name}
        assert dtypes == {"fp32", "fp16", "bf16", "fp64"}, name


def test_no_spills_and_shared_memory_within_the_block_limit(compiled):
    assert triton_aot.problems(compiled) == []
    assert all(row["registers"] > 0 for row in compiled["rows"])


def test_problems_flags_spills_shared_memory_and_uncovered_kernels():
    row = {"kernel": "k", "config": "c", "arch": "sm_80", "registers": 255, "spill_bytes": 8,
           "shared_bytes": 163 * 1024 + 1, "shared_limit": triton_aot.ARCHS[80]}
    found = triton_aot.problems({"rows": [row], "uncovered": ["hcr_kernels.x.triton_kernels._k"]})
    assert len(found) == 3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only meaningful in the interpreter")
def test_refuses_to_compile_interpreter_kernels():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_aot.find_kernels()
