"""decode_linear: the native few-row kernel against F.linear, its dispatch, and decode_linears.

Forward in every dtype the kernel supports against an fp64 oracle (odd M, N, K, with
and without bias, N-D and non-contiguous inputs, weights with a row stride), every
gradient against the reference's, the automatic choice (native only for few rows,
F.linear bit for bit otherwise), the fakes torch.compile needs, bad input, and the
``with decode_linears(model)`` patch (routes plain nn.Linear only, restores always).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcr_kernels import decode_linear, decode_linear_ref, decode_linears
from hcr_kernels import _extension, autotune, cpu_isa
from hcr_kernels.decode_linear import (
    EVERY_ROW_COUNT,
    ROTATION_LIMIT,
    ROW_LADDER,
    decode_linear_buckets,
    measured_buckets,
    native_buckets,
    row_bucket,
    stack_buckets,
    takes_native,
    weight_rotation,
)
from hcr_kernels.decode_linear import native as native_module, op as op_module
from param_sets import tolerance

NATIVE_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def assert_matches_oracle(actual, expected, dtype, in_features, partial_sums, what=""):
    """param_sets.tolerance: a dot product of K terms (and the bias) in fp32 with mixed signs, so
    cancellation at the size of its partial sums, bounded by ``partial_sums`` (the same products of
    absolute values: a result can be far smaller than its terms), rounded to ``dtype``; the fp64
    oracle is the exact side."""
    scale = partial_sums.abs().max().item() if partial_sums.numel() else 0.0
    atol, rtol = tolerance(dtype, in_features + 1, scale)
    message = (lambda m: f"{what}: {m}") if what else None
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=message)


def assert_linear_matches_oracle(out, x, weight, bias, dtype):
    absolute = [None if t is None else t.abs() for t in (x, weight, bias)]
    assert_matches_oracle(out, oracle(x, weight, bias), dtype, weight.shape[1], oracle(*absolute))


# (M rows, N features out, K features in): one row, a 4-row group plus a remainder,
# K below one vector, between vectors, over two; N = 1; more rows than the ladder measures; a long K
# (2,100: many pairs of vectors, then vector and scalar tails) for two groups of 4 rows and one more; 6 rows of
# 4,200 values, more than an L1 of up to 64 KiB holds (K in pieces, rows_in_pieces in decode_linear_cpu.cpp, for a
# group of 4 rows and one of 2, with 40 weight rows: two blocks of 16 and the rest unpieced).
SHAPES = [
    pytest.param(1, 130, 257, id="M1-N130-K257"),
    pytest.param(7, 33, 33, id="M7-N33-K33"),
    pytest.param(3, 1, 15, id="M3-N1-K15"),
    pytest.param(2, 64, 1, id="M2-N64-K1"),
    pytest.param(5, 300, 96, id="M5-N300-K96"),
    pytest.param(40, 17, 64, id="M40-N17-K64"),
    pytest.param(9, 35, 2100, id="M9-N35-K2100"),
    pytest.param(6, 40, 4200, id="M6-N40-K4200"),
]


def operands(rows, out_features, in_features, dtype, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)

    return uniform(rows, in_features), uniform(out_features, in_features), uniform(out_features) if bias else None


def oracle(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_native_forward_matches_oracle(rows, out_features, in_features, dtype, with_bias):
    x, weight, bias = operands(rows, out_features, in_features, dtype, bias=with_bias)
    out = decode_linear(x, weight, bias, backend="native")
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert_linear_matches_oracle(out, x, weight, bias, dtype)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("wide,first,last", [(80, 10, 70), (96, 16, 80)], ids=["K60", "K64"])  # K64: AMX tiles
def test_native_takes_nd_and_strided_inputs(dtype, wide, first, last):
    """A [B, T, K] input, a non-contiguous input, a weight whose rows sit in a wider matrix."""
    x, wide, bias = operands(6, 40, wide, dtype)
    K = last - first
    weight = wide[:, first:last]  # rows contiguous, row stride wider than K
    batch = x[:, first:last].reshape(2, 3, K)
    out = decode_linear(batch, weight, bias, backend="native")
    assert out.shape == (2, 3, 40)
    assert_linear_matches_oracle(out, batch, weight, bias, dtype)
    strided = x[:, first:last:2].t()[:, :4].t()  # [4, K / 2] with strides in both dims
    out = decode_linear(strided, weight[:, :K // 2], bias, backend="native")
    assert_linear_matches_oracle(out, strided, weight[:, :K // 2], bias, dtype)
    transposed = weight[:, :K // 2].t().contiguous().t()  # rows not contiguous: copied, still right
    out = decode_linear(strided, transposed, bias, backend="native")
    assert_linear_matches_oracle(out, strided, transposed, bias, dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_native_reads_every_16_bit_weight_exactly(cpu_isa, dtype):
    """Every finite 16-bit pattern (subnormals, signed zeros, the largest values) as a weight, picked
    out by one-hot inputs: each comes back exactly (the fp32 conversion of each ISA, F16C or integer
    ops); an inf or nan weight gives inf or nan. bf16 on the avx512_bf16 level (vdpbf16ps) and on AMX
    tiles (the amx level) reads subnormal values as zero, as those dot products do (and torch's own
    bf16 F.linear on such a CPU): every normal value still comes back exactly, at a width of whole
    32-value blocks and at one with a partial block."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[torch.isfinite(every)]
    # 32: two vectors of 16 lanes (the unrolled loop of every ISA), one chunk of a tile, one vdpbf16ps;
    # 45: a partial block after it (the tail of each loop)
    for width in (32, 45):
        weight = torch.cat((finite, torch.zeros((-len(finite)) % width, dtype=dtype))).reshape(-1, width)
        out = decode_linear(torch.eye(width, dtype=dtype), weight, backend="native")
        if cpu_isa in ("amx", "avx512_bf16") and dtype == torch.bfloat16:
            expected = torch.where(weight.t().float().abs() < torch.finfo(dtype).tiny, 0, weight.t())
            assert (out == expected).all()  # zeros of either sign
            assert torch.equal(out[expected != 0], expected[expected != 0])
            assert (expected != weight.t()).sum() == 2 * 127  # the subnormals, nothing else
        else:
            assert torch.equal(out, weight.t())
    special = torch.zeros(3, width, dtype=dtype)
    special[:, 0] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    picked = decode_linear(torch.eye(width, dtype=dtype)[:1], special, backend="native")[0]
    assert picked[0] == float("inf") and picked[1] == float("-inf") and picked[2].isnan()


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_native_16_bit_outputs_round_as_torch_does(dtype):
    """A 16-bit output is the kernel's fp32 sum rounded to nearest even: bit for bit what the same
    operands widened to fp32 give, cast with ``.to`` (the kernel's own vector stores, every ISA),
    including sums past the fp16 range (inf) and a feature count that is no multiple of a vector."""
    x, weight, bias = operands(9, 131, 70, dtype)
    x[0] *= 2000  # row 0's sums overflow fp16's 65504
    weight, x = (weight * 40).to(dtype), x.to(dtype)
    out = decode_linear(x, weight, bias, backend="native")
    widened = decode_linear(x.float(), weight.float(), bias.float(), backend="native").to(dtype)
    if dtype == torch.float16:
        assert out[0].isinf().any()
    assert torch.equal(out.view(torch.int16), widened.view(torch.int16))


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("in_features", [133, 2100, 128, 4200], ids=["K133", "K2100", "K128", "K4200"])
def test_native_row_does_not_depend_on_its_batch(dtype, in_features):
    """Each input row's output is bit-identical alone and inside a batch of 11 rows (groups of 4, 2
    and 1 rows, one to four weight rows per pass, and the weight rows left over one at a time; K short
    and long; bf16 with K = 128 on AMX tiles on the amx level, vdpbf16ps pairs with a partial block at
    K = 133, 2,100 and 4,200 there and on the avx512_bf16 level; K in pieces in the batch, whose 11 rows
    of 4,200 values take more than an L1 of up to 64 KiB (of 2,100, up to 32 KiB or 64 in fp32), and whole
    for the row alone):
    decoding a sequence alone or in a batch reads the same logits."""
    x, weight, bias = operands(11, 67, in_features, dtype)
    batched = decode_linear(x, weight, bias, backend="native")
    for row in range(len(x)):
        alone = decode_linear(x[row:row + 1], weight, bias, backend="native")
        assert torch.equal(batched[row:row + 1], alone), f"row {row}"


