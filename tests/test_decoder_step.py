"""qwen2_decoder_step: the native step against the same ops called from Python, bit for bit, on every ISA.

The native step is a fusion: it must give exactly what its reference gives when the
reference calls the same kernels (``StepOps`` of hcr's native ops) — the hidden states and
every layer's cache writes, for every dtype the kernels have, ragged rows (a finished row,
a crop below the written length), several queries per row, grouped-query heads, sliding
windows and row bucket masks that send some projections to ``decode_linear``'s kernel and others
to ``F.linear``. Against the torch-only reference (the default ``ops``) it agrees within
the tolerance rule. ``test_direct_forward.py`` checks that a generation step through it
gives transformers' own logits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcr_kernels._extension import extension_loaded
from hcr_kernels.decode_attention import decode_attention
from hcr_kernels.decode_linear import apply_decode_linear
from hcr_kernels.decoder_step import Qwen2DecoderStack, Qwen2LayerWeights, StepOps, qwen2_decoder_step_ref
from hcr_kernels.decoder_step import native as native_step
from hcr_kernels.kv_cache import ragged_cache_write_
from param_sets import assert_close_by_rule

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="the native extension hcr_kernels._C is not built")

NATIVE_OPS = StepOps(
    linear=apply_decode_linear,
    write=lambda *args: ragged_cache_write_(*args, backend="native"),
    attend=lambda query, keys, values, positions, scale, window: decode_attention(
        query, keys, values, positions, scale=scale, sliding_window=window or None, backend="native"),
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def stack(dtype, *, layers=2, hidden=48, heads=6, kv_heads=2, head_dim=8, intermediate=72, windows=(0, 0),
          native_buckets=(0,) * 7, final_norm=True, seed=0) -> Qwen2DecoderStack:
    """Random weights of a Qwen2 stack (norm weights near 1, projections scaled like an initialised model)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    built = []
    for layer in range(layers):
        built.append(Qwen2LayerWeights(
            1 + randn(hidden, scale=0.1), randn(heads * head_dim, hidden, scale=hidden**-0.5),
            randn(heads * head_dim, scale=0.1), randn(kv_heads * head_dim, hidden, scale=hidden**-0.5),
            randn(kv_heads * head_dim, scale=0.1), randn(kv_heads * head_dim, hidden, scale=hidden**-0.5),
            randn(kv_heads * head_dim, scale=0.1), randn(hidden, heads * head_dim, scale=(heads * head_dim)**-0.5),
            1 + randn(hidden, scale=0.1), randn(intermediate, hidden, scale=hidden**-0.5),
            randn(intermediate, hidden, scale=hidden**-0.5), randn(hidden, intermediate, scale=intermediate**-0.5),
            input_eps=1e-6, post_eps=1e-5, scale=head_dim**-0.5, sliding_window=windows[layer % len(windows)],
            native_buckets=tuple(native_buckets)))
    norm = 1 + randn(hidden, scale=0.1) if final_norm else None
    return Qwen2DecoderStack(built, head_dim=head_dim, final_norm=norm, final_eps=1e-6)


