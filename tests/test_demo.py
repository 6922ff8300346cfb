"""``hcr demo``: the task, the compression-rule arithmetic, the control, and a smoke-sized run end to end."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from hcr.cli import main  # noqa: E402
from hcr.demo.corpus import apply, needed_value_compressed, random_task, split_corpus  # noqa: E402
from hcr.demo.measure import layout_lengths  # noqa: E402


@given(st.integers(0, 2**32 - 1), st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_task_values_follow_the_operations(seed, steps):
    task = random_task(random.Random(seed), steps, steps)
    value = task.start
    for (letter, op, operand), written in zip(task.steps, task.values):
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % 10
        assert written == value
    reasoning = task.reasoning()
    assert [reasoning[i] for i in task.value_offsets()] == [str(v) for v in task.values]
    assert task.response().endswith(f"\\boxed{{{task.answer}}}.")
    assert "</think>" in task.response() and task.response().startswith("<think>\n")


def test_split_is_seeded_and_disjoint():
    train, heldout = split_corpus(300, 50, min_steps=2, max_steps=4, seed=3)
    again = split_corpus(300, 50, min_steps=2, max_steps=4, seed=3)
    assert (train, heldout) == again
    assert not set(train) & set(heldout)
    assert len(set(train)) == 300 and len(set(heldout)) == 50
    with pytest.raises(ValueError, match="min_steps"):
        split_corpus(1, 1, min_steps=5, max_steps=2, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        split_corpus(500, 0, min_steps=1, max_steps=1, seed=0)  # only 10 starts x 26 operations exist
    with pytest.raises(ValueError, match="op must be"):
        apply("/", 1, 2)


def _simulate(window, keep_last, written):
    """The generator's rule step by step: after each token, pool the oldest W when W + k are uncompressed."""
    pooled, before_each = 0, []
    for length in range(written):
        before_each.append(pooled)  # windows pooled before token ``length`` is written
        if length + 1 - pooled * window >= window + keep_last:
            pooled += 1
    return before_each


@given(st.integers(1, 9), st.integers(0, 5), st.lists(st.integers(1, 6), min_size=1, max_size=12))
@settings(max_examples=80, deadline=None)
def test_needed_value_compressed_matches_a_step_by_step_simulation(window, keep_last, gaps):
    positions = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    pooled = _simulate(window, keep_last, positions[-1] + 1)
    expected = sum(prev < window * pooled[cur] for prev, cur in zip(positions, positions[1:]))
    assert needed_value_compressed(positions, window, keep_last) == (expected, len(positions) - 1)


def test_layout_lengths():
    assert layout_lengths(5, 10, 4, None, 0) == [6, 7, 8, 9]
    # W=2, k=1: pooled after 3 tokens ([a b] -> one slot + two markers), and again after 5
    assert layout_lengths(5, 10, 6, 2, 1) == [6, 7, 5 + 3 - 2 + 3, 5 + 4 - 2 + 3, 5 + 5 - 4 + 4, 5 + 6 - 4 + 4]
    # nothing is pooled after the reasoning (3 tokens) ends
    assert layout_lengths(0, 3, 6, 1, 0)[-1] == 0 + 6 - 3 + 5


def test_marker_exposure_wraps_a_reasoning_prefix_and_never_supervises_the_markers():
    import numpy as np

    from hcr.compression.traces import TokenizedTrace
    from hcr.demo.reasoner import IGNORE_INDEX, with_markers

    trace = TokenizedTrace(np.array([1, 2, 3, 10, 11, 12, 13, 4, 20, 21, 5]), np.zeros(11, dtype=np.int8), 3, 7, 8, 10)
    ids, labels = with_markers(trace, 5, (90, 91))
    assert ids == [1, 2, 3, 90, 10, 11, 91, 12, 13, 4, 20, 21, 5]
    assert labels == [IGNORE_INDEX] * 4 + [10, 11, IGNORE_INDEX, 12, 13, 4, 20, 21, 5]
    assert with_markers(trace, 7, (90, 91))[0] == [1, 2, 3, 90, 10, 11, 12, 13, 91, 4, 20, 21, 5]
    plain_ids, plain_labels = with_markers(trace, -1, None)
    assert plain_ids == trace.ids.tolist() and plain_labels == [IGNORE_INDEX] * 3 + trace.ids[3:].tolist()