def test_native_empty_shapes():
    weight, bias = torch.randn(5, 0), torch.randn(5)
    out = decode_linear(torch.randn(3, 0), weight, bias, backend="native")
    assert torch.equal(out, bias.expand(3, 5))  # an empty sum is the bias, as F.linear gives
    assert torch.equal(decode_linear(torch.randn(3, 0), weight, backend="native"), torch.zeros(3, 5))
    assert decode_linear(torch.randn(0, 4), torch.randn(5, 4), backend="native").shape == (0, 5)
    assert decode_linear(torch.randn(2, 4), torch.randn(0, 4), backend="native").shape == (2, 0)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gradients_match_reference(dtype, with_bias):
    x, weight, bias = operands(3, 21, 37, dtype, bias=with_bias, seed=1)
    x = x.reshape(3, 1, 37)
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    grad_out = operands(3, 1, 21, dtype, seed=2)[0].reshape(3, 1, 21)
    native = decode_linear(*leaves[:2], leaves[2] if with_bias else None, backend="native")
    assert native.grad_fn is not None
    got = torch.autograd.grad(native, leaves, grad_out)

    def fp64_gradients(values, grad):
        reference_leaves = [t.detach().double().requires_grad_() for t in values]
        out = decode_linear_ref(*reference_leaves[:2], reference_leaves[2] if with_bias else None)
        return torch.autograd.grad(out, reference_leaves, grad.double())

    expected = fp64_gradients(leaves, grad_out)
    partial_sums = fp64_gradients([t.abs() for t in leaves], grad_out.abs())  # the same sums of |terms|
    for name, a, b, bound in zip(("input", "weight", "bias"), got, expected, partial_sums):
        assert a.dtype == dtype, name
        assert_matches_oracle(a, b, dtype, 21, bound, what=name)  # the longest reduction: 21 output features


@pytest.fixture
def measured_by(monkeypatch):
    """``measured_by(rule)``: autotune's measurements replaced by ``rule(shape_class) -> verdict`` from then on,
    with no decision remembered from before or kept after the test."""

    def use(rule):
        monkeypatch.setattr(autotune, "compare", lambda op, shape_class, *calls: rule(shape_class))
        autotune.forget()

    yield use
    autotune.forget()


