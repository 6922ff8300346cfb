"""The explicit ISA choice of the native CPU kernels: what a CPU supports, switching, HCR_CPU_ISA, hcr info."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hcr_kernels import _extension, cpu_isa, decode_linear

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="needs the compiled extension")


def test_supported_isas_best_first_and_baseline_always():
    supported = cpu_isa.supported_cpu_isas()
    assert supported[-1] == "baseline"
    assert list(supported) == [isa for isa in cpu_isa.CPU_ISAS if isa in supported]
    requested = os.environ.get(cpu_isa.CPU_ISA_ENV_VAR, "").strip()
    assert cpu_isa.active_cpu_isa() == (requested or supported[0])  # the best, unless HCR_CPU_ISA said otherwise


def test_avx512_bf16_level_matches_the_cpu_flags():
    """The CPUID check of AVX512_BF16 (leaf 7, subleaf 1) agrees with the kernel's view of the CPU."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    supported = cpu_isa.supported_cpu_isas()
    assert ("avx512_bf16" in supported) == ("avx512" in supported and "avx512_bf16" in flags)
    if "amx" in supported:
        assert "avx512_bf16" in supported  # every level has what the ones below it have


def test_use_cpu_isa_switches_and_restores():
    before = cpu_isa.active_cpu_isa()
    with cpu_isa.use_cpu_isa("baseline"):
        assert cpu_isa.active_cpu_isa() == "baseline"
    assert cpu_isa.active_cpu_isa() == before
    with pytest.raises(RuntimeError, match="boom"), cpu_isa.use_cpu_isa("baseline"):
        raise RuntimeError("boom")
    assert cpu_isa.active_cpu_isa() == before


def test_unknown_or_unsupported_isa_is_refused():
    with pytest.raises(ValueError, match="CPU ISA must be one of amx, avx512_bf16, avx512, avx2, baseline, got 'sse9'"):
        cpu_isa.set_cpu_isa("sse9")
    missing = [isa for isa in cpu_isa.CPU_ISAS if isa not in cpu_isa.supported_cpu_isas()]
    if not missing:
        pytest.skip("this CPU runs every ISA")
    with pytest.raises(ValueError, match=f"'{missing[0]}' is not available on this CPU.*it supports: "):
        cpu_isa.set_cpu_isa(missing[0])


def test_isas_run_different_code():
    """Vector widths differ (16, 8, 4 lanes), so a long fp32 reduction rounds differently per ISA."""
    supported = cpu_isa.supported_cpu_isas()
    if len(supported) < 2:
        pytest.skip("one ISA only")
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 1000, generator=generator), torch.randn(64, 1000, generator=generator)
    results = {}
    for isa in supported:
        with cpu_isa.use_cpu_isa(isa):
            results[isa] = decode_linear(x, weight, backend="native")
    first, *others = results.values()
    assert any(not torch.equal(first, other) for other in others)
    for other in others:
        torch.testing.assert_close(other, first, atol=1e-3, rtol=1e-4)


def run_python(code: str, isa: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, cpu_isa.CPU_ISA_ENV_VAR: isa})


def test_environment_variable_selects_the_isa_and_info_reports_it():
    done = run_python("import hcr_kernels.info as i; print(i.report())", "baseline")
    assert done.returncode == 0, done.stderr
    assert "CPU ISA       baseline" in done.stdout
    refused = run_python("import hcr_kernels", "sse9")
    assert refused.returncode != 0
    assert "HCR_CPU_ISA='sse9': CPU ISA must be one of amx, avx512_bf16, avx512, avx2, baseline" in refused.stderr