def step_inputs(built: Qwen2DecoderStack, starts, counts, steps, slots, *, seed=1):
    """A step's embeds, rotary cos/sin, caches already holding states, start/count, span and positions."""
    generator = torch.Generator().manual_seed(seed)
    dtype, head_dim, batch = built.dtype, built.head_dim, len(starts)
    hidden, kv_heads = built.layers[0].q.shape[1], built.layers[0].k.shape[0] // head_dim
    start, count = torch.tensor(starts), torch.tensor(counts)
    span = int((start + count).max())
    positions = (start[:, None] + torch.arange(steps)).clamp(max=span - 1)  # the generator's kernel positions
    angles = positions[..., None].float() * torch.rand(head_dim // 2, generator=generator)
    embeds = torch.randn(batch, steps, hidden, generator=generator).to(dtype)
    caches = [[torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
               for _ in built.layers] for _ in range(2)]
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    return embeds, cos, sin, caches, start, count, span, positions


def both(built, inputs, ops=NATIVE_OPS):
    """The native step and the reference with ``ops``, each on its own copy of the caches."""
    embeds, cos, sin, (keys, values), start, count, span, positions = inputs
    theirs = ([k.clone() for k in keys], [v.clone() for v in values])
    ours = built.step(embeds, cos, sin, keys, values, start, count, span, positions, backend="native")
    expected = qwen2_decoder_step_ref(embeds, cos, sin, built.layers, *theirs, start, count, span, positions,
                                      head_dim=built.head_dim, final_norm=built.final_norm, final_eps=built.final_eps,
                                      ops=ops)
    return ours, expected, (keys, values), theirs


ROWS = [  # (starts, counts, steps): decode, re-encode with a crop and a finished row, a prefill-like step
    ([7, 3, 11], [1, 1, 1], 1),
    ([5, 9, 0], [4, 0, 2], 4),
    ([0, 0], [6, 3], 6),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("starts,counts,steps", ROWS, ids=["decode", "re-encode", "prefill"])
# masks: never, always, and per projection one bucket of the rows' counts (3 rows: bucket 2, 12 rows: bucket 4)
# or its neighbours (a count's bucket off by one in C++ sends that projection the other way: not bit for bit)
@pytest.mark.parametrize("native_buckets", [(0,) * 7, (-1,) * 7, (0b10100, 0b01010, 0b00100, 0b10000, 0b01000, 0, -1)],
                         ids=["F.linear", "kernel", "mixed"])
@pytest.mark.parametrize("final_norm", [True, False], ids=["final-norm", "no-final-norm"])
def test_bit_for_bit_the_same_ops_from_python(cpu_isa, dtype, starts, counts, steps, native_buckets, final_norm):
    built = stack(dtype, windows=(0, 3), native_buckets=native_buckets, final_norm=final_norm)
    ours, expected, our_caches, their_caches = both(built, step_inputs(built, starts, counts, steps, slots=16))
    assert ours.shape == expected.shape and ours.dtype == dtype
    assert torch.equal(ours, expected)
    for ours_layers, theirs_layers in zip(our_caches, their_caches):
        for layer, (mine, theirs) in enumerate(zip(ours_layers, theirs_layers)):
            assert torch.equal(mine, theirs), f"cache of layer {layer}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bit_for_bit_property(data):
    """Any ragged step (rows written at any start below the cache's end, any count up to T, any head
    grouping) gives the reference's hidden states and cache writes."""
    kv_heads = data.draw(st.integers(1, 3), "kv_heads")
    group = data.draw(st.integers(1, 3), "group")
    head_dim = data.draw(st.sampled_from([2, 4, 6, 16]), "head_dim")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), "dtype")
    batch = data.draw(st.integers(1, 4), "batch")
    steps = data.draw(st.integers(1, 5), "steps")
    slots = 12
    counts = data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch), "counts")
    if max(counts) == 0:
        counts[0] = 1
    starts = [data.draw(st.integers(0, slots - count), f"start {row}") for row, count in enumerate(counts)]
    windows = (data.draw(st.sampled_from([0, 1, 4]), "window"),)
    masks = data.draw(st.lists(st.integers(-1, 2**6 - 1), min_size=7, max_size=7), "native_buckets")
    built = stack(dtype, layers=2, hidden=24, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim,
                  intermediate=20, windows=windows, native_buckets=tuple(masks))
    ours, expected, our_caches, their_caches = both(built, step_inputs(built, starts, counts, steps, slots))
    assert torch.equal(ours, expected)
    assert all(torch.equal(a, b) for mine, theirs in zip(our_caches, their_caches) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_the_torch_only_reference(dtype):
    """Against plain PyTorch (F.linear, the reference cache write and attention): the cache writes of the
    first layer are the same bits (nothing before them differs), the output is within the rule for the
    longest reduction of the step (the MLP's)."""
    built = stack(dtype, windows=(0, 3))
    ours, expected, our_caches, their_caches = both(built, step_inputs(built, [5, 9, 0], [4, 0, 2], 4, slots=16),
                                                    ops=qwen2_decoder_step_ref.__kwdefaults__["ops"])
    assert torch.equal(our_caches[0][0], their_caches[0][0]) and torch.equal(our_caches[1][0], their_caches[1][0])
    assert_close_by_rule(ours.float(), expected.float(), reduction_length=72, what="hidden states")


def test_reference_backend_is_the_torch_only_reference():
    built = stack(torch.float32)
    embeds, cos, sin, (keys, values), start, count, span, positions = step_inputs(built, [7, 3, 11], [1, 1, 1], 1, 16)
    copies = ([k.clone() for k in keys], [v.clone() for v in values])
    got = built.step(embeds, cos, sin, keys, values, start, count, span, positions, backend="reference")
    expected = qwen2_decoder_step_ref(embeds, cos, sin, built.layers, *copies, start, count, span, positions,
                                      head_dim=built.head_dim, final_norm=built.final_norm)
    assert torch.equal(got, expected)


def test_bad_arguments_name_what_is_wrong():
    built = stack(torch.float32)
    layer = built.layers[0]
    embeds, cos, sin, (keys, values), start, count, span, positions = step_inputs(built, [7, 3, 11], [1, 1, 1], 1, 16)
    with pytest.raises(ValueError, match=r"layers\[0\]\.o must be \[48, 48\]"):
        Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), "o": layer.o[:, :40]})], head_dim=8)
    with pytest.raises(ValueError, match=r"layers\[0\]\.up is torch.float16"):
        Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), "up": layer.up.half()})], head_dim=8)
    with pytest.raises(ValueError, match="native_buckets must be 7 int64 bit masks"):
        Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), "native_buckets": (1, 2)})], head_dim=8)
    with pytest.raises(ValueError, match="native_buckets must be 7 int64 bit masks"):
        Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), "native_buckets": (2**64,) * 7})], head_dim=8)
    with pytest.raises(ValueError, match="head_dim must be an even int"):
        Qwen2DecoderStack([layer], head_dim=7)
    with pytest.raises(ValueError, match=r"final_norm must be \[48\] torch.float32"):
        Qwen2DecoderStack([layer], head_dim=8, final_norm=torch.ones(40))
    with pytest.raises(TypeError, match="non-empty sequence of Qwen2LayerWeights"):
        Qwen2DecoderStack([], head_dim=8)
    with pytest.raises(ValueError, match=r"embeds must be \[B, T, 48\] torch.float32"):
        built.step(embeds.double(), cos, sin, keys, values, start, count, span, positions)
    with pytest.raises(ValueError, match=r"cos must be \[B, T, head_dim\] = \[3, 1, 8\]"):
        built.step(embeds, cos[..., :4], sin, keys, values, start, count, span, positions)
    with pytest.raises(ValueError, match=r"one cache per layer \(2\), got 1 and 2"):
        built.step(embeds, cos, sin, keys[:1], values, start, count, span, positions)
    with pytest.raises(ValueError, match=r"span must be an int in \[0, S\] = \[0, 16\], got 17"):
        built.step(embeds, cos, sin, keys, values, start, count, 17, positions)
    for backend in ("native", "reference"):  # the reference step's write and attention check as the ops do
        with pytest.raises(ValueError, match=r"positions\[0, 0\] = 27 must be a slot of the cache"):
            built.step(embeds, cos, sin, keys, values, start, count, span, positions + 20, backend=backend)
        with pytest.raises(ValueError, match=r"start must be \[3\] \(B = 3, T = 1 from embeds\), got \(1,\)"):
            built.step(embeds, cos, sin, keys, values, start[:1], count, span, positions, backend=backend)
        with pytest.raises(ValueError, match=rf"start\[0\] \+ count\[0\] = {2**63 - 1} \+ 1 = {2**63} exceeds"):
            built.step(embeds, cos, sin, keys, values, start + 2**63 - 8, count, span, positions, backend=backend)
    for field, value in (("scale", float("nan")), ("input_eps", -1e-6), ("post_eps", "1e-6")):
        with pytest.raises(ValueError, match=rf"layers\[0\]\.{field} must be a finite number > 0"):
            Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), field: value})], head_dim=8)
    with pytest.raises(RuntimeError, match="inference only"):
        built.step(embeds.requires_grad_(), cos, sin, keys, values, start, count, span, positions)
    embeds = embeds.detach()
    doubles = Qwen2DecoderStack([Qwen2LayerWeights(**{**vars(layer), **{
        name: getattr(layer, name).double() for name in ("input_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias",
                                                         "o", "post_norm", "gate", "up", "down")}})], head_dim=8)
    with pytest.raises(TypeError, match="backend 'native' takes"):
        doubles.step(embeds.double(), cos.double(), sin.double(), keys[:1], values[:1], start, count, span,
                     positions, backend="native")
    short_norm = list(built._packed)
    short_norm[-2] = torch.ones(40)  # the final norm, 40 of 48 values: refused, not read past its end
    with pytest.raises(RuntimeError, match=r"a norm's weight must be \[48\]"):
        native_step.qwen2_decoder_step(embeds, cos, sin, short_norm, keys, values, start, count, span, positions)
    with pytest.raises(RuntimeError, match="takes float32, bfloat16 or float16"):  # the op itself, called directly
        native_step.qwen2_decoder_step(embeds.double(), cos.double(), sin.double(), doubles._packed,
                                       [k.double() for k in keys[:1]], [v.double() for v in values[:1]], start,
                                       count, span, positions)