def rows_of(shape_class: str) -> int:
    return int(shape_class.rsplit("rows=", 1)[1])


@pytest.fixture
def native_wins_up_to_4_rows(measured_by):
    """Measurements replaced by a rule: the native kernel wins for at most 4 rows; the classes asked are recorded."""
    asked = []
    measured_by(lambda shape_class: asked.append(shape_class) or (
        autotune.FASTER if rows_of(shape_class) <= 4 else autotune.SLOWER))
    return asked


UP_TO_4_ROWS = 0b111  # buckets 0, 1, 2: 1 row, 2 rows, 3-4 rows


def test_row_buckets_are_the_ladder_rungs_above():
    assert [row_bucket(rows) for rows in range(0, 10)] == [0, 0, 1, 2, 2, 3, 3, 3, 3, 4]
    assert [row_bucket(rung) for rung in ROW_LADDER] == list(range(len(ROW_LADDER)))
    assert [row_bucket(rung + 1) for rung in ROW_LADDER[1:]] == list(range(2, len(ROW_LADDER) + 1))
    assert row_bucket(33) == len(ROW_LADDER)  # past the ladder: no measured mask has that bit
    assert [takes_native(rows, 0b1010) for rows in range(1, 10)] == [False, True, False, False, True, True, True,
                                                                     True, False]
    assert all(takes_native(rows, EVERY_ROW_COUNT) for rows in (0, 1, 33, 2**40))
    assert not any(takes_native(rows, 2**len(ROW_LADDER) - 1) for rows in (33, 64, 2**40))


def test_automatic_choice_takes_native_at_the_measured_row_counts(native_wins_up_to_4_rows):
    weight = torch.randn(24, 16)
    assert native_buckets(weight) == UP_TO_4_ROWS
    assert native_wins_up_to_4_rows == [f"float32 N=24 K=16 rows={rows}" for rows in ROW_LADDER]  # every rung
    assert native_buckets(weight.double()) == 0  # no native fp64
    assert native_buckets(weight.t().contiguous().t()) == 0  # rows not contiguous: no per-call copy
    assert native_buckets(weight, "reference") == 0
    many = torch.randn(5, 16)
    assert torch.equal(decode_linear(many, weight), F.linear(many, weight))  # the reference, bit for bit
    few = many[:3]
    assert torch.equal(decode_linear(few, weight), decode_linear(few, weight, backend="native"))


@pytest.mark.parametrize("verdicts,buckets", [
    ("faster slower faster faster slower faster", 0b101101),  # each rung on its own: a loss ends nothing
    ("slower slower faster faster faster slower", 0b011100),  # F.linear's fast few-row path, then its hole
    ("tie faster tie faster tie tie", 0b001010),  # a tie keeps F.linear, as a loss does
    ("tie tie tie tie tie tie", 0),
])
def test_every_rung_of_the_ladder_decides_its_own_row_counts(measured_by, verdicts, buckets):
    by_rows = dict(zip(ROW_LADDER, verdicts.split()))
    measured_by(lambda shape_class: by_rows[rows_of(shape_class)])
    weight = torch.randn(24, 16)
    assert native_buckets(weight) == buckets
    for rows in range(1, ROW_LADDER[-1] + 9):  # every count up to past the ladder: native where its rung won
        x = torch.randn(rows, 16)
        rung = next((rung for rung in ROW_LADDER if rung >= rows), None)
        expected = decode_linear(x, weight, backend="native" if by_rows.get(rung) == "faster" else "reference")
        assert torch.equal(decode_linear(x, weight), expected), rows


def test_automatic_choice_never_takes_a_slower_native_kernel(measured_by):
    weight = torch.randn(24, 16)
    measured_by(lambda shape_class: autotune.SLOWER)
    assert native_buckets(weight) == 0
    measured_by(lambda shape_class: autotune.FASTER)
    assert native_buckets(weight) == 2**len(ROW_LADDER) - 1


