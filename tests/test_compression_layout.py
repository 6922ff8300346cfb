"""The compressed layout: its invariants, and that training and generation build the same one from it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hcr.compression import (
    CompressionTokens,
    ExampleConfig,
    TokenizedTrace,
    build_compression_example,
    compressed_layout,
    compressed_length,
)
from hcr.compression.examples import window_tokens

TOKENS = CompressionTokens(placeholder=7, block_start=8, block_end=9, think_start=5, think_end=6, bos=1, eos=2,
                           user=3, assistant=4)
PAD = 0


def padded(part: np.ndarray, windows: int, window: int) -> np.ndarray:
    """``part`` filled up with PAD to cover ``windows`` windows (unchanged if it covers them already)."""
    return np.concatenate([part, np.full(max(0, windows * window - len(part)), PAD, dtype=np.int64)])


@settings(max_examples=50, deadline=None)
@given(lengths=st.tuples(*[st.integers(0, 12)] * 5), window=st.integers(1, 5), pad=st.booleans(), data=st.data())
def test_layout_properties(lengths, window, pad, data):
    """For any parts (prompt, reasoning, separator, answer, tail) and window counts."""
    ids = np.arange(20, 20 + sum(lengths), dtype=np.int64)  # distinct ordinary tokens: every window identifiable
    reasoning_start, reasoning_end, answer_start, answer_end = np.cumsum(lengths)[:4].tolist()
    prompt, reasoning, separator, answer, tail = np.split(ids, np.cumsum(lengths)[:4])

    def most(part):
        return -(-len(part) // window) if pad else len(part) // window

    k, j = data.draw(st.integers(0, most(reasoning))), data.draw(st.integers(0, most(answer)))
    layout = compressed_layout(ids, reasoning_start=reasoning_start, reasoning_end=reasoning_end,
                               answer_start=answer_start, answer_end=answer_end, reasoning_windows=k,
                               answer_windows=j, window=window, tokens=TOKENS, pad_id=PAD if pad else None)
    # the slots are exactly the placeholders, in the order of the windows
    assert np.array_equal(layout.slots, np.flatnonzero(layout.ids == TOKENS.placeholder))
    assert layout.windows.shape == (k + j, window)
    # each window holds the W tokens of its span, the reasoning's first, then the answer's
    assert np.array_equal(layout.windows[:k].reshape(-1), padded(reasoning, k, window)[: k * window])
    assert np.array_equal(layout.windows[k:].reshape(-1), padded(answer, j, window)[: j * window])
    # markers bracket each non-empty block; no windows, no block
    for block, count in zip(layout.blocks, (k, j)):
        assert block.stop - block.start == (count + 2 if count else 0)
        if count:
            assert layout.ids[block.start] == TOKENS.block_start and layout.ids[block.stop - 1] == TOKENS.block_end
    assert np.isin(layout.ids, TOKENS.markers).sum() == 2 * (k > 0) + 2 * (j > 0)
    # the reasoning block follows the prompt, the answer block the separator
    assert layout.reasoning_block.start == len(prompt)
    assert np.array_equal(layout.ids[layout.answer_block.start - len(separator) : layout.answer_block.start], separator)
    # each slot re-expanded into its window gives the row back (padded), markers aside
    expanded = layout.expand(layout.windows)
    original = np.concatenate([prompt, padded(reasoning, k, window), separator, padded(answer, j, window), tail])
    assert np.array_equal(expanded[~np.isin(expanded, TOKENS.markers)], original)
    if len(original) == len(ids):  # full windows only: a padded one replaces fewer than W tokens
        assert compressed_length(len(ids), window, k, j) == len(layout.ids)


def test_layout_refuses_windows_it_cannot_fill():
    ids = np.arange(20, 30)
    parts = dict(reasoning_start=2, reasoning_end=7, answer_start=8, answer_end=9, window=2, tokens=TOKENS)
    with pytest.raises(ValueError, match="do not fit the 5 reasoning tokens"):
        compressed_layout(ids, reasoning_windows=4, answer_windows=0, pad_id=PAD, **parts)
    with pytest.raises(ValueError, match="needs pad_id"):
        compressed_layout(ids, reasoning_windows=3, answer_windows=0, **parts)
    with pytest.raises(ValueError, match="answer windows must be >= 0"):
        compressed_layout(ids, reasoning_windows=1, answer_windows=-1, **parts)
    with pytest.raises(ValueError, match="must follow each other"):
        compressed_layout(ids, reasoning_windows=0, answer_windows=0, **{**parts, "answer_start": 6})
    nothing = compressed_layout(ids, reasoning_windows=0, answer_windows=0, **parts)
    assert np.array_equal(nothing.ids, ids) and nothing.slots.dtype == np.int64 and len(nothing.slots) == 0


# ----------------------------------------------------------------- training and generation agree

WINDOWS = (1, 2, 3)


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """A CompressedGenerator per window (its model is never run: only its layouts are compared)."""
    pytest.importorskip("transformers")
    import transformers

    from hcr.compression.tiny_tokenizer import tiny_tokenizer
    from hcr.compression.train import PoolerSettings, build_compression_model
    from hcr.generation import CompressedGenerator

    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64))
    return {window: CompressedGenerator(build_compression_model(base, tokenizer, window,
                                                                pooler=PoolerSettings(num_hidden_layers=1), lora=None),
                                        tokenizer)
            for window in WINDOWS}


@settings(max_examples=50, deadline=None)
@given(prompt=st.integers(1, 5), reasoning=st.integers(1, 12), answer=st.integers(0, 7),
       window=st.sampled_from(WINDOWS), think_written=st.booleans(), data=st.data())
def test_generator_layout_is_the_training_stage(generators, prompt, reasoning, answer, window, think_written, data):
    """A generator row that compressed k reasoning and j answer windows reads stage k + j of the same trace."""
    from hcr.generation.generator import RowState

    generator = generators[window]
    tokens = generator.tokens
    full = reasoning // window
    answer_windows = data.draw(st.integers(0, answer // window)) if think_written else 0
    reasoning_windows = full if answer_windows else data.draw(st.integers(min(1, full), full))
    stage = reasoning_windows + answer_windows
    ids = list(range(30, 30 + prompt + reasoning + answer))  # ordinary tokens of the tiny tokenizer
    prompt_ids, reasoning_ids, answer_ids = ids[:prompt], ids[prompt : prompt + reasoning], ids[prompt + reasoning :]
    trace_ids = np.array(prompt_ids + reasoning_ids + [tokens.think_end] + answer_ids + [tokens.eos], dtype=np.int64)
    end = prompt + reasoning
    trace = TokenizedTrace(trace_ids, np.zeros(len(trace_ids), np.int8), prompt, end, end + 1, end + 1 + answer)
    # mid-reasoning, the generator has written the reasoning only; after </think>, everything up to EOS
    generated = trace_ids[prompt:].tolist() if think_written else reasoning_ids
    row = RowState(prompt=prompt_ids, generated=generated, reasoning_windows=reasoning_windows, answer_windows=answer_windows,
                   think_at=reasoning if think_written else None)
    layout = generator._layout(row)
    assert generator._layout_length(row) == len(layout.ids)
    if stage == 0:  # no stage of training: the row is its tokens
        assert layout.ids.tolist() == prompt_ids + generated and len(layout.slots) == 0
        return
    example = build_compression_example(trace, stage, tokens, ExampleConfig(window=window,
                                                                            compress_answer=answer_windows > 0))
    trained = example["compressed_input_ids"]
    assert np.array_equal(layout.ids, trained[: len(layout.ids)])
    if not think_written:
        assert trained[len(layout.ids)] == tokens.think_end  # what training has next: the end of the reasoning
    assert np.array_equal(layout.slots, np.flatnonzero(trained == tokens.placeholder))
    assert np.array_equal(layout.windows, window_tokens(example["replaced_original_tokens"],
                                                        example["original_tokens"], tokens.placeholder, window))
