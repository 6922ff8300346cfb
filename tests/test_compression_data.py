"""Compression data: special tokens, trace tokenization, the stage builder, the lazy dataset, the collator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcr.compression import (
    IGNORE_INDEX,
    CompressionCollator,
    CompressionExampleDataset,
    CompressionTokens,
    Content,
    ExampleConfig,
    MissingThinkEndError,
    MissingTokenError,
    TokenizedTrace,
    add_compression_tokens,
    arithmetic_trace,
    build_compression_example,
    build_compression_examples,
    stage_count,
    tokenize_dataset,
    tokenize_trace,
)

TOKENS = CompressionTokens(placeholder=7, block_start=8, block_end=9, think_start=5, think_end=6, bos=1, eos=2,
                           user=3, assistant=4)
SPECIAL = {7, 8, 9}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hcr.compression import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def synthetic_trace(prefix: int, reasoning: int, answer: int, seed: int = 0) -> TokenizedTrace:
    """A trace with ordinary token ids (>= 20) in every part."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(20, 500, n) for n in (prefix, reasoning)] + [[TOKENS.think_end], rng.integers(20, 500, answer), [TOKENS.eos]]
    kinds = [Content.QUESTION, Content.REASONING, Content.TEMPLATE, Content.ANSWER, Content.TEMPLATE]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    kind = np.concatenate([np.full(len(p), k, dtype=np.int8) for p, k in zip(parts, kinds)])
    return TokenizedTrace(ids, kind, prefix, prefix + reasoning, prefix + reasoning + 1, prefix + reasoning + 1 + answer)


def reconstruct(example: dict, window: int) -> np.ndarray:
    """Replace each placeholder run of the compressed view by its window of real tokens."""
    replaced, original = example["replaced_original_tokens"], example["original_tokens"]
    windows = iter(original[replaced == TOKENS.placeholder].reshape(-1, window))
    out = []
    for token in example["compressed_input_ids"]:
        out.extend(next(windows) if token == TOKENS.placeholder else [token])
    return np.asarray(out)


# ----------------------------------------------------------------- tokens


def test_tokens_resolved_by_name(tokenizer):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    assert tokenizer.convert_ids_to_tokens(tokens.placeholder) == "<|fim_pad|>"
    assert tokenizer.convert_ids_to_tokens(list(tokens.markers)) == ["<|vision_start|>", "<|vision_end|>"]
    assert tokenizer.convert_ids_to_tokens(tokens.think_end) == "</think>"


def test_missing_token_is_named_and_can_be_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(MissingTokenError, match="<\\|fim_pad\\|>"):
        CompressionTokens.from_tokenizer(plain)
    assert add_compression_tokens(plain) == 9
    assert add_compression_tokens(plain) == 0
    tokens = CompressionTokens.from_tokenizer(plain)
    assert len({tokens.placeholder, tokens.block_start, tokens.block_end, tokens.eos}) == 4


# ----------------------------------------------------------------- traces


def test_trace_parts_agree_by_construction(tokenizer):
    question, answer = arithmetic_trace(random.Random(5))
    trace = tokenize_trace(tokenizer, question, answer)
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    reasoning = trace.ids[trace.reasoning_start : trace.reasoning_end]
    assert (trace.kinds[trace.reasoning_start : trace.reasoning_end] == Content.REASONING).all()
    assert trace.ids[trace.reasoning_end] == tokens.think_end and trace.ids[-1] == tokens.eos
    assert trace.ids[0] == tokens.bos and trace.ids[trace.reasoning_start - 3] == tokens.assistant
    assert tokenizer.decode(reasoning).startswith("Okay, so I need to add")
    assert tokenizer.decode(trace.ids[trace.answer_start : trace.answer_end]).strip().startswith("The answer is")
    question_ids = trace.ids[trace.kinds == Content.QUESTION]
    assert tokenizer.decode(question_ids) == question


def test_missing_think_end(tokenizer):
    with pytest.raises(MissingThinkEndError, match="</think>"):
        tokenize_trace(tokenizer, "q", "<think>\nno end here")