QUICK_RUN_WARNINGS: list[str] = []  # every warning the quick run raised


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    QUICK_RUN_WARNINGS[:] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out


def test_quick_demo_prints_none_of_the_library_warnings_it_used_to(quick_run):
    """peft's and transformers' warnings that every demo printed (three times each, one with a 15-line code
    sample), none of them the user's to act on: tied embeddings the pooler does not have, save_embedding_layers
    on every save, the deprecated checkpointing names."""
    noise = ("is_gradient_checkpointing", "save_embedding_layers", "tie_word_embeddings",
             "_checkpointing` is deprecated")
    assert [m[:120] for m in QUICK_RUN_WARNINGS if any(n in m for n in noise)] == []


def test_tokens_per_second_sets_the_autotuners_measurements_aside():
    from hcr.demo.evaluate import Answers

    answers = Answers([[1, 2, 3], [4, 5, 6]], [0, 0], [3, 3], seconds=2.0,
                      time_split={"decode": 0.5, "other": 0.5, "autotune": 1.0})
    assert answers.autotune_seconds == 1.0 and answers.tokens_per_second == 6.0
    plain = Answers([[1, 2, 3], [4, 5, 6]], [0, 0], [3, 3], seconds=2.0)  # generate(): no split, nothing measured
    assert plain.autotune_seconds == 0.0 and plain.tokens_per_second == 3.0


def test_quick_demo_writes_every_output(quick_run, capsys):
    results = json.loads((quick_run / "results.json").read_text())
    for name in ("report.md", "accuracy_vs_window.png", "cache_vs_tokens.png", "training_loss.png",
                 "data/train.jsonl", "data/heldout.jsonl", "reasoner/config.json", "compressor-W2/config.json",
                 "compressor-W4/config.json"):
        assert (quick_run / name).exists(), name
    assert 0.0 <= results["uncompressed"]["accuracy"] <= 1.0
    assert [(e["window"], e["keep_last"]) for e in results["compressed"]] == [(2, 1), (2, 4), (4, 1), (4, 4)]
    for entry in results["compressed"]:
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["control_accuracy"] <= 1.0
        assert 0.0 <= entry["needed_value_compressed"] <= 1.0
        assert entry["mean_compressions"] >= 0 and entry["tokens_per_second"] > 0
        # every stage of the fast path is timed; together they are its generation time
        assert set(entry["time_split"]) == {"prefill", "decode", "pooling", "re-encode", "other", "autotune"}
        assert sum(entry["time_split"].values()) == pytest.approx(entry["seconds"], rel=1e-6)
        assert entry["autotune_seconds"] == entry["time_split"]["autotune"]
        if entry["keep_last"] == 1:  # the oracle runs at the first keep_last only
            assert 0 <= entry["recompute"]["identical_outputs"] <= entry["recompute"]["items"] == 4
        else:
            assert "recompute" not in entry
    # 4 tokens per step: with k = 1 every needed value is compressed at W = 2 and 4, with k = 4 none is
    assert [e["needed_value_compressed"] for e in results["compressed"]] == [1.0, 0.0, 1.0, 0.0]
    assert 0.0 <= results["layout_check"]["accuracy"] <= 1.0 and results["layout_check"]["window"] == 1
    assert set(results["stage_seconds"]) >= {"reasoner training", "evaluation"}
    report = (quick_run / "report.md").read_text()
    assert "| W | keep_last | accuracy" in report and results["machine"]["isa"] in report
    # the time table: one row per configuration that compressed, W = 2, k = 4 doing 3.5 positions per token
    assert "| 2 | 4 | " in report and "| 3.50 |" in report
    heldout = [json.loads(line)["question"] for line in (quick_run / "data/heldout.jsonl").read_text().splitlines()]
    train = {json.loads(line)["question"] for line in (quick_run / "data/train.jsonl").read_text().splitlines()}
    assert len(heldout) == 12 and not set(heldout) & train


