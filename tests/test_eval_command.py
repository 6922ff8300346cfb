"""``hcr eval`` on a tiny Qwen2 with and without a compressor: files, resume, bad input, two processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr.cli import main  # noqa: E402
from hcr.compression import tokenize_trace  # noqa: E402
from hcr.compression.tiny_tokenizer import arithmetic_trace, tiny_tokenizer  # noqa: E402
from hcr.compression.train import LoraSettings, PoolerSettings, build_compression_model  # noqa: E402
from hcr.evaluation.records import RECORD_FIELDS  # noqa: E402
from hcr.generation.prompts import prompt_ids  # noqa: E402

ITEMS = 5
FAST = ["--max-new-tokens", "16", "--batch-size", "2", "--threads", "1", "--no-progress"]


def tiny_base(tokenizer, hidden_size=32):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=256)
    # float64: batch composition and thread counts then cannot flip a greedy choice between runs
    return transformers.Qwen2ForCausalLM(config).double().eval()


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # --threads 1 sets it for the whole process
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved base + tokenizer, a compressor for it (W = 4, LoRA), one for a wider base, and a five-item jsonl."""
    root = tmp_path_factory.mktemp("eval")
    # a folder of its own: saved beside a Qwen2 config, transformers 5 reloads it as a Qwen2Tokenizer with
    # Qwen2's digit-splitting pre-tokenizer, which tokenizes differently from the tokenizer as built
    tokenizer = tiny_tokenizer(root / "tokenizer")
    base = tiny_base(tokenizer)
    base.save_pretrained(root / "base")
    # with a LoRA adapter, as train-compressor saves one: hcr eval loads it and merges it into the pooler
    model = build_compression_model(base, tokenizer, 4, pooler=PoolerSettings(num_hidden_layers=1),
                                    lora=LoraSettings(r=4, alpha=4), base_model_name_or_path=str(root / "base"))
    model.save_pretrained(root / "compressor")
    wide = tiny_base(tokenizer, hidden_size=48)
    wide.save_pretrained(root / "wide")
    rows = []
    for i in range(ITEMS):
        question, answer = arithmetic_trace(random.Random(i))
        total = answer.rsplit(" ", 1)[-1].rstrip(".")
        # the gold answer as a plain number, or as a whole R1 output whose box holds it
        gold = total if i % 2 else answer.replace(f"is {total}.", f"is $\\boxed{{{total}}}$.")
        rows.append({"question": question, "answer": gold, "total": total})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"root": root, "base": str(root / "base"), "tokenizer_dir": str(root / "tokenizer"),
            "compressor": str(root / "compressor"), "wide": str(root / "wide"), "data": str(data), "rows": rows,
            "tokenizer": tokenizer}


def run_eval(work, out, *extra):
    return main(["eval", "--base", work["base"], "--tokenizer", work["tokenizer_dir"], "--dataset", work["data"],
                 "--out", str(out), *FAST, *extra])


def records_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def check_files(work, out):
    records = records_of(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in records] == list(range(ITEMS))
    for record, row in zip(records, work["rows"]):
        assert set(RECORD_FIELDS) <= set(record)
        assert record["question"] == row["question"] and record["gold"] == row["total"]
        assert 1 <= record["output_tokens"] <= 16 and record["seconds"] >= 0
        assert isinstance(record["correct"], bool)
    assert summary["items"] == ITEMS and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["correct"] == sum(r["correct"] for r in records)
    assert summary["max_peak_cache"] == max(r["peak_cache"] for r in records)
    assert summary["mean_output_tokens"] == pytest.approx(sum(r["output_tokens"] for r in records) / ITEMS)
    assert sum(summary["rules"].values()) == ITEMS
    assert summary["settings"]["max_new_tokens"] == 16
    assert not [p.name for p in out.iterdir() if p.name not in ("results.jsonl", "summary.json")]  # no temp files
    return records, summary


@pytest.fixture(scope="module")
def plain_run(work):
    out = work["root"] / "plain"
    assert run_eval(work, out) == 0
    return out


@pytest.fixture(scope="module")
def compressed_run(work):
    out = work["root"] / "compressed"
    assert run_eval(work, out, "--compressor", work["compressor"], "--keep-last", "1") == 0
    return out


def test_without_compressor(work, plain_run, capsys):
    records, summary = check_files(work, plain_run)
    prompts = prompt_ids(work["tokenizer"], [row["question"] for row in work["rows"]])
    for record, prompt in zip(records, prompts):
        assert record["compressions"] == 0
        # what the KV cache holds: the prompt and every token written but the last
        assert record["peak_cache"] == len(prompt) + record["output_tokens"] - 1
    assert summary["settings"]["compressor"] is None and summary["settings"]["window"] is None


