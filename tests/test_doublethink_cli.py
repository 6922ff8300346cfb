"""``hcr doublethink`` end to end with a tiny budget, and its argument errors."""

import csv
import json

import pytest
import torch

from hcr.cli import main


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_cli_runs_and_writes_csv_json_png(tmp_path, arch, capsys):
    argv = ["doublethink", "--arch", arch, "--layers", "1", "--hidden", "32", "--max-examples", "256",
            "--batch-size", "32", "--report-to", "none", "--out", str(tmp_path), "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "longest solved length" in out.out and "«" in out.out + out.err  # summary and accuracy bars
    with open(tmp_path / "rounds.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and [int(r["examples"]) for r in rows] == list(range(32, 257, 32))
    assert all(r["bar"].startswith("«") and 0.0 <= float(r["acc_len_1"]) <= 1.0 for r in rows)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["arch"] == arch and report["config"]["seed"] == 3 and report["config"]["answer_weight"] == 0.5
    assert report["summary"]["examples"] == 256 and len(report["rounds"]) == 8
    assert (tmp_path / "accuracy_by_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "0"], "argument --layers: expected a positive integer, got 0"),
        (["--layers", "2", "--answer-weight", "1.5"], "argument --answer-weight: expected a number in [0, 1]"),
        (["--layers", "2", "--task", "sideways"], "argument --task: invalid choice"),
        (["--layers", "2", "--report-to", "tensorboard"], "argument --report-to: invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_them(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["doublethink", "--arch", "mamba", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_answer_weight_with_the_direct_task_is_refused(tmp_path, capsys):
    argv = ["doublethink", "--arch", "mamba", "--layers", "1", "--task", "direct", "--answer-weight", "0.3",
            "--report-to", "none", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--answer-weight" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_missing_local_tokenizer_is_a_clear_error(tmp_path):
    argv = ["doublethink", "--arch", "transformer", "--layers", "1", "--tokenizer", str(tmp_path / "gpt2"),
            "--report-to", "none", "--out", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(FileNotFoundError, match="tokenizer path .*gpt2.* does not exist"):
        main(argv)
