"""ragged_cache_write_: every backend bit-exact against the definition, row by row.

The cache write is a copy, so every comparison is ``torch.equal``: each backend
(the reference included) against the op's definition applied one row at a time,
for every dtype, odd shapes, the layouts the attention layer produces, rows that
write nothing, crops, writes that end at the last slot; every slot and row the op
must not touch keeps its old (random) value, and padded states past ``count`` are
NaN so a kernel that reads them is caught. Bad input raises an error naming the
argument and writes nothing.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hcr_kernels
from hcr_kernels import ragged_cache_write_, ragged_cache_write_ref
from hcr_kernels.kv_cache import check_write_bounds
from param_sets import DTYPES

BACKENDS = [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("native", "cpu", id="native-cpu"),
    pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu),
    pytest.param("native", "cuda", id="native-cuda", marks=pytest.mark.gpu),
]

# (B, H, S, Dh, T): batch 1 and 8, odd head counts and head dims, short and long caches.
SHAPES = [
    pytest.param(1, 1, 33, 60, 1, id="B1-H1-S33-Dh60-T1"),
    pytest.param(1, 3, 4096, 64, 17, id="B1-H3-S4096-Dh64-T17"),
    pytest.param(8, 2, 4096, 64, 16, id="B8-H2-S4096-Dh64-T16"),
    pytest.param(8, 3, 100, 60, 5, id="B8-H3-S100-Dh60-T5"),
    pytest.param(8, 1, 33, 64, 1, id="B8-H1-S33-Dh64-T1"),
    pytest.param(8, 2, 17, 60, 17, id="B8-H2-S17-Dh60-T17-full"),
]

# contiguous; "attention": [B, T, H, Dh] buffers seen as [B, H, T, Dh] (what q/k/v projections
# give); "strided": slices of wider buffers, misaligned by one element.
LAYOUTS = ["contiguous", "attention", "strided"]


def random_tensor(batch, heads, length, head_dim, dtype, device, layout, generator):
    if layout == "attention":
        return torch.randn(batch, length, heads, head_dim, generator=generator).to(dtype).to(device).transpose(1, 2)
    if layout == "strided":
        wide = torch.randn(batch, heads, length + 3, head_dim + 1, generator=generator).to(dtype).to(device)
        return wide[:, :, 2 : 2 + length, 1:]
    return torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype).to(device)


def random_rows(batch, slots, steps, generator, device):
    """Random per-row writes; with B > 1, row 0 writes nothing and the last row ends at slot S - 1."""
    most = min(steps, slots)
    count = torch.randint(0, most + 1, (batch,), generator=generator)
    start = (torch.rand(batch, generator=generator) * (slots - count + 1)).long()
    if batch > 1:
        count[0], count[-1] = 0, most
        start[-1] = slots - most
    return start.to(device), count.to(device)


def nan_padding(states, count):
    """States past each row's count are padding: NaN, so reading them shows up in the cache."""
    padding = torch.arange(states.shape[2], device=states.device) >= count[:, None]
    states.masked_fill_(padding[:, None, :, None], float("nan"))
    return states


def make_case(batch, heads, slots, head_dim, steps, dtype, device="cpu", layout="contiguous", rows=None, seed=0):
    """Random caches and states; ``rows`` = (start, count) lists, or random rows when None."""
    generator = torch.Generator().manual_seed(seed)
    caches = [random_tensor(batch, heads, slots, head_dim, dtype, device, layout, generator) for _ in range(2)]
    states = [random_tensor(batch, heads, steps, head_dim, dtype, device, layout, generator) for _ in range(2)]
    if rows is None:
        start, count = random_rows(batch, slots, steps, generator, device)
    else:
        start, count = (torch.tensor(values, dtype=torch.int64, device=device) for values in rows)
    return caches, [nan_padding(s, count) for s in states], start, count


def written_by_definition(cache, states, start, count):
    """The op's definition, one row at a time: the oracle of every backend."""
    out = cache.clone()
    for b, (first, n) in enumerate(zip(start.tolist(), count.tolist())):
        out[b, :, first : first + n] = states[b, :, :n]
    return out


def target_slots(slots, start, count):
    """``[B, S]``: True at the slots the op writes."""
    positions = torch.arange(slots, device=start.device)
    return (positions >= start[:, None]) & (positions < (start + count)[:, None])


def write(backend, caches, states, start, count, **kwargs):
    """Run the op on clones of the caches (same strides) and return them."""
    out = [torch.empty_strided(c.shape, c.stride(), dtype=c.dtype, device=c.device).copy_(c) for c in caches]
    result = ragged_cache_write_(*out, *states, start, count, backend=backend, **kwargs)
    assert result is None
    return out