def test_with_compressor(work, compressed_run, plain_run):
    records, summary = check_files(work, compressed_run)
    assert summary["settings"]["window"] == 4 and summary["settings"]["keep_last"] == 1  # window: the compressor's
    prompts = prompt_ids(work["tokenizer"], [row["question"] for row in work["rows"]])
    for record, prompt in zip(records, prompts):
        written = record["output_tokens"]
        if "</think>" not in record["output"]:  # pooled whenever the tail reached W + k = 5, but after the last
            assert record["compressions"] == max(0, (written - 2) // 4)
        assert record["peak_cache"] < len(prompt) + written - 1
    assert summary["mean_peak_cache"] < json.loads((plain_run / "summary.json").read_text())["mean_peak_cache"]


def test_no_merge_generates_with_the_adapter_as_trained(work, compressed_run, tmp_path):
    """--no-merge keeps the pooler's LoRA adapter unmerged (the default folds it in); the setting is recorded,
    so a rerun into the same --out with the other choice is refused rather than mixing records."""
    from hcr.evaluation.runner import EvalSettings, _Answerer

    settings = dict(base=work["base"], tokenizer=work["tokenizer_dir"], dataset=work["data"], out=str(tmp_path),
                    compressor=work["compressor"])
    assert _Answerer(EvalSettings(**settings, merge_adapter=False), torch.device("cpu")).model.has_adapter
    assert not _Answerer(EvalSettings(**settings), torch.device("cpu")).model.has_adapter

    out = tmp_path / "unmerged"
    assert run_eval(work, out, "--compressor", work["compressor"], "--keep-last", "1", "--no-merge") == 0
    records, summary = check_files(work, out)
    assert summary["settings"]["merge_adapter"] is False
    assert json.loads((compressed_run / "summary.json").read_text())["settings"]["merge_adapter"] is True
    # the fixture's adapter is as built (its B matrices zero): merging it changes no weight, so the same tokens
    assert [r["output"] for r in records] == [r["output"] for r in records_of(compressed_run)]
    with pytest.raises(ValueError, match="merge_adapter: False -> True"):
        run_eval(work, out, "--compressor", work["compressor"], "--keep-last", "1")


def test_prompt_is_the_training_layout(work):
    """The prompt is exactly the start of a training trace, up to where the reasoning begins."""
    tokenizer = work["tokenizer"]
    for row in work["rows"]:
        trace = tokenize_trace(tokenizer, row["question"], "<think>\nhm</think>x")
        assert prompt_ids(tokenizer, [row["question"]])[0] == trace.ids[: trace.reasoning_start].tolist()


def test_rerun_skips_done_items_and_redoes_a_torn_line(work, tmp_path):
    out = tmp_path / "out"
    assert run_eval(work, out, "--limit", "3") == 0
    first = records_of(out)
    assert [r["index"] for r in first] == [0, 1, 2]
    # a crash mid-write: item 2's line is cut short
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    assert run_eval(work, out) == 0
    records, summary = check_files(work, out)
    assert records[:2] == first[:2]  # the same seconds too: not evaluated again
    assert {k: v for k, v in records[2].items() if k != "seconds"} == {
        k: v for k, v in first[2].items() if k != "seconds"}
    assert run_eval(work, out) == 0  # nothing left to do
    assert records_of(out) == records


def test_rerun_with_other_settings_is_refused(work, plain_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text((plain_run / "summary.json").read_text())
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 16 -> 8\)"):
        main(["eval", "--base", work["base"], "--tokenizer", work["tokenizer_dir"], "--dataset", work["data"],
              "--out", str(out), "--max-new-tokens", "8"])


def write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_input_is_named(work, tmp_path):
    def evaluate(data, *extra):
        return run_eval(dict(work, data=data), tmp_path / "out", *extra)

    data = write(tmp_path / "fields.jsonl", '{"q": "What is 1 plus 1?", "a": "2"}\n')
    with pytest.raises(ValueError, match=r"fields.jsonl, line 1: has no field 'question'; its fields are \['a', 'q'\]"):
        evaluate(data)
    with pytest.raises(ValueError, match=r"line 1: has no field 'answer'"):
        evaluate(data, "--question-field", "q")
    with pytest.raises(ValueError, match=r"empty.jsonl: no items"):
        evaluate(write(tmp_path / "empty.jsonl", "\n"))
    good = '{"question": "What is 1 plus 1?", "answer": "2"}\n'
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON"):
        evaluate(write(tmp_path / "broken.jsonl", good + "\n" + '{"question": "x", "answer": \n' + good))
    with pytest.raises(ValueError, match=r"list.jsonl, line 1: expected a JSON object, got list"):
        evaluate(write(tmp_path / "list.jsonl", "[1, 2]\n"))
    with pytest.raises(FileNotFoundError, match=r"--dataset .*missing.jsonl: no such file"):
        evaluate(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"--compressor .*nowhere: no such folder"):
        run_eval(work, tmp_path / "out", "--compressor", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"--compressor .* was built for a base with vocab size \d+ and hidden size "
                                         r"32, but --base .*wide has vocab size \d+ and hidden size 48"):
        run_eval(dict(work, base=work["wide"]), tmp_path / "out", "--compressor", work["compressor"])
    with pytest.raises(ValueError, match="window_size=3 but the model's pooler was trained on windows of 4"):
        run_eval(work, tmp_path / "out", "--compressor", work["compressor"], "--window", "3")


def test_saved_dataset_folder(work, plain_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(work["rows"]).save_to_disk(str(folder))
    out = tmp_path / "out"
    assert run_eval(dict(work, data=str(folder)), out, "--limit", "2") == 0
    expected = records_of(plain_run)[:2]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in records_of(out)] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in expected]


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="needs torch.distributed with the gloo backend")
def test_two_processes_give_the_single_process_records(work, compressed_run, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hcr.cli", "eval", "--base", work["base"], "--tokenizer", work["tokenizer_dir"],
               "--dataset", work["data"], "--out", str(out),
               "--compressor", work["compressor"], "--keep-last", "1", *FAST]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records, summary = check_files(work, out)
    single = records_of(compressed_run)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in records] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in single]
    assert summary["settings"]["world_size"] == 2


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_sampling_is_seeded(work, tmp_path, compressed):
    extra = ["--do-sample", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--limit", "2"]
    if compressed:
        extra += ["--compressor", work["compressor"]]
    runs = []
    for name in ("a", "b"):
        assert run_eval(work, tmp_path / name, *extra) == 0
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in records_of(tmp_path / name)])
    assert runs[0] == runs[1] and len(runs[0]) == 2
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["settings"]["top_k"] == 20
