"""decode_attention: the native kernel against an fp64 oracle, on every ISA; its checks and fake.

Every dtype the kernel has, grouped-query heads (G = 1 to 7: every count of rows the kernel's register
sweeps take, and their remainders), head dims below, between
and above a vector, one and several steps per row (several query blocks: G x T > 16),
sliding windows, positions at the cache's first and last slot, views of a larger cache
(the generator's ``[:, :, :span]``), a hypothesis property test over all of it, and bad
input on both backends. The generation tests (test_compressed_generation.py) check that a
generator routed through it writes the oracle's tokens.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcr_kernels import decode_attention, decode_attention_ref
from hcr_kernels._extension import extension_loaded
from hcr_kernels.decode_attention import BLOCK_QUERIES, chunk_slots
from hcr_kernels.decode_attention import op as op_module
from param_sets import tolerance

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="the native extension hcr_kernels._C is not built")

NATIVE_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def operands(batch, heads, kv_heads, steps, slots, head_dim, dtype, *, seed=0, spare=3):
    """Query, and keys / values as ``[:, :, :slots]`` views of caches ``spare`` slots longer; positions."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, steps, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)  # as transformers
    caches = [torch.randn(batch, kv_heads, slots + spare, head_dim, generator=generator).to(dtype) for _ in range(2)]
    positions = torch.randint(0, slots, (batch, steps), generator=generator)
    positions[0, -1] = slots - 1  # the last slot, and the first
    positions[-1, 0] = 0
    return query, caches[0][:, :, :slots], caches[1][:, :, :slots], positions


def assert_matches_oracle(query, keys, values, positions, window=None, what=""):
    """param_sets.tolerance: scores are dot products of D terms that cancel (error ~ |q| |k| scale), the output a
    weighted mean of S value rows: off by max |v| times the scores' error, rounded to the dtype."""
    scale = query.shape[-1] ** -0.5
    out = decode_attention(query, keys, values, positions, scale=scale, sliding_window=window, backend="native")
    expected = decode_attention_ref(query.double(), keys.double(), values.double(), positions, scale=scale,
                                    sliding_window=window)
    assert out.dtype == query.dtype and out.shape == expected.shape
    score_scale = (query.double().norm(dim=-1).max() * keys.double().norm(dim=-1).max()).item() * scale
    atol, rtol = tolerance(query.dtype, keys.shape[2] + query.shape[-1],
                           values.double().abs().max().item() * (1 + score_scale))
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol,
                               msg=(lambda m: f"{what}: {m}") if what else None)


# (B, Hq, Hkv, T, S, D): a decode step (T = 1) of Qwen2-1.5B's heads (G = 6, D = 128) and of the
# tiny test model's (G = 2, D = 64); re-encode steps of several queries; D of 1, 5, 24 (below and
# between vectors) and 72; G = 6 with T = 5 (three blocks of 16 query rows); G = 4 and 5 (a value
# sweep's remainder of 4 and 5 heads on AVX-512, and R = 16 / 10 query rows for the key sweeps); one slot.
SHAPES = [
    pytest.param(2, 12, 2, 1, 97, 128, id="decode-G6-D128"),
    pytest.param(3, 4, 2, 1, 40, 64, id="decode-G2-D64"),
    pytest.param(2, 4, 2, 6, 33, 64, id="reencode-T6"),
    pytest.param(2, 6, 2, 5, 50, 24, id="G3-D24"),
    pytest.param(1, 3, 3, 9, 20, 5, id="G1-D5"),
    pytest.param(2, 12, 2, 5, 61, 72, id="G6-T5-blocks"),
    pytest.param(2, 8, 2, 4, 45, 40, id="G4-T4"),
    pytest.param(1, 10, 2, 2, 70, 48, id="G5-T2"),
    pytest.param(2, 2, 1, 1, 1, 1, id="one-slot-D1"),
]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,steps,slots,head_dim", SHAPES)
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_native_matches_oracle(batch, heads, kv_heads, steps, slots, head_dim, dtype, window):
    assert_matches_oracle(*operands(batch, heads, kv_heads, steps, slots, head_dim, dtype), window=window)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES[:2])
@pytest.mark.parametrize("head_dim", [5, 40, 64])  # 64: AMX tiles (D a multiple of 32)
@pytest.mark.parametrize("span", [3, 4, 7, 8, 9, 15, 16, 17, 31, 33])
def test_spans_around_the_key_block(span, head_dim, dtype):
    """Pass 1 scores keys in blocks of one vector's lanes (4, 8 or 16 by ISA), the last block shifted back to
    end at the query's slot, and goes slot by slot below one block: spans just under, at and over 1x / 2x."""
    query, keys, values, _ = operands(2, 6, 2, 1, span + 2, head_dim, dtype, seed=span)
    positions = torch.tensor([[span - 1], [span + 1]])  # spans of `span` and `span` + 2 slots
    assert_matches_oracle(query, keys, values, positions, what=f"span {span}")


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("steps", [1, 2])
def test_more_heads_per_group_than_one_query_block(steps):
    """A group of more query heads than the kernel's block of query rows (BLOCK_QUERIES, e.g. one key/value
    head for many query heads) still takes one step's heads in one pass: its row bookkeeping must hold them
    (it was a stack array of BLOCK_QUERIES entries: 21 heads crashed the process)."""
    heads = BLOCK_QUERIES + 5
    assert_matches_oracle(*operands(2, heads, 1, steps, 37, 24, torch.float32), window=9)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", NATIVE_DTYPES[:2])
