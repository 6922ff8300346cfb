"""The ``hcr`` command line: the environment report (with its quick benchmark) and usage errors."""

import pytest

from hcr.cli import main


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