def test_tokenize_dataset_counts_skipped_rows(tokenizer):
    import datasets

    pairs = [arithmetic_trace(random.Random(i)) for i in range(6)]
    rows = {"question": [q for q, _ in pairs] + ["q"], "answer": [a for _, a in pairs] + ["no think end"]}
    tokenized, skipped = tokenize_dataset(datasets.Dataset.from_dict(rows), tokenizer)
    assert skipped == {"no </think>": 1, "compression token": 0, "second </think>": 0} and len(tokenized) == 6
    one = tokenize_trace(tokenizer, *pairs[3])
    assert np.array_equal(np.asarray(tokenized[3]["input_ids"]), one.ids)
    with pytest.raises(ValueError, match="no column 'prompt'"):
        tokenize_dataset(datasets.Dataset.from_dict(rows), tokenizer, question_column="prompt")


# ----------------------------------------------------------------- stages


@settings(max_examples=80, deadline=None)
@given(
    prefix=st.integers(1, 12),
    reasoning=st.integers(0, 60),
    answer=st.integers(0, 25),
    window=st.integers(1, 11),
    compress_answer=st.booleans(),
    pad=st.booleans(),
)
def test_stage_properties(prefix, reasoning, answer, window, compress_answer, pad):
    trace = synthetic_trace(prefix, reasoning, answer)
    config = ExampleConfig(window=window, compress_answer=compress_answer, pad_last_window=pad, pad_id=0)
    expected_stages = (-(-reasoning // window) if pad else reasoning // window)
    if compress_answer:
        expected_stages += -(-answer // window) if pad else answer // window
    assert stage_count(trace, config) == expected_stages
    examples = build_compression_examples(trace, TOKENS, config)
    assert len(examples) == expected_stages
    for stage, example in enumerate(examples, start=1):
        compressed, replaced, original, labels = (example[k] for k in
                                                  ("compressed_input_ids", "replaced_original_tokens", "original_tokens", "labels"))
        slots = int((compressed == TOKENS.placeholder).sum())
        assert slots == stage
        assert int((replaced == TOKENS.placeholder).sum()) == stage * window
        assert replaced.shape == original.shape and labels.shape == compressed.shape
        # substituting each placeholder by its window gives original_tokens back
        assert np.array_equal(reconstruct(example, window), original)
        # the real trace is original_tokens without markers (and padding of a padded last window)
        unmarked = original[~np.isin(original, list(TOKENS.markers))]
        if not pad:
            assert np.array_equal(unmarked, trace.ids)
        # labels never supervise the prompt, a placeholder or a marker; they supervise everything else
        special = np.isin(compressed, [TOKENS.placeholder, *TOKENS.markers])
        assert (labels[special] == IGNORE_INDEX).all()
        assert (labels[:prefix] == IGNORE_INDEX).all()
        written = ~special & (np.arange(len(compressed)) >= prefix)
        assert np.array_equal(labels[written], compressed[written])


def test_edge_cases():
    short = synthetic_trace(4, 3, 5)
    assert build_compression_examples(short, TOKENS, ExampleConfig(window=4)) == []
    exact = synthetic_trace(4, 12, 5)
    examples = build_compression_examples(exact, TOKENS, ExampleConfig(window=4))
    assert len(examples) == 3
    last = examples[-1]["compressed_input_ids"]
    assert last[4] == TOKENS.block_start and last[8] == TOKENS.block_end and last[9] == TOKENS.think_end
    empty_answer = synthetic_trace(4, 8, 0)
    examples = build_compression_examples(empty_answer, TOKENS, ExampleConfig(window=2, compress_answer=True))
    assert len(examples) == 4 and examples[-1]["compressed_input_ids"][-2:].tolist() == [TOKENS.think_end, TOKENS.eos]
    one = build_compression_examples(synthetic_trace(2, 5, 1), TOKENS, ExampleConfig(window=1))
    assert [int((e["compressed_input_ids"] == TOKENS.placeholder).sum()) for e in one] == [1, 2, 3, 4, 5]
    padded = build_compression_examples(synthetic_trace(2, 5, 1), TOKENS, ExampleConfig(window=2, pad_last_window=True, pad_id=0))
    assert len(padded) == 3 and padded[-1]["original_tokens"][2 + 1 + 5] == 0


def test_every_nth_keeps_stages_one_plus_multiples():
    trace = synthetic_trace(3, 50, 4)
    config = ExampleConfig(window=2, every_nth=7)
    examples = build_compression_examples(trace, TOKENS, config)
    assert [int((e["compressed_input_ids"] == TOKENS.placeholder).sum()) for e in examples] == [1, 8, 15, 22]


def test_a_trace_must_be_text(tokenizer):
    for question, answer, name in ((None, "<think>\nr</think>a", "question"), ("q", 5, "answer")):
        with pytest.raises(TypeError, match=f"{name} must be text \\(a str\\), got"):
            tokenize_trace(tokenizer, question, answer)


def test_bad_configs():
    with pytest.raises(ValueError, match="ExampleConfig.window must be a positive integer, got 0"):
        ExampleConfig(window=0)
    with pytest.raises(ValueError, match="every_nth"):
        ExampleConfig(window=2, every_nth=0)
    with pytest.raises(ValueError, match="pad_id"):
        ExampleConfig(window=2, pad_last_window=True)
    with pytest.raises(ValueError, match=r"stage must be in \[1, 2\]"):
        build_compression_example(synthetic_trace(2, 4, 1), 3, TOKENS, ExampleConfig(window=2))


# ----------------------------------------------------------------- lazy dataset and collator


def test_lazy_dataset_matches_eager_builder():
    traces = [synthetic_trace(3, n, a, seed=n) for n, a in ((1, 2), (9, 4), (30, 4), (17, 4), (1, 7))]
    config = ExampleConfig(window=3, every_nth=2, compress_answer=True)
    dataset = CompressionExampleDataset(traces, TOKENS, config)
    eager = [e for t in traces for e in build_compression_examples(t, TOKENS, config)]
    assert len(dataset) == len(eager) and dataset.skipped_traces == 1
    for i in (0, 1, len(eager) // 2, len(eager) - 1, -1):
        for key, value in eager[i].items():
            assert np.array_equal(dataset[i][key], value)
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(eager)]


def test_lazy_dataset_from_tokenized_datasets(tokenizer):
    import datasets

    pairs = [arithmetic_trace(random.Random(i)) for i in range(4)]
    tokenized, _ = tokenize_dataset(datasets.Dataset.from_dict({"question": [q for q, _ in pairs],
                                                                "answer": [a for _, a in pairs]}), tokenizer)
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    dataset = CompressionExampleDataset(tokenized, tokens, ExampleConfig(window=4))
    direct = [tokenize_trace(tokenizer, q, a) for q, a in pairs]
    expected = sum(stage_count(t, ExampleConfig(window=4)) for t in direct)
    assert len(dataset) == expected
    first = build_compression_example(direct[0], 1, tokens, ExampleConfig(window=4))
    assert np.array_equal(dataset[0]["compressed_input_ids"], first["compressed_input_ids"])


def test_collator_pads_and_gathers_windows_in_slot_order():
    traces = [synthetic_trace(3, 20, 4, seed=1), synthetic_trace(5, 9, 2, seed=2)]
    config = ExampleConfig(window=3)
    examples = [build_compression_example(traces[0], 4, TOKENS, config), build_compression_example(traces[1], 2, TOKENS, config)]
    batch = CompressionCollator(TOKENS, window=3, pad_id=0)(examples)
    lengths = [len(e["compressed_input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["slot_mask"].sum().item() == 6 == batch["window_ids"].shape[0]
    assert (batch["labels"][1, lengths[1]:] == IGNORE_INDEX).all()
    expected = np.concatenate([traces[0].ids[3:15], traces[1].ids[5:11]]).reshape(-1, 3)
    assert torch.equal(batch["window_ids"], torch.from_numpy(expected))


def test_collator_rejects_mismatched_windows():
    example = build_compression_example(synthetic_trace(3, 20, 4), 2, TOKENS, ExampleConfig(window=3))
    with pytest.raises(ValueError, match="2 placeholders need 8 window tokens at window 4"):
        CompressionCollator(TOKENS, window=4, pad_id=0)([example])
    with pytest.raises(ValueError, match="empty"):
        CompressionCollator(TOKENS, window=3, pad_id=0)([])


BAD_EXAMPLES = [
    (lambda e: {k: v for k, v in e.items() if k != "labels"}, "example 1: has no field 'labels'; its fields are"),
    (lambda e: {**e, "labels": e["labels"][:-1]}, r"example 1: labels \(\d+\) must be as long as compressed_input_ids"),
    (lambda e: {**e, "compressed_input_ids": e["compressed_input_ids"].astype(float)},
     "example 1: compressed_input_ids must be a 1-D sequence of integers"),
    (lambda e: {**e, "labels": e["labels"][None]}, "example 1: labels must be a 1-D sequence of integers"),
    (lambda e: list(e.values()), r"example 1: must be a mapping of \['compressed_input_ids', .*\], got list"),
]


@pytest.mark.parametrize("spoil,message", BAD_EXAMPLES, ids=["no-labels", "short-labels", "float-ids", "2d-labels",
                                                             "not-a-dict"])
def test_collator_names_the_bad_example(spoil, message):
    """An example the collator cannot read is named, with what is wrong (numpy raised KeyError, broadcast errors)."""
    example = build_compression_example(synthetic_trace(3, 20, 4), 2, TOKENS, ExampleConfig(window=3))
    with pytest.raises(ValueError, match=message):
        CompressionCollator(TOKENS, window=3, pad_id=0)([example, spoil(example)])


def test_public_names_resolve():
    import hcr

    for name in hcr.__all__:
        assert getattr(hcr, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hcr.nope


# ----------------------------------------------------------------- bad data: a clear error or a counted skip


def test_tokenize_dataset_counts_skips_by_reason(tokenizer):
    import datasets

    from hcr.compression.traces import format_skips

    good_q, good_a = arithmetic_trace(random.Random(0))
    rows = [(good_q, good_a), ("q", "no think end"), ("q <|fim_pad|>", good_a), ("q", good_a + "<|vision_end|>"),
            ("q", good_a.replace("Okay", "<|vision_start|>")), ("q", good_a + "</think>"), ("q </think>", good_a)]
    tokenized, skipped = tokenize_dataset(datasets.Dataset.from_dict({"question": [q for q, _ in rows],
                                                                      "answer": [a for _, a in rows]}), tokenizer)
    assert skipped == {"no </think>": 1, "compression token": 3, "second </think>": 2}
    assert len(tokenized) == 1 and np.array_equal(tokenized[0]["input_ids"], tokenize_trace(tokenizer, good_q, good_a).ids)
    assert format_skips(skipped) == "skipped: 1 no </think>, 3 compression token, 2 second </think>"
    with pytest.raises(ValueError, match=r"cannot be trained on \(compression token\)"):
        tokenize_trace(tokenizer, "q <|fim_pad|>", good_a)


class AliasingTokenizer:
    """One id per character, except that "@" reads as the placeholder and "#" as ``</think>``: a
    tokenizer may map ordinary text to these ids, which the text check alone would not see."""

    def __call__(self, texts, add_special_tokens=False):
        aliases = {"@": TOKENS.placeholder, "#": TOKENS.think_end}
        return {"input_ids": [[aliases.get(c, 20 + ord(c)) for c in text] for text in texts]}


def test_compression_and_think_end_ids_are_skipped_too():
    from hcr.compression.traces import tokenize_traces_batch

    questions = ["q", "q@", "q", "q", "q#"]
    answers = ["<think>\nrr</think>a", "<think>\nrr</think>a", "<think>\nr@</think>a", "<think>\nrr</think>a#",
               "<think>\nrr</think>a"]
    traces = tokenize_traces_batch(AliasingTokenizer(), TOKENS, questions, answers)
    assert [t is not None for t in traces] == [True, False, False, False, False]
    with pytest.raises(ValueError, match=r"\(second </think>\)"):
        tokenize_trace(AliasingTokenizer(), "q", "<think>\nr#r</think>a", tokens=TOKENS)


_PIECES = ["<|fim_pad|>", "<|vision_start|>", "<|vision_end|>", "</think>", "<think>", "\n", " ", "a", "7", "+",
           " plus", "Adding", "é", "<|", "|>", "</", "think>"]
_text = st.lists(st.sampled_from(_PIECES), max_size=25).map("".join)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(_text, st.one_of(_text, st.tuples(_text, _text).map("</think>".join))),
                     min_size=1, max_size=4),
       window=st.integers(1, 4), compress_answer=st.booleans())
def test_any_text_is_a_counted_skip_or_makes_right_slots(tokenizer, rows, window, compress_answer):
    import datasets

    from hcr.compression.examples import window_tokens
    from hcr.compression.tokens import COMPRESSION_TOKENS
    from hcr.compression.traces import tokenize_traces_batch

    tokens = CompressionTokens.from_tokenizer(tokenizer)
    questions, answers = [q for q, _ in rows], [a for _, a in rows]
    tokenized, skipped = tokenize_dataset(datasets.Dataset.from_dict({"question": questions, "answer": answers}),
                                          tokenizer)
    traces = tokenize_traces_batch(tokenizer, tokens, questions, answers)
    kept = [t for t in traces if t is not None]
    assert sum(skipped.values()) == len(rows) - len(kept) and len(tokenized) == len(kept)
    config = ExampleConfig(window=window, compress_answer=compress_answer)
    for (question, answer), trace in zip(rows, traces):
        bad_text = (any(s in text for s in COMPRESSION_TOKENS for text in (question, answer))
                    or "</think>" in question or answer.count("</think>") != 1)
        assert (trace is None) == bad_text  # the tiny tokenizer maps no other text to those ids
        if trace is None:
            continue
        for stage, example in enumerate(build_compression_examples(trace, tokens, config), start=1):
            slots = int((example["compressed_input_ids"] == tokens.placeholder).sum())
            assert slots == stage  # stage k compresses k windows
            windows = window_tokens(example["replaced_original_tokens"], example["original_tokens"],
                                    tokens.placeholder, window, slots=slots)
            assert windows.shape == (slots, window)


def test_bad_jsonl_traces_name_the_file_line_and_column(tokenizer, tmp_path):
    import json

    import datasets
    import transformers

    from hcr.compression.train import PoolerSettings, TrainSettings, build_compression_model, load_traces, train_compressor

    good = json.dumps({"question": "q", "answer": "<think>\nr</think>a"})

    def write(name, *lines):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON"):
        load_traces(write("broken.jsonl", good, "", '{"question": "x", "answer": '))
    with pytest.raises(ValueError, match=r"list.jsonl, line 2: expected a JSON object, got list"):
        load_traces(write("list.jsonl", good, "[1, 2]"))
    with pytest.raises(ValueError, match=r"null.jsonl, line 1: has a null 'answer'"):
        load_traces(write("null.jsonl", '{"question": "q", "answer": null}'))
    with pytest.raises(ValueError, match=r"number.jsonl, line 1: 'question' holds a int, not text"):
        load_traces(write("number.jsonl", '{"question": 3, "answer": "a"}'))
    with pytest.raises(ValueError, match=r"broken.json: not JSON rows that datasets can read"):
        load_traces(write("broken.json", good, '{"question": "x", "answer": '))
    # the sources not read line by line (.json, Arrow, saved or hub datasets): checked row by row when tokenized
    gap = load_traces(write("gap.json", good, '{"question": "q"}'))
    with pytest.raises(ValueError, match=r"dataset row 1: 'answer' is null \(missing from that row\?\), not text"):
        tokenize_dataset(gap, tokenizer)
    with pytest.raises(ValueError, match=r"dataset row 0: 'question' holds a int, not text"):
        tokenize_dataset(datasets.Dataset.from_dict({"question": [7, 8], "answer": ["a", "b"]}), tokenizer)
    renamed = write("renamed.jsonl", good, '{"prompt": "q", "answer": "<think>\\nr</think>a"}')
    assert len(load_traces(write("blank.jsonl", good, "", good))) == 2
    assert load_traces(write("prompt.jsonl", renamed.read_text().splitlines()[1]), question_column="prompt")[0] == {
        "prompt": "q", "answer": "<think>\nr</think>a"}

    # the same messages from train_compressor, before anything trains
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    model = build_compression_model(transformers.Qwen2ForCausalLM(config), tokenizer, 2,
                                    pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    settings = TrainSettings(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=r"renamed.jsonl, line 2: has no field 'question'; its fields are "
                                         r"\['answer', 'prompt'\] \(choose others with --question-column"):
        train_compressor(model, tokenizer, renamed, settings=settings)
    with pytest.raises(ValueError, match=r"no column 'question'; it has \['prompt', 'answer'\]"):
        train_compressor(model, tokenizer, datasets.Dataset.from_dict({"prompt": ["q"], "answer": ["a"]}),
                         settings=settings)