@pytest.mark.parametrize("trend", ["rising", "falling"])
@pytest.mark.parametrize("tail", [0, 3, 69], ids=["whole-chunks", "tail-under-a-key-block", "tail-69"])
@pytest.mark.parametrize("windowed", [False, True], ids=["full", "window"])
def test_spans_of_several_chunks(dtype, trend, tail, windowed):
    """The kernel takes a long span in chunks that fit in this core's L2 (chunk_slots), each folded into a
    running softmax: two whole chunks and a last one of ``tail`` slots (none, fewer than a key block, more
    than a block of value rows). Key norms rising along the slots put each row's largest scores in its last
    chunk (every chunk raises the running maximum: the rescaling path); falling, in its first. Two steps
    per row, one span ending a chunk before the other; with a window of half a chunk and 5 slots, the
    first chunk (counted from the earlier window's start) holds no slot of the later step."""
    head_dim = 24
    chunk = chunk_slots(head_dim, dtype)
    assert chunk > 0 and chunk % 64 == 0, chunk
    slots = 2 * chunk + tail
    query, keys, values, _ = operands(2, 6, 2, 2, slots, head_dim, dtype, seed=tail)
    norms = torch.linspace(0.3, 2.0, slots)
    keys = (keys.float() * (norms if trend == "rising" else norms.flip(0))[:, None]).to(dtype)
    positions = torch.tensor([[slots - 1, slots - 1 - chunk], [slots - 1 - chunk, slots - 1]])
    window = chunk // 2 + 5 if windowed else None
    assert_matches_oracle(query, keys, values, positions, window=window, what=f"{slots} slots, chunks of {chunk}")


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_reference_is_masked_sdpa(window):
    """The oracle itself against torch's SDPA with the generator's kind of additive mask and repeated heads."""
    query, keys, values, positions = operands(2, 4, 2, 3, 17, 8, torch.float64)
    slot = torch.arange(17)[None, None, :]
    visible = slot <= positions[:, :, None]
    if window:
        visible &= slot > positions[:, :, None] - window
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=visible[:, None], scale=0.3)
    actual = decode_attention_ref(query, keys, values, positions, scale=0.3, sliding_window=window)
    torch.testing.assert_close(actual, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_a_query_reads_no_slot_past_its_position():
    """What lies after a query's slot (stale states of a cropped row, another step's queries) changes nothing."""
    query, keys, values, positions = operands(2, 4, 2, 3, 30, 16, torch.float32)
    before = decode_attention(query, keys, values, positions, scale=0.25, backend="native")
    keys, values = keys.clone(), values.clone()
    for b in range(2):
        later = int(positions[b].max()) + 1
        keys[b, :, later:], values[b, :, later:] = 1e4, -1e4
    after = decode_attention(query, keys, values, positions, scale=0.25, backend="native")
    assert torch.equal(before, after)


@pytest.mark.usefixtures("cpu_isa")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 7),
    steps=st.integers(1, 6),
    slots=st.integers(1, 70),
    head_dim=st.one_of(st.integers(1, 40), st.sampled_from([32, 64])),  # multiples of 32: AMX tiles
    window=st.one_of(st.none(), st.integers(1, 20)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
)
def test_property_native_matches_oracle(batch, kv_heads, groups, steps, slots, head_dim, window, dtype, seed, chunk):
    """``chunk``: the kernel's chunk of the span set to a few slots (op.chunk_slots_set_to), so that these small
    spans cross chunk boundaries anywhere: chunks shorter than a key block, rows with no slot in a chunk."""
    operands_ = operands(batch, kv_heads * groups, kv_heads, steps, slots, head_dim, dtype, seed=seed)
    with op_module.chunk_slots_set_to(chunk) if chunk else contextlib.nullcontext():
        assert_matches_oracle(*operands_, window=window)