def assert_written_exactly(before, after, states, start, count):
    for old, new, new_states in zip(before, after, states):
        assert torch.equal(new, written_by_definition(old, new_states, start, count))
        untouched = ~target_slots(old.shape[2], start, count)
        assert torch.equal(new.transpose(1, 2)[untouched], old.transpose(1, 2)[untouched]), "untouched slots changed"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,slots,head_dim,steps", SHAPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_definition(backend, device, batch, heads, slots, head_dim, steps, dtype, layout):
    caches, states, start, count = make_case(batch, heads, slots, head_dim, steps, dtype, device, layout)
    after = write(backend, caches, states, start, count)
    assert_written_exactly(caches, after, states, start, count)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_generation_with_crops(backend, device):
    """A generator's sequence of writes: prefill, decode, a crop + re-encode, decode, rows finishing.

    Bounds are checked once per step and each layer's write skips the check, as in a generator.
    """
    batch, heads, slots, head_dim = 4, 2, 40, 60
    generator = torch.Generator().manual_seed(1)
    caches = [random_tensor(batch, heads, slots, head_dim, torch.float32, device, "contiguous", generator)
              for _ in "kv"]
    expected = [c.clone() for c in caches]
    steps = [  # (start, count) per row
        ([0, 0, 0, 0], [7, 12, 3, 9]),  # prefill of prompts of different lengths (T = 12)
        ([7, 12, 3, 9], [1, 1, 1, 1]),  # decode
        ([2, 12, 3, 5], [6, 1, 0, 3]),  # row 0 and 3 crop back and re-encode; row 2 has finished
        ([8, 13, 3, 8], [1, 1, 0, 1]),  # decode after the crop: the slots past 8 in row 3 stay stale
        ([9, 14, 3, 39], [1, 1, 0, 1]),  # a write at the very last slot
    ]
    for first, number in steps:
        start = torch.tensor(first, device=device)
        count = torch.tensor(number, device=device)
        states = [nan_padding(random_tensor(batch, heads, max(number), head_dim, torch.float32, device, "attention",
                                            generator), count) for _ in "kv"]
        check_write_bounds(start, count, steps=max(number), slots=slots)  # once per step, as a generator does
        ragged_cache_write_(*caches, *states, start, count, backend=backend, check_bounds=False)
        expected = [written_by_definition(e, s, start, count) for e, s in zip(expected, states)]
        assert all(torch.equal(c, e) for c, e in zip(caches, expected))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rows_with_count_zero_write_nothing(backend, device):
    caches, states, start, count = make_case(3, 2, 20, 8, 4, torch.float32, device, rows=([0, 5, 16], [0, 0, 0]))
    after = write(backend, caches, states, start, count)
    assert all(torch.equal(a, c) for a, c in zip(after, caches))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_states_strided_along_head_dim(backend, device):
    """States with a non-unit stride along Dh are accepted (the native path copies them first)."""
    caches, _, start, count = make_case(2, 2, 12, 6, 3, torch.float32, device)
    states = [torch.randn(2, 2, 6, 3, device=device).transpose(2, 3) for _ in "kv"]
    assert states[0].stride(-1) != 1
    after = write(backend, caches, states, start, count)
    assert_written_exactly(caches, after, states, start, count)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_and_empty_head_dim(backend, device):
    for batch, head_dim in ((0, 4), (2, 0)):
        caches, states, start, count = make_case(batch, 2, 5, head_dim, 3, torch.float32, device)
        after = write(backend, caches, states, start, count)
        assert all(torch.equal(a, c) for a, c in zip(after, caches))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    heads=st.integers(1, 3),
    slots=st.integers(1, 40),
    head_dim=st.integers(1, 9),
    steps=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    layout=st.sampled_from(LAYOUTS),
    data=st.data(),
)
def test_property_random_rows(batch, heads, slots, head_dim, steps, dtype, layout, data):
    """Any valid starts and counts: native and reference both write exactly the definition."""
    counts = data.draw(st.lists(st.integers(0, min(steps, slots)), min_size=batch, max_size=batch))
    starts = [data.draw(st.integers(0, slots - n)) for n in counts]
    caches, states, start, count = make_case(batch, heads, slots, head_dim, steps, dtype, layout=layout,
                                             rows=(starts, counts))
    for backend in ("native", "reference"):
        assert_written_exactly(caches, write(backend, caches, states, start, count), states, start, count)


