"""The compiled extension is really there, and holds what the build rules promise.

``pip install -e .`` must build ``hcr_kernels._C`` with the CPU kernels always,
and with the CUDA kernels whenever torch is a CUDA build and ``nvcc`` is on the
PATH (unless ``HCR_SKIP_CUDA=1``): a build that silently skipped either fails here.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hcr_kernels import _extension

OPS = ("hcr::pool_rows_", "hcr::pool_rows_backward_", "hcr::ragged_cache_write_")  # with CPU and CUDA kernels
CPU_ONLY_OPS = (
    "hcr::selective_scan_fwd",
    "hcr::selective_scan_bwd",
    "hcr::causal_conv1d_fwd",
    "hcr::causal_conv1d_bwd",
    "hcr::decode_linear",
)


def test_extension_is_built_and_loads():
    assert _extension.extension_loaded(), f"hcr_kernels._C failed to import: {_extension.import_error()}"
    assert _extension.build_info()["cpu"] is True


@pytest.mark.parametrize("op", OPS + CPU_ONLY_OPS)
def test_cpu_kernels_are_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def test_cuda_kernels_built_when_toolkit_present():
    if os.environ.get("HCR_SKIP_CUDA") == "1":
        pytest.skip("HCR_SKIP_CUDA=1: CPU-only build requested")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("torch has no CUDA or nvcc is not on the PATH: the CUDA sources are not built")
    info = _extension.build_info()
    assert info["cuda"], ("torch has CUDA and nvcc is on the PATH, but _C was built without its CUDA kernels: "
                          f"{info.get('cuda_skipped_reason')}")
    major, minor = (int(part) for part in torch.version.cuda.split(".")[:2])
    assert info["cuda_runtime_version"] // 1000 == major, (info, torch.version.cuda)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_ops_mutate_only_their_outputs():
    """Schemas declare the written tensors (torch.library mutation annotations)."""
    schema = torch.ops.hcr.pool_rows_.default._schema
    mutated = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    assert mutated == ["out"]
    schema = torch.ops.hcr.pool_rows_backward_.default._schema
    mutated = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    assert mutated == ["grad_hidden", "grad_template"]


def test_op_checks_its_arguments():
    out = torch.empty(3, 4)
    hidden = torch.randn(2, 2, 4)
    with pytest.raises(RuntimeError, match="refers to window 5 of 2"):
        torch.ops.hcr.pool_rows_(None, torch.tensor([0, 1, 5]), hidden, out)
    with pytest.raises(RuntimeError, match="has no window and no template_"):
        torch.ops.hcr.pool_rows_(None, torch.tensor([0, -1, 1]), hidden, out)
    with pytest.raises(RuntimeError, match="window_of_row must be int64"):
        torch.ops.hcr.pool_rows_(None, torch.tensor([0, 1, 1], dtype=torch.int32), hidden, out)
    with pytest.raises(RuntimeError, match="hidden has D=4 but out has D=5"):
        torch.ops.hcr.pool_rows_(None, torch.tensor([0, 1, 1]), hidden, torch.empty(3, 5))


def test_explicit_native_without_extension_names_the_rebuild(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_IMPORT_ERROR", ImportError("no _C"))
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e"):
        _extension.require_native(torch.device("cpu"))


@pytest.mark.parametrize("loaded", [True, False], ids=["through-C", "without-C"])
def test_environment_variable_says_what_os_environ_says(monkeypatch, loaded):
    """The ops read HCR_BACKEND and HCR_AUTOTUNE per call through the C environment: every way a
    test or a user changes os.environ (set, change, delete, an empty value) must show at once."""
    if not loaded:
        monkeypatch.setattr(_extension, "_C", None)
    name = "HCR_TEST_ENVIRONMENT_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert _extension.environment_variable(name) is None
    for value in ("native", "reference ", "", "ü"):
        monkeypatch.setenv(name, value)
        assert _extension.environment_variable(name) == os.environ[name] == value
    os.environ.pop(name)
    assert _extension.environment_variable(name) is None


class _CpuOnlyExtension:
    """Stands in for a ``_C`` whose CUDA part was skipped at build time."""

    @staticmethod
    def build_info():
        return {"cpu": True, "cuda": False, "cuda_runtime_version": None, "openmp": True, "torch_version": "x"}


def _write_build_report(tmp_path, monkeypatch, text: str):
    report = tmp_path / "_build.json"
    report.write_text(text)
    monkeypatch.setattr(_extension, "BUILD_REPORT", report)


def test_build_report_is_read_and_a_damaged_one_ignored(tmp_path, monkeypatch):
    _write_build_report(tmp_path, monkeypatch, '{"torch_version": "2.0.0", "cuda_skipped_reason": "why"}')
    assert _extension.build_report() == {"torch_version": "2.0.0", "cuda_skipped_reason": "why"}
    _write_build_report(tmp_path, monkeypatch, "{not json")
    assert _extension.build_report() == {}


def test_missing_cuda_kernels_error_says_why_the_build_skipped_them(tmp_path, monkeypatch):
    _write_build_report(tmp_path, monkeypatch, '{"cuda_skipped_reason": "the CUDA sources failed to build (X)"}')
    monkeypatch.setattr(_extension, "_C", _CpuOnlyExtension())
    assert _extension.build_info()["cuda_skipped_reason"] == "the CUDA sources failed to build (X)"
    with pytest.raises(RuntimeError, match=r"without CUDA kernels \(the CUDA sources failed to build \(X\)\)"):
        _extension.require_native(torch.device("cuda"))


def test_import_error_names_the_torch_the_extension_was_built_against(tmp_path, monkeypatch):
    _write_build_report(tmp_path, monkeypatch, '{"torch_version": "0.0.1"}')
    explained = _extension._explain_import_error(ImportError("undefined symbol: _ZN3c10"))
    assert f"built against torch 0.0.1, this is torch {torch.__version__}" in str(explained)
    assert "undefined symbol" in str(explained)
    _write_build_report(tmp_path, monkeypatch, f'{{"torch_version": "{torch.__version__}"}}')
    assert str(_extension._explain_import_error(ImportError("other"))) == "other"


def test_info_report_runs():
    result = subprocess.run([sys.executable, "-m", "hcr_kernels.info"], capture_output=True, text=True, check=True)
    assert "extension _C    loaded" in result.stdout
    assert "pool_scatter" in result.stdout and "cpu: native" in result.stdout