def test_automatic_choice_measures_the_real_kernels(monkeypatch, tmp_path):
    """Unpatched: both paths run on this machine at every rung, and the decisions land in the cache file."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    autotune.forget()
    buckets = native_buckets(torch.randn(40, 24))
    decisions = autotune.cached_decisions()
    measured = {int(key.rsplit("=", 1)[1]): autotune.verdict(record["fast_s"], record["reference_s"])
                for key, record in decisions.items() if key.startswith("decode_linear | float32 N=40 K=24")}
    assert sorted(measured) == list(ROW_LADDER)
    assert buckets == sum(1 << row_bucket(rows) for rows, verdict in measured.items() if verdict == autotune.FASTER)
    assert all(decisions[key]["fast_s"] > 0 and decisions[key]["reference_s"] > 0 for key in decisions)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV_VAR, "0")  # off: the reference, whatever was measured
    assert native_buckets(torch.randn(40, 24)) == 0


@pytest.mark.parametrize("shape,dtype", [((40, 24), torch.float32), ((3, 5), torch.bfloat16), ((4096, 1024), torch.float32)])
def test_weight_rotation_fills_the_cores_caches_with_copies(shape, dtype):
    """The weight first, then copies with storage of their own, together at least what the cores' caches hold
    (or ROTATION_LIMIT matrices); a weight that large alone is not copied."""
    weight = torch.randn(*shape).to(dtype)
    rotation = weight_rotation(weight)
    assert rotation[0] is weight
    assert all(torch.equal(copy, weight) and copy.dtype == dtype for copy in rotation)
    assert len({copy.data_ptr() for copy in rotation}) == len(rotation)
    nbytes = weight.numel() * weight.element_size()
    if nbytes >= autotune.core_caches_bytes():
        assert len(rotation) == 1
    else:
        assert len(rotation) == ROTATION_LIMIT or (len(rotation) * nbytes >= autotune.core_caches_bytes()
                                                   > (len(rotation) - 1) * nbytes)


def test_each_timed_round_calls_every_copy_once_per_path(monkeypatch):
    """Both paths of a measured rung see the same input and every matrix of the rotation, in turn."""
    calls = []
    monkeypatch.setattr(op_module, "_kernel", lambda x, w, b: calls.append(("native", x.shape[0], w.data_ptr())))
    monkeypatch.setattr(op_module, "decode_linear_ref",
                        lambda x, w, b: calls.append(("reference", x.shape[0], w.data_ptr())))

    def compare(op_name, shape_class, fast, reference):
        fast(), reference()
        return autotune.TIE
    monkeypatch.setattr(autotune, "compare", compare)
    autotune.forget()
    weight = torch.randn(8, 16)
    rotation = weight_rotation(weight)
    assert measured_buckets(weight) == 0
    assert len(rotation) > 1
    pointers = [copy.data_ptr() for copy in rotation]
    expected = [(path, rows, pointer) for rows in ROW_LADDER for path in ("native", "reference") for pointer in pointers]
    assert len(calls) == len(expected)
    assert [(path, rows) for path, rows, _ in calls] == [(path, rows) for path, rows, _ in expected]
    assert calls[0][2] == weight.data_ptr() and len({pointer for *_, pointer in calls}) == len(rotation)
    autotune.forget()


def test_backend_env_var_selects_reference(monkeypatch, measured_by):
    """Also after the bucket mask for that weight was worked out and remembered without the variable."""
    weight = torch.randn(4, 4)
    measured_by(lambda shape_class: autotune.FASTER)
    assert native_buckets(weight) == 2**len(ROW_LADDER) - 1
    monkeypatch.setenv("HCR_BACKEND", "reference")
    assert native_buckets(weight) == 0
    monkeypatch.setenv("HCR_BACKEND", "native")
    assert native_buckets(weight.double()) == 0  # a global choice: no native fp64, so the reference
    autotune.forget()
    monkeypatch.setenv("HCR_BACKEND", "native")  # a global choice: fp64 falls back instead of failing
    assert native_buckets(torch.randn(4, 4, dtype=torch.float64)) == 0
    assert native_buckets(weight, "reference") == 0  # a named backend wins over the variable
    monkeypatch.setenv("HCR_BACKEND", "reference")
    assert native_buckets(weight, "native") == EVERY_ROW_COUNT


@pytest.mark.skipif(not _extension.extension_loaded(), reason="the per-call lookup table lives in _C")
def test_per_call_lookup_follows_everything_the_choice_depends_on(monkeypatch, measured_by):
    """A direct call finds its layer's mask in _C's table (``_extension.weight_choice``), for any weight like
    that one, and never a mask worked out under other conditions: another shape, dtype or row layout, another
    ISA or thread count, HCR_BACKEND or HCR_AUTOTUNE set otherwise (unset is not empty) find nothing there and
    are worked out again; ``autotune.forget`` drops it; a weight without strides is never kept."""
    verdict = {"now": autotune.FASTER}
    measured_by(lambda shape_class: verdict["now"])
    every = 2**len(ROW_LADDER) - 1
    weight = torch.randn(24, 16)
    assert _extension.weight_choice(weight) is None
    assert native_buckets(weight) == every
    assert _extension.weight_choice(weight) == every
    assert _extension.weight_choice(torch.randn(24, 16)) == every  # a weight like it
    verdict["now"] = autotune.SLOWER  # what measuring again would say from now on
    assert native_buckets(torch.randn(24, 16)) == every  # remembered: not measured again
    unlike = {"shape": torch.randn(24, 17), "dtype": torch.randn(24, 16).bfloat16(),
              "row layout": torch.randn(16, 24).t()}
    for what, other in unlike.items():
        assert _extension.weight_choice(other) is None, what
    assert native_buckets(unlike["shape"]) == 0  # measured now
    others = [isa for isa in cpu_isa.supported_cpu_isas() if isa != cpu_isa.active_cpu_isa()]
    if others:
        with cpu_isa.use_cpu_isa(others[0]):
            assert _extension.weight_choice(weight) is None
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert _extension.weight_choice(weight) is None
    finally:
        torch.set_num_threads(threads)
    for name, value in (("HCR_BACKEND", ""), ("HCR_BACKEND", "reference"), (autotune.AUTOTUNE_ENV_VAR, "0")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert _extension.weight_choice(weight) is None, (name, value)
    assert native_buckets(weight) == every  # the original conditions again: still there
    sparse = torch.randn(24, 16).to_sparse()
    _extension.remember_weight_choice(sparse, every)
    assert _extension.weight_choice(sparse) is None
    autotune.forget()
    assert _extension.weight_choice(weight) is None


def test_bad_input_names_the_argument():
    x, weight = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"input must be \[\.\.\., K\] with K = weight.shape\[1\] = 8"):
        decode_linear(torch.randn(2, 7), weight)
    with pytest.raises(ValueError, match=r"weight must be a 2-D tensor, got shape \(3, 8, 1\)"):
        decode_linear(x, torch.randn(3, 8, 1))
    with pytest.raises(ValueError, match=r"bias must be None or \[N\] = \[3\]"):
        decode_linear(x, weight, torch.randn(4))
    with pytest.raises(TypeError, match="tensors must have one dtype: input is torch.float32, weight is torch.float64"):
        decode_linear(x, weight.double())
    with pytest.raises(TypeError, match="backend 'native' supports"):
        decode_linear(x.double(), weight.double(), backend="native")
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        decode_linear([1.0] * 8, weight)
    with pytest.raises(ValueError, match="backend 'triton' is not implemented"):
        decode_linear(x, weight, backend="triton")


def test_fake_kernels_for_torch_compile():
    """Schema and fake (meta) implementations agree with the kernels, as torch.compile needs."""
    x, weight, bias = operands(2, 5, 7, torch.float32)
    torch.library.opcheck(torch.ops.hcr.decode_linear.default, (x.reshape(2, 1, 7), weight, bias),
                          test_utils=("test_schema", "test_faketensor"))
    caches = [torch.zeros(2, 1, 6, 3) for _ in range(2)]
    states = [torch.randn(2, 1, 2, 3) for _ in range(2)]
    torch.library.opcheck(torch.ops.hcr.ragged_cache_write_.default,
                          (*caches, *states, torch.tensor([0, 3]), torch.tensor([2, 1])),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.usefixtures("cpu_isa")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    out_features=st.integers(1, 70),
    in_features=st.one_of(st.integers(1, 140), st.sampled_from([32, 64, 96, 128])),  # multiples of 32: tiles
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_native_matches_oracle(rows, out_features, in_features, dtype, with_bias, seed):
    x, weight, bias = operands(rows, out_features, in_features, dtype, bias=with_bias, seed=seed)
    out = decode_linear(x, weight, bias, backend="native")
    assert_linear_matches_oracle(out, x, weight, bias, dtype)


ONE_CALL = pytest.mark.skipif(not _extension.extension_loaded(), reason="the one-call path lives in _C")


@ONE_CALL
@pytest.mark.usefixtures("cpu_isa")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    out_features=st.integers(1, 70),
    in_features=st.one_of(st.integers(1, 140), st.sampled_from([32, 64, 96, 128])),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_one_call_path_gives_the_paths_bits(leading, out_features, in_features, dtype, with_bias, seed):
    """A direct call whose choice is known runs in one call into _C (``_extension.decode_linear_chosen``): the
    native kernel gives the op's bits (through torch's dispatcher) and the F.linear side F.linear's, for any
    leading dims (a 1-D input too), with and without bias."""
    rows = 1
    for size in leading:
        rows *= size
    x, weight, bias = operands(rows, out_features, in_features, dtype, bias=with_bias, seed=seed)
    x = x.reshape(*leading, in_features)
    native = _extension.decode_linear_chosen(x, weight, bias, EVERY_ROW_COUNT)
    assert native is not None and native.shape == (*leading, out_features)
    assert torch.equal(native, torch.ops.hcr.decode_linear(x, weight, bias))
    linear = _extension.decode_linear_chosen(x, weight, bias, 0)
    assert linear is not None and torch.equal(linear, F.linear(x, weight, bias))


class TensorSubclass(torch.Tensor):
    pass


class PassingFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassingDispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def declined_calls():
    """(what, call) pairs: each call's arguments are something the one-call path must leave to Python."""
    x, weight, bias = operands(3, 5, 8, torch.float32)
    strided_rows = torch.randn(8, 5).t()
    return [
        ("input not a tensor", lambda: ([1.0] * 8, weight, None)),
        ("bias not a tensor", lambda: (x, weight, [0.0] * 5)),
        ("a tensor subclass", lambda: (x.as_subclass(TensorSubclass), weight, None)),
        ("a negative view", lambda: (torch._neg_view(x), weight, None)),
        ("a meta tensor", lambda: (x.to("meta"), weight.to("meta"), None)),
        ("fp64", lambda: (x.double(), weight.double(), None)),
        ("dtypes differ", lambda: (x, weight.bfloat16(), None)),
        ("bias dtype differs", lambda: (x, weight, bias.double())),
        ("bias shape", lambda: (x, weight, torch.randn(4))),
        ("K differs", lambda: (torch.randn(3, 7), weight, None)),
        ("3-D weight", lambda: (x, weight[None], None)),
        ("0-d input", lambda: (torch.tensor(1.0), weight, None)),
        ("no input rows", lambda: (torch.randn(0, 8), weight, None)),
        ("K = 0", lambda: (torch.randn(3, 0), torch.randn(5, 0), None)),
        ("weight rows not contiguous", lambda: (x, strided_rows, None)),
        ("a gradient of the kernel", lambda: (x.clone().requires_grad_(), weight, None)),
    ]


