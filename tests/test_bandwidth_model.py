"""The bandwidth model: bytes by hand at small shapes, agreement with the benchmarks, the bound, the GPU table, the README.

The pool_scatter rows are checked against ``benchmarks/test_bench_pool_scatter.py``'s own
``bytes_moved`` on its own batch, so a benchmark's GB/s and the model describe the same work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hcr_kernels import bandwidth_model as bm
from hcr_kernels.info import OPS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmark modules importable (they import each other and ``bandwidth`` by plain name)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    yield
    for name in [name for name in sys.modules if name.startswith("test_bench_") or name == "bandwidth"]:
        del sys.modules[name]


def test_weighted_cross_entropy_bytes_by_hand():
    # 3 tokens x 5 classes fp32: logits read (60 B) and gradient written (60 B) once; labels int64 (24 B),
    # weights fp32 (12 B) read; per-token losses fp32 (12 B) written.
    assert bm.weighted_cross_entropy_workload("t", 3, 5, "fp32").bytes_moved == 60 + 60 + 24 + 12 + 12
    # bf16 halves only the logits and their gradient.
    assert bm.weighted_cross_entropy_workload("t", 3, 5, "bf16").bytes_moved == 30 + 30 + 24 + 12 + 12


def test_ragged_cache_write_bytes_by_hand():
    # 2 layers; rows write 1 and 0 states of 1 head x 4 bf16 (8 B): per layer K and V states read (16 B) and
    # cache slots written (16 B), start and count read (2 rows x 2 x 8 B = 32 B).
    workload = bm.ragged_cache_write_workload("t", layers=2, batch=2, heads=1, head_dim=4, slots=8, steps=2,
                                              counts=(1, 0), dtype="bf16")
    assert workload.bytes_moved == 2 * (16 + 16 + 32)
    assert workload.flops == 0


def test_pool_scatter_bytes_by_hand():
    # One trace of 20 tokens, W=2: k = int(0.45 * 20 / 2) = 4 windows, a row of 20 - 8 + 4 + 2 = 18 tokens.
    # Forward, D=4 fp32: 14 template rows read (56 values), 4 windows x 2 x 4 hidden values read (32),
    # 18 rows written (72): 160 values of 4 B.
    assert bm.compressed_batch([20], 2) == (18, 4)
    forward = bm.pool_scatter_workload("t", [20], 2, 4, "fp32", backward=False)
    assert forward.bytes_moved == 160 * 4
    # Backward adds grad_out read (72 values) and the hidden states' gradient written (32).
    backward = bm.pool_scatter_workload("t", [20], 2, 4, "fp32", backward=True)
    assert backward.bytes_moved == (160 + 72 + 32) * 4
    assert backward.passes == "forward+backward" and forward.passes == "forward"


def test_decode_linear_bytes_and_flops_by_hand():
    # One 3 x 2 bf16 weight with bias, one row: weight 12 B, bias 6 B, input 4 B, output 6 B read or written;
    # 2 * 3 * 2 matmul flops and 3 bias adds.
    workload = bm.decode_linear_workload("t", [(3, 2, True)], rows=1, dtype="bf16")
    assert workload.bytes_moved == 12 + 6 + 4 + 6
    assert (workload.matmul_flops, workload.vector_flops) == (12, 3)


def test_pool_scatter_rows_equal_the_benchmarks_bytes(benchmarks):
    import test_bench_pool_scatter as bench

    lengths = torch.randint(1024, 4097, (bench.BATCH,), generator=torch.Generator().manual_seed(0)).tolist()
    assert tuple(lengths) == bm.COMPRESSION_TRACE_LENGTHS
    rows = {(w.params["window"], w.params["backward"]): w for w in bm.WORKLOADS
            if w.op == "pool_scatter" and w.dtype == "fp32"}
    assert set(rows) == {(2, False), (10, False), (2, True), (10, True)}
    for window in (2, 10):
        template, mask, hidden = bench.compression_batch(window)
        assert bm.compressed_batch(lengths, window) == (mask.shape[1], hidden.shape[0])
        for backward in (False, True):
            expected = bench.bytes_moved(template, mask, hidden, backward=backward, template_grad=False)
            assert rows[window, backward].bytes_moved == expected, (window, backward)


def test_other_shapes_are_the_benchmarks(benchmarks):
    import test_bench_cross_entropy as cross_entropy
    import test_bench_decode_linear as decode
    import test_bench_ragged_cache_write as cache

    assert set(cross_entropy.CE_SHAPES.values()) == {(bm.DOUBLETHINK_TOKENS, bm.MAMBA_VOCAB),
                                                     (bm.COMPRESSION_CE_TOKENS, bm.QWEN_VOCAB)}
    assert {step: (t, tuple(counts)) for step, (t, counts) in cache.STEPS.items()} == bm.CACHE_STEPS
    assert (cache.BATCH, cache.SLOTS) == (bm.CACHE_BATCH, bm.CACHE_SLOTS)
    assert [(n, k) for n, k, _ in bm.QWEN_MLP_WEIGHTS] == [tuple(shape) for shape in decode.MLP_1_5B]
    mamba = pytest.importorskip("test_bench_mamba")
    assert (mamba.BATCH, mamba.LENGTH, mamba.STATE) == (bm.MAMBA_BATCH, bm.MAMBA_LENGTH, bm.MAMBA_D_STATE)


def test_lower_bound_is_the_largest_term():
    memory_bound = bm.lower_bound(100, 10, {"fp32": (50, 10), "exp": (0, 1)})
    assert (memory_bound.seconds, memory_bound.limit, memory_bound.memory_bound) == (10, "memory", True)
    assert memory_bound.terms == {"memory": 10, "fp32": 5}  # a unit with no work is left out
    compute_bound = bm.lower_bound(100, 10, {"fp32": (50, 10), "exp": (60, 2)})
    assert (compute_bound.seconds, compute_bound.limit, compute_bound.memory_bound) == (30, "exp", False)
    assert bm.lower_bound(100, 10, {"fp32": (10**9, None)}).limit == "memory"  # unknown rate: no term
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        bm.lower_bound(1, 0, {})


def test_workload_bounds_on_the_h100():
    peak = bm.H100_SXM
    pool = next(w for w in bm.WORKLOADS if w.op == "pool_scatter")
    assert pool.lower_bound(peak).seconds == pool.bytes_moved / 3.35e12
    fused_bf16, fused_fp32 = (next(w for w in bm.WORKLOADS if w.op == "fused_linear_cross_entropy" and w.dtype == d)
                              for d in ("bf16", "fp32"))
    assert fused_bf16.lower_bound(peak).limit == "tensor"
    assert fused_bf16.lower_bound(peak).seconds == fused_bf16.matmul_flops / 989.4e12
    # fp32 matmuls run on the FMA units (TF32 is off in torch by default), with the elementwise work
    assert fused_fp32.lower_bound(peak).limit == "fp32"
    assert fused_fp32.lower_bound(peak).seconds == fused_fp32.flops / 66.9e12
    scan = next(w for w in bm.WORKLOADS if w.op == "selective_scan" and w.passes == "forward")
    terms = scan.lower_bound(peak).terms
    assert terms["exp"] == scan.exps / (132 * 16 * 1.98e9)
    assert terms["exp"] > 0.5 * terms["memory"]  # why the exp unit is in the model at all


def test_every_op_has_rows_or_a_reason():
    with_rows = {workload.op for workload in bm.WORKLOADS}
    assert with_rows | set(bm.OPS_WITHOUT_ROWS) == set(OPS)
    assert not with_rows & set(bm.OPS_WITHOUT_ROWS)
    assert len({workload.key for workload in bm.WORKLOADS}) == len(bm.WORKLOADS)  # rows are told apart by key


@pytest.mark.parametrize("name,bandwidth", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12),
])
def test_known_gpus(name, bandwidth):
    assert bm.known_peak(name).bandwidth == bandwidth


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA A100 80GB PCIe", "NVIDIA GeForce RTX 4090"])
def test_unlisted_gpus_are_not_guessed(name):
    assert bm.known_peak(name) is None


def test_peak_from_device_properties():
    h100 = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits
    peak = bm.peak_from_properties("NVIDIA H100 NVL", h100)
    assert peak.bandwidth == pytest.approx(3.35e12, rel=1e-3)
    assert peak.tensor_flops is None and peak.exps_per_second is None
    assert bm.peak_from_properties("old torch", SimpleNamespace()) is None
    assert bm.peak_from_properties("zero", SimpleNamespace(memory_clock_rate=0, memory_bus_width=5120)) is None


def test_device_peak_prefers_the_table_then_the_properties(monkeypatch):
    properties = SimpleNamespace(memory_clock_rate=1_000_000, memory_bus_width=1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 PCIe")
    assert bm.device_peak(0) is bm.H100_PCIE
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert bm.device_peak(0).bandwidth == 2 * 1e9 * 1024 / 8


def test_bad_dtype_and_counts_name_the_argument():
    with pytest.raises(ValueError, match="dtype must be one of"):
        bm.weighted_cross_entropy_workload("t", 3, 5, "int8")
    with pytest.raises(ValueError, match="counts must have one entry per row"):
        bm.ragged_cache_write_workload("t", 1, 2, 1, 4, 8, 2, (1,), "bf16")
    with pytest.raises(ValueError, match="window must be >= 1"):
        bm.compressed_batch([20], 0)


def test_command_prints_the_table(capsys):
    assert bm.main([]) == 0
    assert capsys.readouterr().out == bm.markdown_table() + "\n"
    assert bm.main(["--gpu", "NVIDIA H200"]) == 0
    assert "| H200 bound (µs) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bm.main(["--gpu", "Some Future GPU"])


def test_table_rows_and_measured_cells():
    table = bm.markdown_table(bm.WORKLOADS, bm.H100_SXM, {bm.WORKLOADS[0].key: "12.3 µs triton"})
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    assert len(rows) == len(bm.WORKLOADS)
    assert rows[0].endswith("| 12.3 µs triton |") and rows[1].endswith("| — |")
    assert "| — | — | — |" in bm.markdown_table(bm.WORKLOADS[:1], None)  # unknown peak: no bound


def test_readme_table_is_the_modules_output():
    """The README's table must be regenerated (``python -m hcr_kernels.bandwidth_model``) when the model changes."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert bm.markdown_table() in readme
