"""Bandwidth model: what each op must move and compute at the research's shapes, and the floor that sets on a GPU.

The yardstick of the first GPU run (``python -m hcr_kernels.gpu_check``): a kernel
is judged against the time no implementation can beat, ``max(bytes / bandwidth,
work / peak rate of the unit doing it)``, not against another implementation. The
bytes are the least a call must read and write (every input once, every output
once, nothing spilled); the work counts matmul flops (tensor cores for bf16/fp16,
fp32 ALUs for fp32: torch leaves TF32 off for matmuls), elementwise flops (fp32
ALUs) and exponentials separately, because on a GPU an ``exp`` goes through the
special-function unit at 1/8 of the FMA rate, which is what can make the selective
scan compute-bound where its flops alone would not.

Shapes: R1-Distill-Qwen-1.5B (hidden 1536, vocabulary 151,936, 28 layers, 2 KV
heads of 128, MLP 8960) for the compression ops, Mamba-130m (d_inner 1536,
d_state 16, conv 4, vocabulary 50,280) for the doublethink ops; batch and length
as in ``benchmarks/`` (each workload names its file), so a benchmark's GB/s and
this model describe the same work.

``python -m hcr_kernels.bandwidth_model`` prints the table of the README.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------------------------
# Devices

# ex2.approx results per SM per clock on compute capability 8.0 and 9.0 (CUDA C++ Programming Guide, throughput
# of the arithmetic instructions: "base-2 exponential"); exp() in the kernels compiles to one of these plus a mul.
EXP2_PER_SM_PER_CLOCK = 16


@dataclass(frozen=True)
class DevicePeak:
    """A GPU's peak rates; None where unknown (that term is then left out of the bound)."""

    name: str
    bandwidth: float  # bytes/s of device memory
    tensor_flops: float | None = None  # dense bf16/fp16 tensor-core flop/s
    fp32_flops: float | None = None  # fp32 FMA-unit flop/s (no tensor cores)
    exps_per_second: float | None = None  # special-function unit: exp2 per second
    source: str = ""


def _datasheet(name: str, bandwidth: float, tensor_flops: float, fp32_flops: float, sms: int,
               boost_clock_hz: float) -> DevicePeak:
    return DevicePeak(
        name=name, bandwidth=bandwidth, tensor_flops=tensor_flops, fp32_flops=fp32_flops,
        exps_per_second=sms * EXP2_PER_SM_PER_CLOCK * boost_clock_hz,
        source=f"NVIDIA datasheet; exp rate = {sms} SMs x {EXP2_PER_SM_PER_CLOCK}/clock x {boost_clock_hz / 1e9:.3g} GHz",
    )


H100_SXM = _datasheet("H100 SXM", 3.35e12, 989.4e12, 66.9e12, 132, 1.98e9)
H100_PCIE = _datasheet("H100 PCIe", 2.0e12, 756e12, 51.2e12, 114, 1.755e9)
H200 = _datasheet("H200", 4.8e12, 989.4e12, 66.9e12, 132, 1.98e9)
A100_SXM_80GB = _datasheet("A100 SXM4 80GB", 2.039e12, 312e12, 19.5e12, 108, 1.41e9)
A100_40GB = _datasheet("A100 40GB", 1.555e12, 312e12, 19.5e12, 108, 1.41e9)

# Substrings of torch.cuda.get_device_name() -> peak; the first match wins, so a specific name precedes a
# general one. "NVIDIA H100 80GB HBM3" is the SXM part's name. Parts not listed (H100 NVL, A100 80GB PCIe, ...)
# take the bandwidth from the device properties instead of a wrong row here.
KNOWN_GPUS: tuple[tuple[str, DevicePeak], ...] = (
    ("H100 PCIe", H100_PCIE),
    ("H100 80GB HBM3", H100_SXM),
    ("H100 SXM", H100_SXM),
    ("H200", H200),  # the NVL variant has the same 4.8 TB/s and lower clocks: its compute floor is then too low, never too high
    ("A100-SXM4-80GB", A100_SXM_80GB),
    ("A100-SXM4-40GB", A100_40GB),
    ("A100-PCIE-40GB", A100_40GB),
)