@ONE_CALL
@pytest.mark.parametrize("what", [what for what, _ in declined_calls()])
def test_one_call_path_leaves_anything_unusual_to_python(what):
    """None (the Python path decides, with its checks and errors) for anything but plain CPU tensors that fit
    together in a native dtype, with rows to compute and no gradient asked of the kernel; and the public call
    still answers as F.linear does or says what is wrong."""
    arguments = dict(declined_calls())[what]()
    assert _extension.decode_linear_chosen(*arguments, EVERY_ROW_COUNT) is None
    x, weight, bias = arguments
    try:
        expected = F.linear(x, weight, bias)
    except (TypeError, RuntimeError):
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            decode_linear(x, weight, bias, backend="reference")
        return
    got = decode_linear(x, weight, bias, backend="reference")
    assert got.shape == expected.shape and (x.device.type == "meta" or torch.equal(got, expected))


@ONE_CALL
def test_one_call_path_leaves_calls_under_a_mode_or_transform_to_python():
    """A mode in force sees every op, and torch.func's batched tensors are of type Tensor: all go through the
    dispatcher (where the op itself answers them), never the one call."""
    x, weight, _ = operands(3, 5, 8, torch.float32)
    with PassingFunctionMode():
        assert _extension.decode_linear_chosen(x, weight, None, EVERY_ROW_COUNT) is None
    with PassingDispatchMode():
        assert _extension.decode_linear_chosen(x, weight, None, EVERY_ROW_COUNT) is None
    declined = torch.func.vmap(
        lambda row: torch.tensor(_extension.decode_linear_chosen(row, weight, None, EVERY_ROW_COUNT) is None))(x)
    assert declined.all()
    assert _extension.decode_linear_chosen(x, weight, None, EVERY_ROW_COUNT) is not None  # plain: answered


