"""Every native CPU kernel gives the same bits whatever torch's thread count and wherever its inputs start.

CI's machines have 2 cores; users' have 1 to 100 or more. The kernels split their work into tasks
(at::parallel_for over output features, tokens, rows, (row, head) pairs, channel chunks) whose
boundaries move with the thread count, so 2 threads test one split only. A task's arithmetic must
not depend on where they fall (no sum split across tasks, no vector store past a task's end, no
scratch shared between threads): each result here, gradients included, is compared bit for bit
with the one-thread run at thread counts that cut the work unevenly. On CI's 2 cores 3, 5 and 8
threads are oversubscribed, which only costs time. Each shape is sized above the kernel's grain
(its rows, tokens or tasks per thread), so that every count really splits it.

The same holds with every input one element past the start of its allocation (2 or 4 bytes off
every vector's alignment, as a tensor sliced out of a larger buffer is): the kernels load through
memcpy and unaligned instructions, and this keeps an aligned load from slipping in on any ISA.
"""

from __future__ import annotations

import pytest
import torch

from hcr_kernels import (
    causal_conv1d,
    decode_attention,
    decode_linear,
    fused_linear_cross_entropy,
    pool_scatter,
    ragged_cache_write_,
    selective_scan,
    weighted_cross_entropy,
)
from hcr_kernels._extension import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="the native extension hcr_kernels._C is not built")

THREADS = (2, 3, 5, 8)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def as_is(tensor):
    return tensor


def one_element_on(tensor):
    """``tensor``'s values (contiguous) one element past the start of a buffer of their dtype."""
    buffer = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    buffer[1:].copy_(tensor.flatten())
    placed = buffer[1:].view(tensor.shape)
    assert placed.data_ptr() % 64 == tensor.element_size()  # torch's CPU allocations start on 64 bytes
    return placed


def with_grads(forward, *leaves):
    """A call returning ``forward``'s output and the gradients of ``leaves`` for a fixed upstream gradient."""
    leaves = [leaf.detach().requires_grad_() for leaf in leaves]  # detach keeps a leaf where it lies
    upstream = []

    def run():
        for leaf in leaves:
            leaf.grad = None
        out = forward(*leaves)
        if not upstream:
            upstream.append(torch.randn(out.shape).to(out.dtype))
        out.backward(upstream[0])
        return (out.detach(), *(leaf.grad for leaf in leaves))

    return run


# Each case: (place, *arguments) -> a call returning its results; place puts every tensor input where it lies
# in memory (as_is, or one_element_on).


def decode_linear_case(place, dtype, rows, out_features, in_features):
    # about 32K weights a task: 1,531 x 72 is 4 tasks, 777 x 200 5, 4,099 x 16 3 (with their remainders)
    x, weight = place(randn(rows, in_features, dtype=dtype)), place(randn(out_features, in_features, dtype=dtype))
    return lambda: (decode_linear(x, weight, backend="native"),)


def decode_attention_case(place, dtype, batch, heads, kv_heads, steps, slots, head_dim, window):
    # one task per (row, key/value head)
    query, keys, values = (place(randn(batch, h, n, head_dim, dtype=dtype))
                           for h, n in ((heads, steps), (kv_heads, slots), (kv_heads, slots)))
    positions = place(torch.randint(steps, slots, (batch, 1)) - torch.arange(steps - 1, -1, -1))
    return lambda: (decode_attention(query, keys, values, positions, scale=head_dim**-0.5,
                                     sliding_window=window, backend="native"),)


def weighted_cross_entropy_case(place, dtype, tokens, vocab):
    # about 32K logits a task: 37 x 3,001 is 4 tasks, 600 x 517 10
    labels, weights = torch.randint(0, vocab, (tokens,)), torch.rand(tokens)
    labels[::7] = -100
    labels, weights = place(labels), place(weights)
    return with_grads(lambda logits: weighted_cross_entropy(logits, labels, weights, backend="native"),
                      place(randn(tokens, vocab, dtype=dtype)))


def fused_linear_cross_entropy_case(place, tokens, hidden_size, vocab):
    labels, weights = place(torch.randint(0, vocab, (tokens,))), place(torch.rand(tokens))
    return with_grads(lambda hidden, head: fused_linear_cross_entropy(hidden, head, labels, weights, backend="native"),
                      place(randn(tokens, hidden_size)), place(randn(vocab, hidden_size) * 0.1))