def known_peak(device_name: str) -> DevicePeak | None:
    """The datasheet peak of a GPU named like ``torch.cuda.get_device_name()``, or None."""
    lowered = device_name.lower()
    for key, peak in KNOWN_GPUS:
        if key.lower() in lowered:
            return peak
    return None


def peak_from_properties(device_name: str, properties) -> DevicePeak | None:
    """Bandwidth from ``torch.cuda.get_device_properties``: 2 transfers per memory clock (kHz) x bus width (bits) / 8.

    Only the bandwidth: torch exposes no per-SM throughput. None when the properties lack
    the memory clock or bus width (older torch) or report 0.
    """
    clock_khz = getattr(properties, "memory_clock_rate", 0) or 0
    bus_bits = getattr(properties, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return None
    return DevicePeak(name=device_name, bandwidth=2 * clock_khz * 1e3 * bus_bits / 8,
                      source=f"device properties: 2 x {clock_khz / 1e6:.4g} GHz x {bus_bits} bit / 8")


def device_peak(device: torch.device | int = 0) -> DevicePeak | None:
    """The peak of a CUDA device: the known-GPU table, else its properties; None if neither knows it."""
    name = torch.cuda.get_device_name(device)
    return known_peak(name) or peak_from_properties(name, torch.cuda.get_device_properties(device))


# ---------------------------------------------------------------------------------------------------------------
# Workloads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TENSOR_CORE_DTYPES = ("bf16", "fp16")
INT64 = 8  # bytes of an index (labels, start, count)
FP32 = 4  # bytes of the fp32 values every op keeps whatever the input dtype (losses, A, D, biases of the scan)


@dataclass(frozen=True)
class Bound:
    """A lower bound in seconds and the term that sets it: ``memory``, or the compute unit that is busiest."""

    seconds: float
    limit: str
    terms: Mapping[str, float] = field(hash=False)

    @property
    def memory_bound(self) -> bool:
        return self.limit == "memory"


UNIT_NAMES = {"memory": "memory", "tensor": "tensor cores", "fp32": "fp32 ALUs", "exp": "exp unit"}


def lower_bound(bytes_moved: float, bandwidth: float, compute: Mapping[str, tuple[float, float | None]]) -> Bound:
    """``max(bytes / bandwidth, count / rate per compute unit)``; units with no work or an unknown rate are left out.

    ``compute`` maps a unit name to ``(count, rate per second)``. The units overlap in time on
    a GPU, so the slowest one alone is the floor, not their sum.
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
    terms = {"memory": bytes_moved / bandwidth}
    for unit, (count, rate) in compute.items():
        if count and rate:
            terms[unit] = count / rate
    limit = max(terms, key=terms.__getitem__)
    return Bound(seconds=terms[limit], limit=limit, terms=terms)


@dataclass(frozen=True)
class Workload:
    """One call of one op at one named shape: what it must move and compute.

    ``params`` holds the shape in the form ``gpu_check`` builds inputs from.
    """

    op: str
    passes: str  # "forward" or "forward+backward"
    shape: str
    dtype: str  # a key of DTYPES
    bytes_moved: int
    matmul_flops: int = 0
    vector_flops: int = 0
    exps: int = 0
    note: str = ""
    params: Mapping[str, object] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """The row's identity in the README table and the gpu_check report."""
        return f"{self.op} | {self.passes} | {self.shape} | {self.dtype}"

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.vector_flops

    def lower_bound(self, peak: DevicePeak) -> Bound:
        """The floor of this call on ``peak``'s device."""
        if self.dtype in _TENSOR_CORE_DTYPES:
            compute = {"tensor": (self.matmul_flops, peak.tensor_flops), "fp32": (self.vector_flops, peak.fp32_flops)}
        else:  # fp32 matmuls run on the FMA units with the elementwise work (torch leaves TF32 off)
            compute = {"fp32": (self.matmul_flops + self.vector_flops, peak.fp32_flops)}
        compute["exp"] = (self.exps, peak.exps_per_second)
        return lower_bound(self.bytes_moved, peak.bandwidth, compute)


def _size(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype].itemsize


def _passes(backward: bool) -> str:
    return "forward+backward" if backward else "forward"


# --- pool_scatter ---------------------------------------------------------------------------------------------

def compression_windows(trace_lengths: Sequence[int], window: int) -> list[int]:
    """Windows each trace compresses in the benchmark's batch (``benchmarks/test_bench_pool_scatter.py``): about
    half of its reasoning, k = int(0.45 L / W)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [int(0.45 * length / window) for length in trace_lengths]


def compressed_batch(trace_lengths: Sequence[int], window: int) -> tuple[int, int]:
    """``(T, slots)`` of that batch: a trace of L tokens becomes a row of L - k W + k + 2 tokens (k placeholder
    slots and two markers); T is the longest row, slots the total k."""
    windows = compression_windows(trace_lengths, window)
    length = max(length - k * window + k + 2 for length, k in zip(trace_lengths, windows))
    return length, sum(windows)


def pool_scatter_workload(shape: str, trace_lengths: Sequence[int], window: int, dim: int, dtype: str,
                          backward: bool, note: str = "") -> Workload:
    """Template ``[B, T, D]``, ``slots`` windows of ``[W, D]``; backward gives the gradient to the hidden states only
    (the compression trainer's template is frozen). The ``[B, T]`` bool mask (B T bytes, < 0.1 %) is left out, as in
    the benchmark."""
    size = _size(dtype)
    length, slots = compressed_batch(trace_lengths, window)
    rows = len(trace_lengths) * length
    moved = (
        (rows - slots) * dim  # read: the template rows that are not slots
        + slots * window * dim  # read: the hidden states of every window
        + rows * dim  # write: every output row
    ) * size
    work = slots * window * dim  # W - 1 adds and one multiply by 1/W per pooled element
    if backward:
        moved += (
            rows * dim  # read: grad_out
            + slots * window * dim  # write: grad of the hidden states (grad_out of the slot / W)
        ) * size
        work += slots * window * dim
    return Workload("pool_scatter", _passes(backward), shape, dtype, moved, vector_flops=work, note=note,
                    params=dict(trace_lengths=tuple(trace_lengths), window=window, dim=dim, backward=backward))


# --- cross entropy --------------------------------------------------------------------------------------------

CE_FLOPS_PER_LOGIT = 5  # max, subtract, add to the sum; scale by weight / sum for the gradient (2)


def weighted_cross_entropy_workload(shape: str, tokens: int, vocab: int, dtype: str, note: str = "") -> Workload:
    """Loss and gradient in one pass: the forward stores ``weights * dCE/dlogits``, the backward only scales it."""
    size = _size(dtype)
    moved = (
        2 * tokens * vocab * size  # read the logits once, write their gradient once
        + tokens * INT64  # read: labels
        + tokens * FP32  # read: weights
        + tokens * FP32  # write: per-token losses (kept for the weights' gradient)
    )
    return Workload("weighted_cross_entropy", "forward+backward", shape, dtype, moved,
                    vector_flops=CE_FLOPS_PER_LOGIT * tokens * vocab, exps=tokens * vocab, note=note,
                    params=dict(tokens=tokens, vocab=vocab))


def fused_linear_cross_entropy_workload(shape: str, tokens: int, vocab: int, hidden: int, dtype: str,
                                        note: str = "") -> Workload:
    """CE of ``hidden @ lm_head.T`` with a frozen lm_head, gradient to the hidden states; the logits never leave the
    chip in the ideal kernel, so only the operands move."""
    size = _size(dtype)
    moved = (
        tokens * hidden * size  # read: hidden states
        + vocab * hidden * size  # read: lm_head weight, once
        + tokens * hidden * size  # write: grad of the hidden states
        + tokens * INT64  # read: labels
    )
    matmuls = 2 * (2 * tokens * vocab * hidden)  # logits = hidden @ W.T; grad_hidden = grad_logits @ W
    return Workload("fused_linear_cross_entropy", "forward+backward", shape, dtype, moved, matmul_flops=matmuls,
                    vector_flops=CE_FLOPS_PER_LOGIT * tokens * vocab, exps=tokens * vocab, note=note,
                    params=dict(tokens=tokens, vocab=vocab, hidden=hidden))


# --- ragged_cache_write_ --------------------------------------------------------------------------------------

def ragged_cache_write_workload(shape: str, layers: int, batch: int, heads: int, head_dim: int, slots: int,
                                steps: int, counts: Sequence[int], dtype: str, note: str = "") -> Workload:
    """One generation step: one call per layer, each writing ``counts[b]`` new states of row b into K and V."""
    if len(counts) != batch:
        raise ValueError(f"counts must have one entry per row (batch={batch}), got {len(counts)}")
    if not all(0 <= count <= steps for count in counts) or steps >= slots:
        raise ValueError(f"counts must be in [0, steps={steps}] and steps < slots={slots}, got counts {tuple(counts)}")
    size = _size(dtype)
    per_layer = (
        2 * sum(counts) * heads * head_dim * size  # read: the real new states, K and V
        + 2 * sum(counts) * heads * head_dim * size  # write: the same number of cache slots, K and V
        + 2 * batch * INT64  # read: start and count
    )
    return Workload("ragged_cache_write_", "forward", shape, dtype, layers * per_layer, note=note,
                    params=dict(layers=layers, batch=batch, heads=heads, head_dim=head_dim, slots=slots,
                                steps=steps, counts=tuple(counts)))


# --- Mamba: selective_scan and causal_conv1d ------------------------------------------------------------------

# Operation counts of the scan (delta_softplus, D, z and delta_bias as Mamba uses it). Per state element
# (b, d, l, n), forward: delta*A, exp, h = dA*h + (delta*u)*B (mul + FMA), y += C*h (FMA).
SCAN_FORWARD_FLOPS_PER_STATE = 6
SCAN_FORWARD_EXPS_PER_STATE = 1
# Per sequence element (b, d, l): delta + bias, softplus (exp and log), delta*u, y + D*u, out * silu(z) (exp, div).
SCAN_FORWARD_FLOPS_PER_ELEMENT = 9
SCAN_FORWARD_EXPS_PER_ELEMENT = 3
# Backward: the forward recomputed (the states are not stored) plus the adjoint recurrence: dh = dA*dh + C*dy,
# and the contributions to dB, dC, ddelta and dA of every state element.
SCAN_ADJOINT_FLOPS_PER_STATE = 13
SCAN_ADJOINT_FLOPS_PER_ELEMENT = 10


def selective_scan_workload(shape: str, batch: int, channels: int, length: int, state: int, dtype: str,
                            backward: bool, note: str = "") -> Workload:
    """``u, delta, z [batch, channels, L]``, ``B, C [batch, N, L]``; A, D, delta_bias in fp32 (as Mamba keeps them)."""
    size = _size(dtype)
    sequence = batch * channels * length  # elements of u, delta, z, out
    projections = batch * state * length  # elements of B, C
    parameters = channels * state + 2 * channels  # A, D, delta_bias (fp32)
    moved = (
        3 * sequence * size  # read: u, delta, z
        + 2 * projections * size  # read: B, C
        + parameters * FP32  # read: A, D, delta_bias
        + sequence * size  # write: out
    )
    states = sequence * state
    flops = SCAN_FORWARD_FLOPS_PER_STATE * states + SCAN_FORWARD_FLOPS_PER_ELEMENT * sequence
    exps = SCAN_FORWARD_EXPS_PER_STATE * states + SCAN_FORWARD_EXPS_PER_ELEMENT * sequence
    if backward:
        moved += (
            4 * sequence * size  # read: grad_out, u, delta, z
            + 2 * projections * size  # read: B, C
            + parameters * FP32  # read: A, D, delta_bias
            + 3 * sequence * size  # write: du, ddelta, dz
            + 2 * projections * size  # write: dB, dC
            + parameters * FP32  # write: dA, dD, ddelta_bias
        )
        flops += flops + SCAN_ADJOINT_FLOPS_PER_STATE * states + SCAN_ADJOINT_FLOPS_PER_ELEMENT * sequence
        exps *= 2  # the recomputed forward
    return Workload("selective_scan", _passes(backward), shape, dtype, moved, vector_flops=flops, exps=exps,
                    note=note, params=dict(batch=batch, channels=channels, length=length, state=state,
                                           backward=backward))


def causal_conv1d_workload(shape: str, batch: int, channels: int, length: int, width: int, dtype: str,
                           backward: bool, note: str = "") -> Workload:
    """Depthwise causal conv of ``x [batch, channels, L]`` with ``weight [channels, K]``, bias and SiLU (Mamba's)."""
    size = _size(dtype)
    sequence = batch * channels * length
    parameters = channels * width + channels  # weight and bias
    moved = (
        sequence * size  # read: x
        + parameters * size  # read: weight, bias
        + sequence * size  # write: out
    )
    flops = (2 * width + 1 + 4) * sequence  # K FMAs, the bias, SiLU (exp, add, div, mul)
    exps = sequence
    if backward:
        moved += (
            2 * sequence * size  # read: grad_out, x
            + parameters * size  # read: weight, bias
            + sequence * size  # write: dx
            + parameters * size  # write: dweight, dbias
        )
        flops += (2 * width + 1 + 5 + 2 * width + 2 * width + 1) * sequence  # recompute, SiLU', dx, dweight, dbias
        exps += sequence
    return Workload("causal_conv1d", _passes(backward), shape, dtype, moved, vector_flops=flops, exps=exps,
                    note=note, params=dict(batch=batch, channels=channels, length=length, width=width,
                                           backward=backward))


# --- decode_linear --------------------------------------------------------------------------------------------

def decode_linear_workload(shape: str, weights: Sequence[tuple[int, int, bool]], rows: int, dtype: str,
                           note: str = "") -> Workload:
    """One call per weight ``(N, K, has_bias)`` in turn, ``rows`` input rows each: a decode step streams the weights."""
    size = _size(dtype)
    moved = sum(
        out_features * in_features * size  # read: the weight, once
        + (out_features * size if bias else 0)  # read: the bias
        + rows * in_features * size  # read: the input rows
        + rows * out_features * size  # write: the output rows
        for out_features, in_features, bias in weights
    )
    matmuls = sum(2 * rows * out_features * in_features for out_features, in_features, _ in weights)
    bias_adds = sum(rows * out_features for out_features, _, bias in weights if bias)
    return Workload("decode_linear", "forward", shape, dtype, moved, matmul_flops=matmuls, vector_flops=bias_adds,
                    note=note, params=dict(weights=tuple(weights), rows=rows))


# ---------------------------------------------------------------------------------------------------------------
# The research's shapes

QWEN_HIDDEN, QWEN_VOCAB, QWEN_LAYERS, QWEN_KV_HEADS, QWEN_HEAD_DIM, QWEN_MLP = 1536, 151_936, 28, 2, 128, 8960
MAMBA_D_INNER, MAMBA_D_STATE, MAMBA_D_CONV, MAMBA_VOCAB = 1536, 16, 4, 50_280

# benchmarks/test_bench_pool_scatter.py: 8 traces, lengths torch.randint(1024, 4097, (8,)) with seed 0.
COMPRESSION_TRACE_LENGTHS = (1637, 1412, 3544, 3952, 1137, 2811, 4082, 1993)
# benchmarks/test_bench_cross_entropy.py (CE_SHAPES) and test_bench_gpu_kernels.py (FUSED_FULL_SHAPE).
DOUBLETHINK_TOKENS = 64 * 63  # batch 64 x 63 shifted positions
COMPRESSION_CE_TOKENS = 1024
FUSED_CE_TOKENS = 4096
# benchmarks/test_bench_ragged_cache_write.py: batch 8, a 4096-slot static cache, its two steps.
CACHE_BATCH, CACHE_SLOTS = 8, 4096
CACHE_STEPS = {"decode T=1": (1, (1,) * 8), "compression T=16": (16, (16, 12, 14, 13, 1, 1, 1, 0))}
# benchmarks/test_bench_mamba.py: batch 64 x 64 tokens (the doublethink trainer's), here at Mamba-130m's width.
MAMBA_BATCH, MAMBA_LENGTH = 64, 64
# benchmarks/test_bench_decode_linear.py "1.5B MLP" (gate, up, down); the attention projections beside them.
QWEN_MLP_WEIGHTS = ((QWEN_MLP, QWEN_HIDDEN, False), (QWEN_MLP, QWEN_HIDDEN, False), (QWEN_HIDDEN, QWEN_MLP, False))
QWEN_ATTENTION_WEIGHTS = (
    (QWEN_HIDDEN, QWEN_HIDDEN, True),  # q (12 heads of 128), with bias
    (QWEN_KV_HEADS * QWEN_HEAD_DIM, QWEN_HIDDEN, True),  # k
    (QWEN_KV_HEADS * QWEN_HEAD_DIM, QWEN_HIDDEN, True),  # v
    (QWEN_HIDDEN, QWEN_HIDDEN, False),  # o
)

_TRACES = "8 traces of 1k-4k tokens, D 1536"
_CE_TWO_PASS = ("the Triton kernel reads each row of logits twice (online max and sum, then the gradient); "
                "where the second read misses L2 it moves 1.5x these bytes, so at most 67 % of the bound")
_CACHE_LAUNCHES = ("28 small calls (one per layer, 16 KB and 119 KB each): launch latency, not bandwidth, "
                   "sets the time; the 70 % target does not apply")
_SCAN_SHAPE = "Mamba-130m, one of 24 layers: batch 64 x L 64, d_inner 1536, N 16"
_CONV_SHAPE = "Mamba-130m, one of 24 layers: batch 64 x L 64, d_inner 1536, K 4, SiLU"


def research_workloads() -> list[Workload]:
    """The rows of the README table, in its order."""
    workloads = []
    for window in (2, 10):
        workloads.append(pool_scatter_workload(f"{_TRACES}, W={window}", COMPRESSION_TRACE_LENGTHS, window,
                                               QWEN_HIDDEN, "fp32", backward=False))
    for dtype in ("fp32", "bf16"):
        for window in (2, 10):
            workloads.append(pool_scatter_workload(f"{_TRACES}, W={window}, grad to hidden", COMPRESSION_TRACE_LENGTHS,
                                                   window, QWEN_HIDDEN, dtype, backward=True))
    for dtype in ("fp32", "bf16"):
        workloads.append(weighted_cross_entropy_workload(f"doublethink: {DOUBLETHINK_TOKENS:,} tokens x {MAMBA_VOCAB:,}",
                                                         DOUBLETHINK_TOKENS, MAMBA_VOCAB, dtype, note=_CE_TWO_PASS))
        workloads.append(weighted_cross_entropy_workload(
            f"compression: {COMPRESSION_CE_TOKENS:,} tokens x {QWEN_VOCAB:,}", COMPRESSION_CE_TOKENS, QWEN_VOCAB,
            dtype, note=_CE_TWO_PASS))
    for dtype in ("fp32", "bf16"):
        workloads.append(fused_linear_cross_entropy_workload(
            f"compression: {FUSED_CE_TOKENS:,} tokens x {QWEN_VOCAB:,} x {QWEN_HIDDEN}, frozen lm_head",
            FUSED_CE_TOKENS, QWEN_VOCAB, QWEN_HIDDEN, dtype))
    for step, (steps, counts) in CACHE_STEPS.items():
        workloads.append(ragged_cache_write_workload(
            f"1.5B, 28 layers x K+V, B {CACHE_BATCH}, 2 heads x 128, S {CACHE_SLOTS}, {step}", QWEN_LAYERS,
            CACHE_BATCH, QWEN_KV_HEADS, QWEN_HEAD_DIM, CACHE_SLOTS, steps, counts, "bf16", note=_CACHE_LAUNCHES))
    for backward in (False, True):
        workloads.append(selective_scan_workload(_SCAN_SHAPE, MAMBA_BATCH, MAMBA_D_INNER, MAMBA_LENGTH,
                                                 MAMBA_D_STATE, "fp32", backward))
    workloads.append(causal_conv1d_workload(_CONV_SHAPE, MAMBA_BATCH, MAMBA_D_INNER, MAMBA_LENGTH, MAMBA_D_CONV,
                                            "fp32", backward=True))
    for name, weights in (("1.5B MLP (gate, up, down)", QWEN_MLP_WEIGHTS),
                          ("1.5B attention (q, k, v, o)", QWEN_ATTENTION_WEIGHTS)):
        for rows in (1, 8):
            workloads.append(decode_linear_workload(f"{name}, M={rows}", weights, rows, "bf16"))
    return workloads


WORKLOADS = research_workloads()

# Ops of hcr_kernels.info.OPS without rows of their own, and why.
OPS_WITHOUT_ROWS = {
    "window_mean_pool": "the pool_scatter rows: the same kernel (pool rows) without template rows",
    "decode_attention": "a CPU kernel only: on GPUs the model's own attention (SDPA, flash) serves",
    "qwen2_decoder_step": "a CPU kernel only, against Python overhead: on GPUs compile_decode's CUDA graphs serve",
}

# ---------------------------------------------------------------------------------------------------------------
# The table

_SUPERSCRIPTS = "¹²³⁴⁵⁶⁷⁸⁹"


def _number(value: float) -> str:
    """Three significant digits without exponents: 1,234 / 56.7 / 0.89 / 0.0012."""
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _limit_cell(bound: Bound) -> str:
    """The limiting unit, and the runner-up when it is close (at least half as slow): a kernel may hit it first."""
    cell = UNIT_NAMES[bound.limit]
    others = {unit: seconds for unit, seconds in bound.terms.items() if unit != bound.limit}
    if others:
        runner_up = max(others, key=others.__getitem__)
        if others[runner_up] >= 0.5 * bound.seconds:
            cell += f" ({UNIT_NAMES[runner_up]} {100 * others[runner_up] / bound.seconds:.0f} %)"
    return cell


def markdown_table(workloads: Sequence[Workload] = WORKLOADS, peak: DevicePeak | None = H100_SXM,
                   measured: Mapping[str, str] | None = None) -> str:
    """The table of the README (``measured`` None: "—" cells) and of the gpu_check report (cells by ``Workload.key``).

    Both come from here so their rows are the same and a measured column can be pasted
    over the README's. Notes become numbered footnotes under the table.
    """
    measured = measured or {}
    bound_header = f"{peak.name} bound (µs)" if peak else "bound (µs)"
    lines = [
        f"| op | pass | shape | dtype | MB moved | GFLOP | {bound_header} | bound by | measured |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    notes: list[str] = []
    for workload in workloads:
        shape = workload.shape
        if workload.note:
            if workload.note not in notes:
                notes.append(workload.note)
            shape += _SUPERSCRIPTS[notes.index(workload.note)]
        bound = workload.lower_bound(peak) if peak else None
        lines.append(
            f"| {workload.op} | {workload.passes} | {shape} | {workload.dtype} | {_number(workload.bytes_moved / 1e6)} "
            f"| {_number(workload.flops / 1e9)} | {_number(bound.seconds * 1e6) if bound else '—'} "
            f"| {_limit_cell(bound) if bound else '—'} | {measured.get(workload.key, '—')} |"
        )
    if notes:
        lines += [""] + [f"{_SUPERSCRIPTS[i]} {note}." for i, note in enumerate(notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.bandwidth_model", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H100 80GB HBM3",
                        help="device name for the bound column, as torch.cuda.get_device_name() gives it; one of "
                             f"{', '.join(key for key, _ in KNOWN_GPUS)} (default: the H100 SXM)")
    args = parser.parse_args(argv)
    peak = known_peak(args.gpu)
    if peak is None:
        parser.error(f"--gpu {args.gpu!r} is not a known GPU; known: {', '.join(key for key, _ in KNOWN_GPUS)}")
    print(markdown_table(WORKLOADS, peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