@ONE_CALL
def test_direct_calls_skip_the_python_path_once_the_choice_is_known(monkeypatch, native_wins_up_to_4_rows):
    """Named "native", or automatic once this weight's choice is remembered, a direct call is answered by the one
    call: its Python checks and the dispatcher's op are not reached; a call that needs them still does. So is a
    routed layer's call of the kernel without autograd."""
    reached = []
    check = op_module._check_args
    monkeypatch.setattr(op_module, "_check_args", lambda *a: reached.append("checks") or check(*a))
    weight, few, many = torch.randn(24, 16), torch.randn(3, 16), torch.randn(9, 16)
    decode_linear(few, weight)  # measured and remembered: the Python path
    assert reached == ["checks"]
    reached.clear()
    for x, backend in ((few, None), (many, None), (few, "native"), (many, "native")):
        out = decode_linear(x, weight, backend=backend)
        native = backend == "native" or x is few
        assert torch.equal(out, torch.ops.hcr.decode_linear(x, weight, None) if native else F.linear(x, weight))
    assert reached == []
    decode_linear(few.clone().requires_grad_(), weight)  # the autograd Function's
    decode_linear(few, weight, backend="reference")
    assert reached == ["checks", "checks"]
    monkeypatch.setattr(native_module, "decode_linear", lambda *args: pytest.fail("the op's path was taken"))
    layer = torch.nn.Linear(16, 24)
    with decode_linears(layer), torch.no_grad():  # a routed layer: its kernel calls too
        out = layer(few)
    assert torch.equal(out, torch.ops.hcr.decode_linear(few, layer.weight, layer.bias))


@ONE_CALL
def test_one_call_path_shows_in_a_profile_and_compiles_through_the_op():
    """The kernel run by the one call is recorded under the op's name, as the dispatcher's path is; under
    torch.compile the Python path traces the op (fullgraph: no break at the call into _C)."""
    x, weight, bias = operands(2, 5, 8, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        decode_linear(x, weight, bias, backend="native")
    assert "hcr::decode_linear" in [event.name for event in profile.events()]
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: decode_linear(x, weight, bias, backend="native"), fullgraph=True,
                             backend=recording_backend)
    assert torch.equal(compiled(x), decode_linear(x, weight, bias, backend="native"))
    assert any("hcr.decode_linear" in str(node.target) for graph in graphs for node in graph.graph.nodes)
    torch._dynamo.reset()


class Scaled(torch.nn.Linear):
    """A Linear subclass with its own forward (as quantised linears have): left alone."""

    def forward(self, input):
        return super().forward(input) * 2


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8, bias=False), Scaled(8, 4))


def test_decode_linears_routes_plain_linears_and_restores(monkeypatch, native_wins_up_to_4_rows):
    from hcr_kernels.decode_linear import patch

    routed = []

    def spy(input, weight, bias, buckets):
        routed.append((tuple(weight.shape), buckets))
        return patch.apply_decode_linear.__wrapped__(input, weight, bias, buckets)

    spy.__wrapped__ = patch.apply_decode_linear
    monkeypatch.setattr(patch, "apply_decode_linear", spy)
    model, x = small_model(), torch.randn(1, 1, 16)
    expected = model(x)
    with decode_linears(model):
        assert [("forward" in vars(m)) for m in model] == [True, False, True, False]
        inside = model(x)
    # the two plain layers; the subclass kept its forward
    assert routed == [((32, 16), UP_TO_4_ROWS), ((8, 32), UP_TO_4_ROWS)]
    torch.testing.assert_close(inside, expected, atol=1e-6, rtol=1e-6)
    assert not any("forward" in vars(m) or hasattr(m, "_hcr_native_buckets") for m in model)
    assert torch.equal(model(x), expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wins=st.sets(st.sampled_from(ROW_LADDER)), leading=st.lists(st.integers(0, 21), min_size=1, max_size=3),
       bias=st.booleans())