def pool_scatter_case(place, dtype, batch, length, dim, window):
    # about 32K values a task: 80 windows of 10 x 64 are 4 tasks
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 1::3] = True
    mask, hidden = place(mask), place(randn(int(mask.sum()), window, dim, dtype=dtype))
    return with_grads(lambda template, hidden: pool_scatter(template, mask, hidden, backend="native"),
                      place(randn(batch, length, dim, dtype=dtype)), hidden)


def causal_conv1d_case(place, batch, channels, length, width):
    # one task per row of the batch; the weight's and bias's gradients are per-row partials summed after
    return with_grads(lambda x, weight, bias: causal_conv1d(x, weight, bias, activation="silu", backend="native"),
                      place(randn(batch, channels, length)), place(randn(channels, width)), place(randn(channels)))


def selective_scan_case(place, batch, channels, length, state):
    # one task per (row, 32 channels): 3 x 3 here
    inputs = dict(u=randn(batch, channels, length), delta=randn(batch, channels, length) * 0.5,
                  A=-torch.rand(channels, state) - 0.5, B=randn(batch, state, length), C=randn(batch, state, length),
                  D=randn(channels), z=randn(batch, channels, length))
    names = list(inputs)
    return with_grads(lambda *leaves: selective_scan(**dict(zip(names, leaves)), delta_softplus=True, backend="native"),
                      *map(place, inputs.values()))


def ragged_cache_write_case(place, batch, heads, slots, head_dim, steps):
    # about 64 KiB a task: 5 rows x 2 heads x keys and values of 40 x 128 fp32 states (20 KiB each), 7 tasks
    states = [place(randn(batch, heads, steps, head_dim)) for _ in "kv"]
    start, count = torch.randint(0, slots - steps, (batch,)), torch.randint(0, steps + 1, (batch,))
    start, count = place(start), place(count)

    def run():
        caches = [place(torch.zeros(batch, heads, slots, head_dim)) for _ in "kv"]
        ragged_cache_write_(*caches, *states, start, count, backend="native")
        return tuple(caches)

    return run


CASES = {
    **{f"decode_linear-{str(dtype)[6:]}-{m}x{n}x{k}": (decode_linear_case, dtype, m, n, k)
       for dtype in (torch.float32, torch.bfloat16, torch.float16)
       for m, n, k in ((1, 1531, 72), (8, 777, 200), (3, 4099, 16))},
    **{f"decode_attention-{str(dtype)[6:]}-{shape}": (decode_attention_case, dtype, *shape)
       for dtype in (torch.float32, torch.bfloat16, torch.float16)
       for shape in ((5, 12, 2, 1, 300, 128, None), (3, 4, 1, 3, 131, 72, 50))},
    **{f"weighted_cross_entropy-{str(dtype)[6:]}-{t}x{v}": (weighted_cross_entropy_case, dtype, t, v)
       for dtype in (torch.float32, torch.bfloat16) for t, v in ((37, 3001), (600, 517))},
    "fused_linear_cross_entropy": (fused_linear_cross_entropy_case, 300, 64, 1000),
    **{f"pool_scatter-{str(dtype)[6:]}": (pool_scatter_case, dtype, 4, 60, 64, 10)
       for dtype in (torch.float32, torch.bfloat16)},
    "causal_conv1d": (causal_conv1d_case, 7, 33, 50, 4),
    "selective_scan": (selective_scan_case, 3, 70, 40, 16),
    "ragged_cache_write": (ragged_cache_write_case, 5, 2, 64, 128, 40),
}


def at_threads(threads, run):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(previous)


def assert_same_bits(results, expected, what):
    for index, (result, reference) in enumerate(zip(results, expected, strict=True)):
        assert torch.equal(result, reference), (
            f"{what}: result {index} differs by up to {(result.double() - reference.double()).abs().max().item():.3g}")


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_bits_at_every_thread_count(case):
    build, *arguments = CASES[case]
    run = build(as_is, *arguments)
    expected = at_threads(1, run)
    for threads in THREADS:
        assert_same_bits(at_threads(threads, run), expected, f"{case} on {threads} threads against one")


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_bits_wherever_the_inputs_start(case):
    build, *arguments = CASES[case]
    results = []
    for place in (as_is, one_element_on):
        torch.manual_seed(0)  # the same values either way
        results.append(build(place, *arguments)())
    assert_same_bits(results[1], results[0], f"{case} with every input one element off")