def test_empty_step():
    query, keys, values, _ = operands(2, 4, 2, 1, 5, 8, torch.float32)
    out = decode_attention(query[:, :, :0], keys, values, torch.zeros(2, 0, dtype=torch.long), scale=1.0)
    assert out.shape == (2, 0, 4, 8)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_input_names_the_argument(backend):
    query, keys, values, positions = operands(2, 4, 2, 1, 5, 8, torch.float32)

    def call(q=query, k=keys, v=values, p=positions, **kwargs):
        return decode_attention(q, k, v, p, scale=1.0, backend=backend, **kwargs)

    with pytest.raises(ValueError, match=r"positions\[1, 0\] = 5 must be a slot of the cache, in \[0, S\) = \[0, 5\)"):
        call(p=torch.tensor([[0], [5]]))
    with pytest.raises(ValueError, match=r"positions\[0, 0\] = -1 must be a slot"):
        call(p=torch.tensor([[-1], [0]]))
    with pytest.raises(ValueError, match=r"positions must be \[B, T\] = \[2, 1\], got \(2, 2\)"):
        call(p=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must have dtype torch.int64"):
        call(p=positions.int())
    with pytest.raises(ValueError, match=r"query's heads \(4\) must be a multiple of keys' heads \(3\)"):
        call(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match=r"keys must be \[B, Hkv, S, D\] = \[2, Hkv, S, 8\]"):
        call(k=torch.randn(2, 2, 5, 7), v=torch.randn(2, 2, 5, 7))
    with pytest.raises(ValueError, match="values is"):
        call(v=torch.randn(2, 2, 6, 8))
    with pytest.raises(TypeError, match="tensors must have one dtype"):
        call(v=values.double())
    with pytest.raises(ValueError, match="query must be a 4-D tensor"):
        call(q=query[0])
    with pytest.raises(RuntimeError, match="inference only"):
        call(q=query.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"keys must be contiguous along D \(stride 1 in its last dimension"):
        call(k=torch.randn(2, 2, 5, 16)[..., ::2])
    for window in (0, -2, 2.5, True):  # -2 had the native kernel attend over everything, the reference give NaN
        with pytest.raises(ValueError, match=rf"sliding_window must be None \(no window\) or an int >= 1, got "
                                             rf"{re.escape(repr(window))}"):
            call(sliding_window=window)
    for scale in ("x", float("nan"), None):
        with pytest.raises(ValueError, match=rf"scale must be a finite real number .*, got {re.escape(repr(scale))}"):
            decode_attention(query, keys, values, positions, scale=scale, backend=backend)
    # a numpy scale and window are what they say: the kernel gets them as a float and an int
    expected = call(sliding_window=2)
    torch.testing.assert_close(decode_attention(query, keys, values, positions, scale=np.float32(1.0),
                                                sliding_window=np.int64(2), backend=backend), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 2])
def test_slots_no_query_sees_are_not_read(window):
    """A cache's unwritten slots may hold anything (torch.empty): NaN there reaches no output, in either backend
    (the reference had made every output of such a row NaN)."""
    query = torch.randn(2, 4, 1, 8)
    keys, values = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    positions = torch.tensor([[5], [3]])
    poisoned = [t.clone() for t in (keys, values)]
    for t in poisoned:
        t[0, :, 6:] = float("nan")  # past row 0's position
        t[1, :, 4:] = float("inf")
        if window:
            t[0, :, :4] = float("nan")  # before row 0's window of 2 (slots 4, 5)
    for backend in ("reference", "native"):
        clean = decode_attention(query, keys, values, positions, scale=0.3, sliding_window=window, backend=backend)
        out = decode_attention(query, *poisoned, positions, scale=0.3, sliding_window=window, backend=backend)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out, clean, rtol=0, atol=0)


def test_the_checks_shortcut_passes_nothing_the_checks_reject():
    """The op skips its full argument checks for arguments ``_common_case`` accepts (a call per layer per
    step pays for them): it must accept the usual call and nothing that ``_check_args`` rejects."""
    query, keys, values, positions = operands(2, 4, 2, 1, 5, 8, torch.float32)
    assert op_module._common_case(query, keys, values, positions)
    bad = [dict(p=positions.int()), dict(p=torch.zeros(2, 2, dtype=torch.long)), dict(p=positions[:, 0]),
           dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), dict(k=torch.randn(2, 2, 5, 7), v=torch.randn(2, 2, 5, 7)),
           dict(k=torch.randn(3, 2, 5, 8), v=torch.randn(3, 2, 5, 8)), dict(v=torch.randn(2, 2, 6, 8)),
           dict(v=values.double()), dict(q=query[0]), dict(q=query.int(), k=keys.int(), v=values.int()),
           dict(q=query.clone().requires_grad_()), dict(v=values.clone().requires_grad_()),
           dict(p=positions.to("meta")), dict(q=query.tolist()), dict(scale="x"), dict(scale=float("inf")),
           dict(window=0), dict(window=-2), dict(window=True), dict(window=2.0),
           dict(k=torch.randn(2, 2, 5, 16)[..., ::2]), dict(v=values.transpose(2, 3).contiguous().transpose(2, 3))]
    for change in bad:
        args = [change.get(name, default) for name, default in
                zip(("q", "k", "v", "p", "scale", "window"), (query, keys, values, positions, 1.0, None))]
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            op_module._check_args(*args)
        assert not op_module._common_case(*args), change


def test_native_refuses_a_dtype_it_lacks():
    query, keys, values, positions = operands(1, 2, 1, 1, 4, 4, torch.float64)
    with pytest.raises(TypeError, match="backend 'native' takes"):
        decode_attention(query, keys, values, positions, scale=1.0, backend="native")
    out = decode_attention(query, keys, values, positions, scale=1.0)  # the automatic choice falls back
    assert out.dtype == torch.float64