def test_a_routed_layer_takes_the_kernel_exactly_at_the_row_counts_of_its_mask(monkeypatch, measured_by, wins,
                                                                                leading, bias):
    """The routed forward's inline row-count test agrees with ``takes_native`` for any input shape (no rows,
    one, between and past the ladder's rungs) and any set of rungs the kernel won; the other calls are
    ``F.linear``'s, bit for bit."""
    measured_by(lambda shape_class: autotune.FASTER if rows_of(shape_class) in wins else autotune.SLOWER)
    taken = []
    kernel = native_module.decode_linear
    monkeypatch.setattr(native_module, "decode_linear", lambda *args: taken.append(args[0].shape) or kernel(*args))
    layer, x = torch.nn.Linear(16, 8, bias=bias), torch.randn(*leading, 16)
    mask = sum(1 << row_bucket(rung) for rung in wins)
    rows = x.numel() // 16
    with decode_linears(layer):
        assert decode_linear_buckets(layer) == mask and ("forward" in vars(layer)) == (mask != 0)
        out = layer(x)
    assert taken == ([x.shape] if takes_native(rows, mask) else [])
    if taken:
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_a_routed_layer_uses_its_own_parameters_of_the_moment_and_fails_as_nn_linear_does():
    """A parameter assigned inside the block, and a copy's parameters (a deep copy made inside it), are the ones
    a routed layer multiplies by."""
    layer, x = torch.nn.Linear(16, 8), torch.randn(3, 16)
    with decode_linears(layer, backend="native"):
        assert decode_linear_buckets(layer) == EVERY_ROW_COUNT
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))
        layer.bias = None
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            twin.weight.mul_(-1)
        assert decode_linear_buckets(twin) == EVERY_ROW_COUNT
        torch.testing.assert_close(twin(x), -layer(x), atol=1e-5, rtol=1e-5)
        for bad in (torch.tensor(1.0), None):  # 0-d, not a tensor: F.linear's errors, not the routing's
            with pytest.raises((RuntimeError, TypeError)) as inside:
                layer(bad)
            with pytest.raises(type(inside.value)):
                F.linear(bad, layer.weight)


def test_decode_linears_leaves_a_layer_the_kernel_never_wins_with_its_own_forward(measured_by):
    """A layer whose bucket mask is 0 (F.linear measured faster at every row count) is not routed: the same
    F.linear call, without the routing's Python on every call. ``decode_linear_buckets`` tells which is which."""
    # the kernel wins on the 16 -> 32 layer only, and the stack of the two layers runs faster with that mix
    measured_by(lambda shape_class: autotune.FASTER if "N=32 K=16" in shape_class or "mix vs F.linear" in shape_class
                else autotune.SLOWER)
    model, x = small_model(), torch.randn(1, 1, 16)
    expected = model(x)
    with decode_linears(model):
        assert [("forward" in vars(m)) for m in model] == [True, False, False, False]
        assert model[0]._hcr_native_buckets == 2**len(ROW_LADDER) - 1  # every rung of the ladder won
        assert [decode_linear_buckets(m) for m in model] == [63, None, 0, None]  # no Linear, a subclass: None
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    assert not any("forward" in vars(m) or hasattr(m, "_hcr_native_buckets") for m in model)
    assert [decode_linear_buckets(m) for m in model] == [0, None, 0, None]
    model[2].forward = lambda x: x  # replaced by something else: not a mask anyone knows
    assert decode_linear_buckets(model[2]) is None


def three_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 24), torch.nn.Linear(24, 8))


@pytest.mark.parametrize("stack_verdicts,expected", [
    ({"mix vs F.linear": "tie", "kernel vs F.linear": "faster"}, [63, 63, 63]),  # the kernel everywhere
    ({"mix vs F.linear": "slower", "kernel vs F.linear": "tie"}, [0, 0, 0]),  # F.linear everywhere: none routed
    ({"mix vs F.linear": "faster", "kernel vs F.linear": "tie"}, [63, 0, 63]),  # the layers' own mix
    ({"mix vs F.linear": "faster", "kernel vs F.linear": "faster", "mix vs kernel": "faster"}, [63, 0, 63]),
    ({"mix vs F.linear": "faster", "kernel vs F.linear": "faster", "mix vs kernel": "tie"}, [63, 63, 63]),
])
def test_decode_linears_decides_a_mixed_stack_as_a_whole(measured_by, stack_verdicts, expected):
    """Where the layers' own choices mix the kernel and F.linear at a rung, the stack is timed as a whole (a
    switch of path costs what no single layer's measurement sees): the mix, the kernel everywhere or F.linear
    everywhere, each against F.linear everywhere, a tie keeping the simpler plan. Uniform rungs are not timed."""
    asked = []

    def rule(shape_class):
        asked.append(shape_class)
        if "linears" not in shape_class:  # a layer's own measurement: the kernel wins on the 32 -> 24 layer only
            return autotune.SLOWER if "N=24 K=32" in shape_class else autotune.FASTER
        return next(verdict for name, verdict in stack_verdicts.items() if f": {name}," in shape_class)

    measured_by(rule)
    model, x = three_linears(), torch.randn(1, 1, 16)
    expected_out = model(x)
    with decode_linears(model):
        assert [decode_linear_buckets(m) for m in model] == expected
        assert [("forward" in vars(m)) for m in model] == [mask != 0 for mask in expected]
        torch.testing.assert_close(model(x), expected_out, atol=1e-6, rtol=1e-6)
    stack_classes = [c for c in asked if "linears" in c]
    assert {rows_of(c) for c in stack_classes} == set(ROW_LADDER) and all("own choices 101" in c for c in stack_classes)
    assert len(stack_classes) == len(ROW_LADDER) * len(stack_verdicts)
    asked.clear()
    with decode_linears(model):  # remembered: nothing measured again
        pass
    assert not asked