def test_automatic_backend_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv(hcr_kernels.BACKEND_ENV_VAR, raising=False)
    from hcr_kernels import _dispatch
    from hcr_kernels.kv_cache import BACKEND_CHECKS

    assert _dispatch.choose_backend("ragged_cache_write_", torch.device("cpu"), None, BACKEND_CHECKS) == "native"


# ---------------------------------------------------------------- the registered op


def test_op_is_registered_with_its_mutations():
    schema = torch.ops.hcr.ragged_cache_write_.default._schema
    mutated = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    assert mutated == ["key_cache", "value_cache"]
    assert [arg.name for arg in schema.arguments][2:] == ["key_states", "value_states", "start", "count"]
    assert len(schema.returns) == 0


def test_op_passes_torch_library_schema_check():
    """torch's own check that the op mutates exactly what its schema declares."""
    caches, states, start, count = make_case(3, 2, 10, 4, 3, torch.float32)
    torch.library.opcheck(
        torch.ops.hcr.ragged_cache_write_.default, (*caches, *states, start, count), test_utils=("test_schema",)
    )


def test_cpu_kernel_checks_bounds_itself():
    """On the CPU even a direct torch.ops call (or check_bounds=False) cannot write out of range."""
    caches, states, start, count = make_case(2, 2, 8, 4, 3, torch.float32, rows=([0, 7], [3, 2]))
    message = re.escape("start[1] + count[1] = 7 + 2 = 9 exceeds the cache length S = 8")
    with pytest.raises(ValueError, match=message):
        torch.ops.hcr.ragged_cache_write_(*caches, *states, start, count)
    with pytest.raises(ValueError, match=message):
        ragged_cache_write_(*caches, *states, start, count, check_bounds=False, backend="native")
    with pytest.raises(RuntimeError, match="start must be a contiguous int64"):
        torch.ops.hcr.ragged_cache_write_(*caches, *states, start.int(), count)
    with pytest.raises(RuntimeError, match="key_states must be contiguous along Dh"):
        torch.ops.hcr.ragged_cache_write_(*caches, states[0].transpose(2, 3).contiguous().transpose(2, 3), states[1],
                                          start, torch.tensor([3, 1]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("batch", [3, 80], ids=["few-rows-as-ints", "many-rows-vectorised"])
@pytest.mark.parametrize("row,first,number,message", [
    (1, -1, 1, "start[1] = -1 must be >= 0"),
    (2, 5, 4, "count[2] = 4 must be in [0, T] = [0, 3]"),
    (2, 7, 2, "start[2] + count[2] = 7 + 2 = 9 exceeds the cache length S = 8"),
    (2, 2**63 - 1, 1, f"start[2] + count[2] = {2**63 - 1} + 1 = {2**63} exceeds"),  # start + count wraps in int64
])
def test_write_bounds_name_the_first_bad_row(batch, row, first, number, message):
    """The host check names the first bad row with the same message, whether it checks Python ints (a few
    CPU rows, the generator's per-step call) or tensors (many rows, CUDA)."""
    start, count = torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)
    check_write_bounds(start, count, steps=3, slots=8)  # valid: passes
    start[row], count[row] = first, number
    if batch > row + 1:
        start[-1] = -5  # a later bad row is not the one named
    with pytest.raises(ValueError, match=re.escape(message)):
        check_write_bounds(start, count, steps=3, slots=8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bounds_are_checked_on_cuda(backend):
    """On CUDA the bounds are checked in Python (one sync) with the CPU kernel's messages."""
    caches, states, start, count = make_case(2, 2, 8, 4, 3, torch.float32, "cuda", rows=([0, 7], [3, 2]))
    before = [c.clone() for c in caches]
    with pytest.raises(ValueError, match=re.escape("start[1] + count[1] = 7 + 2 = 9 exceeds the cache length S = 8")):
        ragged_cache_write_(*caches, *states, start, count, backend=backend)
    assert all(torch.equal(b, c) for b, c in zip(before, caches))


def valid_inputs():
    """B=2, H=2, S=8, Dh=4, T=3; row 0 writes slots 0-2, row 1 slots 5-6."""
    caches = [torch.randn(2, 2, 8, 4) for _ in "kv"]
    states = [torch.randn(2, 2, 3, 4) for _ in "kv"]
    return [*caches, *states, torch.tensor([0, 5]), torch.tensor([3, 2])]


def replaced(**changes):
    names = ("key_cache", "value_cache", "key_states", "value_states", "start", "count")

    def corrupt(args):
        named = dict(zip(names, args))
        return [changes[name](named[name]) if name in changes else named[name] for name in names]

    return corrupt


BAD_INPUTS = [
    pytest.param(replaced(start=lambda s: torch.tensor([0, 7])), ValueError,
                 "start[1] + count[1] = 7 + 2 = 9 exceeds the cache length S = 8", id="past-the-cache"),
    pytest.param(replaced(start=lambda s: torch.tensor([0, 2**63 - 1])), ValueError,
                 f"start[1] + count[1] = {2**63 - 1} + 2 = {2**63 + 1} exceeds the cache length S = 8",
                 id="past-the-cache-by-wrapping"),  # the native check had summed in int64, and written far outside
    pytest.param(replaced(start=lambda s: torch.tensor([-1, 5])), ValueError, "start[0] = -1 must be >= 0",
                 id="negative-start"),
    pytest.param(replaced(count=lambda c: torch.tensor([3, 4])), ValueError, "count[1] = 4 must be in [0, T] = [0, 3]",
                 id="count-over-T"),
    pytest.param(replaced(count=lambda c: torch.tensor([-1, 2])), ValueError, "count[0] = -1 must be in [0, T]",
                 id="negative-count"),
    pytest.param(replaced(start=lambda s: s.int()), TypeError, "start must have dtype torch.int64", id="start-int32"),
    pytest.param(replaced(count=lambda c: c.float()), TypeError, "count must have dtype torch.int64", id="count-float"),
    pytest.param(replaced(start=lambda s: torch.tensor([0, 5, 1])), ValueError, "start must be [B] = [2]",
                 id="start-length"),
    pytest.param(replaced(count=lambda c: c[None]), ValueError, "count must be a 1-D", id="count-2d"),
    pytest.param(replaced(value_cache=lambda v: v[:, :, :7]), ValueError,
                 "value_cache is (2, 2, 7, 4) but key_cache is (2, 2, 8, 4)", id="value-cache-shape"),
    pytest.param(replaced(value_states=lambda v: v[:, :, :2]), ValueError,
                 "value_states is (2, 2, 2, 4) but key_states is (2, 2, 3, 4)", id="value-states-shape"),
    pytest.param(replaced(key_states=lambda k: k[:, :1], value_states=lambda v: v[:, :1]), ValueError,
                 "key_states must be [B, H, T, Dh] = [2, 2, T, 4]", id="states-heads"),
    pytest.param(replaced(key_cache=lambda k: k[0]), ValueError, "key_cache must be a 4-D", id="cache-3d"),
    pytest.param(replaced(key_cache=lambda k: k.long()), TypeError, "key_cache must be a floating-point",
                 id="cache-int"),
    pytest.param(replaced(key_states=lambda k: k.double(), value_states=lambda v: v.double()), TypeError,
                 "one dtype", id="states-dtype"),
    pytest.param(replaced(value_cache=lambda v: v.half()), TypeError, "value_cache is torch.float16",
                 id="value-cache-dtype"),
    pytest.param(replaced(key_states=lambda k: k.to("meta")), ValueError, "key_states on meta", id="states-device"),
    pytest.param(replaced(start=lambda s: s.to("meta")), ValueError, "start on meta", id="start-device"),
    pytest.param(replaced(key_cache=lambda k: k.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
                 "key_cache must be contiguous along Dh", id="cache-strided-Dh"),
    pytest.param(replaced(value_cache=lambda v: v.numpy()), TypeError, "value_cache must be a torch.Tensor",
                 id="not-a-tensor"),
]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("corrupt,error,message", BAD_INPUTS)
def test_bad_input_is_rejected_before_any_write(backend, corrupt, error, message):
    args = corrupt(valid_inputs())
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args[:2]]
    with pytest.raises(error, match=re.escape(message)):
        ragged_cache_write_(*args, backend=backend)
    for old, new in zip(before, args[:2]):
        if isinstance(old, torch.Tensor):
            assert torch.equal(old, new), "a rejected call must not write"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend= must be one of"):
        ragged_cache_write_(*valid_inputs(), backend="bogus")
    with pytest.raises(ValueError, match="backend 'triton' is not implemented"):
        ragged_cache_write_(*valid_inputs(), backend="triton")


def test_reference_is_exported():
    args = valid_inputs()
    expected = [written_by_definition(c, s, args[4], args[5]) for c, s in zip(args[:2], args[2:4])]
    ragged_cache_write_ref(*args)
    assert all(torch.equal(c, e) for c, e in zip(args[:2], expected))