def test_second_run_reuses_the_trained_stages(quick_run, capsys):
    weights = sorted((quick_run / "reasoner").glob("*.safetensors"))
    stamps = {path: path.stat().st_mtime_ns for path in weights + sorted(quick_run.glob("compressor-W*/hcr-stage.json"))}
    assert main(["demo", "--quick", "--out", str(quick_run), "--threads", "1", "--eval-items", "12"]) == 0
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert "| W | keep_last | accuracy" in capsys.readouterr().out


def test_a_stage_made_again_loses_its_record_before_its_files_are_written(tmp_path, capsys):
    """Else a run stopped halfway through writing the stage anew would find the old record and load a mix."""
    from hcr.demo.experiment import STAGE_FILE, _load_stage, _save_stage

    _save_stage(tmp_path, {"seed": 1}, loss_curve=[[1, 2.0]])
    assert _load_stage(tmp_path, {"seed": 1}, fresh=False)["loss_curve"] == [[1, 2.0]]
    assert (tmp_path / STAGE_FILE).exists()
    assert _load_stage(tmp_path, {"seed": 1}, fresh=True) is None and not (tmp_path / STAGE_FILE).exists()
    _save_stage(tmp_path, {"seed": 1})
    assert _load_stage(tmp_path, {"seed": 2}, fresh=False) is None and not (tmp_path / STAGE_FILE).exists()
    assert "made with other settings; training it again" in capsys.readouterr().out
    assert _load_stage(tmp_path, {"seed": 2}, fresh=False) is None  # nothing there: nothing to say
    assert capsys.readouterr().out == ""


def test_measured_peak_cache_follows_the_rule_and_control_is_constant(quick_run):
    from transformers import AutoModelForCausalLM

    from hcr.compression.model import CompressionModel
    from hcr.compression.tiny_tokenizer import tiny_tokenizer
    from hcr.demo.evaluate import constant_pooling, generate_compressed
    from hcr.generation import CompressedGenerator
    from hcr.generation.prompts import prompt_ids

    tokenizer = tiny_tokenizer(quick_run / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(str(quick_run / "reasoner")).eval()
    model = CompressionModel.from_pretrained(str(quick_run / "compressor-W2"), base_model=base).eval()
    questions = [json.loads(line)["question"] for line in (quick_run / "data/heldout.jsonl").read_text().splitlines()]
    prompts = prompt_ids(tokenizer, questions[:6])
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    eos = tokenizer.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    answers = generate_compressed(CompressedGenerator(model, tokenizer, keep_last=1), prompts, eos=eos,
                                  pad=tokenizer.pad_token_id, max_new_tokens=30, batch_size=3)
    for prompt, output, peak in zip(prompts, answers.outputs, answers.peak_cache):
        reasoning = output.index(think_end) if think_end in output else len(output)
        fed = len(output) - 1  # the last token written is never fed back
        assert peak == max([len(prompt)] + layout_lengths(len(prompt), reasoning, fed, 2, 1))

    vector = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    windows = torch.randint(10, 200, (5, 2))
    original = model.pooler
    with constant_pooling(model, vector):
        assert torch.allclose(model.pooled_windows(windows), vector.expand(5, -1))
    assert model.pooler is original
    assert not torch.allclose(model.pooled_windows(windows)[0], model.pooled_windows(windows)[1])


def test_prompt_ids_refuse_reserved_tokens(quick_run):
    from hcr.compression.tiny_tokenizer import tiny_tokenizer
    from hcr.generation.prompts import left_pad, prompt_ids

    tokenizer = tiny_tokenizer(quick_run / "tokenizer")
    (ids,) = prompt_ids(tokenizer, ["Start at 1"])
    assert ids[0] == tokenizer.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    assert tokenizer.decode(ids).endswith("<｜Assistant｜><think>\n")
    with pytest.raises(ValueError, match="question 1 holds"):
        prompt_ids(tokenizer, ["fine", "not <|vision_start|> fine"])
    padded, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="non-empty"):
        left_pad([[1], []], pad_id=0)
