"""Building compression training examples: output tokens per second on one core.

Traces of ~2k tokens at W = 2 (about 1,000 stages each). ``native`` here is the
lazy numpy builder (``CompressionExampleDataset``); ``reference`` is the eager
pure-Python way (list slicing and concatenation per stage, as a script would do
it). Output tokens are those of the three aligned sequences of every example.
Target: >= 20 M tokens/s on one core.
"""

from __future__ import annotations

import numpy as np
import pytest

from hcr.compression import CompressionExampleDataset, CompressionTokens, ExampleConfig, TokenizedTrace

TOKENS = CompressionTokens(placeholder=7, block_start=8, block_end=9, think_start=5, think_end=6, bos=1, eos=2,
                           user=3, assistant=4)
WINDOW, TRACES, EXAMPLES = 2, 4, 600


def traces():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(TRACES):
        prefix, reasoning, answer = 60, int(rng.integers(1800, 2200)), 150
        ids = rng.integers(20, 5000, prefix + reasoning + 2 + answer).astype(np.int64)
        ids[prefix + reasoning] = TOKENS.think_end
        ids[-1] = TOKENS.eos
        out.append(TokenizedTrace(ids, np.zeros(len(ids), np.int8), prefix, prefix + reasoning,
                                  prefix + reasoning + 1, prefix + reasoning + 1 + answer))
    return out


def python_stage(ids: list, start: int, end: int, k: int) -> tuple[list, list, list]:
    """The eager pure-Python construction of one stage."""
    covered = k * WINDOW
    prefix, reasoning, rest = ids[:start], ids[start:end], ids[end:]
    compressed = prefix + [TOKENS.block_start] + [TOKENS.placeholder] * k + [TOKENS.block_end] + reasoning[covered:] + rest
    replaced = prefix + [TOKENS.block_start] + [TOKENS.placeholder] * covered + [TOKENS.block_end] + reasoning[covered:] + rest
    original = prefix + [TOKENS.block_start] + reasoning[:covered] + [TOKENS.block_end] + reasoning[covered:] + rest
    return compressed, replaced, original


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_example_building_throughput(benchmark, backend, one_thread):
    data = traces()
    benchmark.group = f"compression example building, W={WINDOW}, ~2k-token traces, {EXAMPLES} examples, 1 core"
    if backend == "native":
        dataset = CompressionExampleDataset(data, TOKENS, ExampleConfig(window=WINDOW))
        step = max(1, len(dataset) // EXAMPLES)
        indices = list(range(0, len(dataset), step))[:EXAMPLES]

        def build():
            produced = 0
            for i in indices:
                example = dataset[i]
                produced += sum(len(example[k]) for k in ("compressed_input_ids", "replaced_original_tokens", "original_tokens"))
            return produced
    else:
        lists = [(t.ids.tolist(), t.reasoning_start, t.reasoning_end) for t in data]
        stages = [(trace, k) for trace in lists for k in range(1, (trace[2] - trace[1]) // WINDOW + 1)]
        step = max(1, len(stages) // EXAMPLES)
        chosen = stages[::step][:EXAMPLES]

        def build():
            produced = 0
            for (ids, start, end), k in chosen:
                produced += sum(map(len, python_stage(ids, start, end, k)))
            return produced

    produced = build()
    benchmark.extra_info.update(backend=backend, count=produced, unit="tokens")
    benchmark.pedantic(build, rounds=5, warmup_rounds=1)
