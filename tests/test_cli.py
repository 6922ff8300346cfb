"""The ``hcr`` command line: the environment report (with its quick benchmark) and usage errors."""

import re

import pytest

from hcr.cli import command_line, main


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "backend per op" in capsys.readouterr().out


def test_info_bench_compares_backends(capsys):
    from hcr_kernels.info import main as info_main

    assert info_main(["--bench", "--batch", "2", "--length", "40", "--dim", "24", "--window", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "hcr_kernels environment" in out
    assert "reference" in out and "native" in out and "x vs reference" in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2


TRAIN_REQUIRED = ["train-compressor", "--base", "b", "--dataset", "d.jsonl", "--output-dir", "out"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-steps", "0"], "argument --max-steps: expected -1 (run --epochs) or a positive integer, got 0"),
        (["--max-steps", "-2"], "argument --max-steps: expected -1 (run --epochs) or a positive integer, got -2"),
        (["--lora-dropout", "1.5"], "argument --lora-dropout: expected a number in [0, 1], got 1.5"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["--lr=-1e-4"], "argument --lr: expected a positive number, got -0.0001"),
    ],
)
def test_train_compressor_rejects_bad_flags_before_loading_anything(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(TRAIN_REQUIRED + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_compressor_help_gives_the_settings_defaults(capsys):
    from hcr.compression.settings import LoraSettings, TrainSettings

    with pytest.raises(SystemExit):
        main(["train-compressor", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"-1: as many as --epochs take (default {TrainSettings.max_steps})" in help_text
    assert f"LoRA rank (0: train the pooler fully; default {LoraSettings.r})" in help_text
    assert f"AdamW learning rate (default {TrainSettings.learning_rate})" in help_text


def test_a_base_folder_without_a_tokenizer_asks_for_tokenizer(tmp_path):
    """transformers builds an empty tokenizer from a model folder's config; every token would be missing."""
    from hcr.compression.tokens import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(FileNotFoundError, match=r"--base .*: no tokenizer in this folder \(none of tokenizer.json, "
                                                r".*\); pass --tokenizer with the folder or name of its tokenizer"):
        main(["train-compressor", "--base", str(tmp_path), "--dataset", "d.jsonl", "--output-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"--tokenizer .*: no tokenizer in this folder \(none of .*\)$"):
        load_tokenizer("any-base", str(tmp_path))


def test_the_console_script_prints_hcrs_input_errors_as_one_line(tmp_path, capsys, monkeypatch):
    """hcr's own checks name what is wrong: their message is all ``hcr`` prints (exit status 1). A failure inside
    another library, or a bug, is no verdict of hcr's on the input: its traceback is what a bug report needs."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    flags = ["train-compressor", "--base", str(tmp_path), "--dataset", "d.jsonl", "--output-dir", str(tmp_path)]
    assert command_line(flags) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"hcr: error: --base .*: no tokenizer in this folder \(none of tokenizer.json, .*\); "
                        r"pass --tokenizer with the folder or name of its tokenizer\n", err), err
    monkeypatch.setattr("hcr.compression.tokens.load_tokenizer", lambda base, tokenizer: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal for int"):
        command_line(flags)
    assert command_line(["info"]) == 0