@pytest.mark.parametrize("stack_verdict,expected", [("faster", [63, 63, 63]), ("tie", [0, 0, 0])])
def test_decode_linears_times_a_stack_whose_layers_tied_against_f_linear(measured_by, stack_verdict, expected):
    """A rung at which no layer won but one tied (a difference one layer's measurement cannot tell from noise)
    is timed for the stack: the kernel everywhere against F.linear everywhere, the only other plan."""
    asked = []

    def rule(shape_class):
        asked.append(shape_class)
        if "linears" not in shape_class:  # a layer's own measurement: a tie on the 32 -> 24 layer, losses elsewhere
            return autotune.TIE if "N=24 K=32" in shape_class else autotune.SLOWER
        return stack_verdict if ": kernel vs F.linear," in shape_class else pytest.fail(f"timed {shape_class}")

    measured_by(rule)
    model = three_linears()
    with decode_linears(model):
        assert [decode_linear_buckets(m) for m in model] == expected
    stack_classes = [c for c in asked if "linears" in c]
    assert sorted(rows_of(c) for c in stack_classes) == list(ROW_LADDER)
    assert all("own choices 000" in c for c in stack_classes)


def test_decode_linears_times_a_uniform_or_named_stack_not_at_all(measured_by):
    asked = []
    model = three_linears()
    for verdict, expected in ((autotune.FASTER, 63), (autotune.SLOWER, 0)):  # every layer wins / loses: no mix
        measured_by(lambda shape_class: asked.append(shape_class) or verdict)
        with decode_linears(model):
            assert [decode_linear_buckets(m) for m in model] == [expected] * 3
    with decode_linears(model, backend="native"):
        assert [decode_linear_buckets(m) for m in model] == [EVERY_ROW_COUNT] * 3
    assert asked and not any("linears" in c for c in asked)


def test_a_stack_is_timed_over_its_layers_in_order_and_only_the_measured_ones_take_part(monkeypatch):
    """Each timed call of a plan runs every measured layer in the model's order, on the path the plan gives it; a
    layer the automatic choice does not measure (rows not contiguous) keeps its mask 0 whatever the stack says."""
    calls = []
    monkeypatch.setattr(op_module, "_kernel", lambda x, w, b: calls.append(("native", w.shape)))
    monkeypatch.setattr(op_module, "decode_linear_ref", lambda x, w, b: calls.append(("reference", w.shape)))
    plans = {}

    def compare(op_name, shape_class, fast, reference):
        if op_name != "decode_linear stack":
            return autotune.FASTER if shape_class.startswith("float32 N=32") else autotune.SLOWER
        for name, run in (("fast", fast), ("reference", reference)):
            calls.clear()
            run()
            plans[shape_class.split(": ")[1].split(",")[0], name] = list(calls)
        return autotune.FASTER if "kernel vs F.linear" in shape_class else autotune.TIE
    monkeypatch.setattr(autotune, "compare", compare)
    autotune.forget()
    weights = [torch.randn(32, 16), torch.randn(24, 32), torch.randn(8, 24), torch.randn(24, 8).t()]
    masks = [native_buckets(w) for w in weights]
    assert masks == [63, 0, 0, 0]
    assert stack_buckets(weights, masks) == [63, 63, 63, 0]
    shapes = [(32, 16), (24, 32), (8, 24)]
    assert plans["kernel vs F.linear", "fast"] == [("native", s) for s in shapes]
    assert plans["kernel vs F.linear", "reference"] == [("reference", s) for s in shapes]
    assert plans["mix vs F.linear", "fast"] == [("native", shapes[0]), ("reference", shapes[1]), ("reference", shapes[2])]
    autotune.forget()


def test_decode_linears_reference_is_bit_identical_and_gradients_flow():
    model, x = small_model(), torch.randn(3, 16)
    expected = model(x)
    with decode_linears(model, backend="reference"):
        assert not any("forward" in vars(m) for m in model)  # mask 0 everywhere: nothing routed
        assert torch.equal(model(x), expected)
    with decode_linears(model):
        loss = model(x[:1]).square().sum()
        loss.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_decode_linears_restores_after_an_exception_and_nests(native_wins_up_to_4_rows):
    model = small_model()
    with pytest.raises(RuntimeError, match="boom"):
        with decode_linears(model):
            with decode_linears(model):  # inner block finds the layers routed already: leaves them alone
                pass
            assert "forward" in vars(model[0])  # the inner exit did not undo the outer block
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with decode_linears("not a model"):
            pass
    with pytest.raises(TypeError, match="backend 'native' supports"):  # checked before anything is patched
        with decode_linears(small_model().double(), backend="native"):
            pass
