"""hcr.files: atomic writes of files and folders, and the row readers' errors."""

from __future__ import annotations

import os

import pytest

from hcr import files
from hcr.files import atomic_directory, read_jsonl, umask, write_atomic


def fill(folder, **contents):
    for name, text in contents.items():
        (folder / name).write_text(text)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_directory_puts_a_new_folder_in_place_with_the_usual_permissions(tmp_path):
    with atomic_directory(tmp_path / "model") as staging:
        assert staging.parent == tmp_path and not (tmp_path / "model").exists()  # nothing there until the end
        fill(staging, config="new", weights="new")
    assert listing(tmp_path) == ["model"]  # no staging folder left beside it
    assert listing(tmp_path / "model") == ["config", "weights"]
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask()


def test_atomic_directory_replaces_a_whole_folder_and_drops_the_old_files(tmp_path):
    (tmp_path / "model").mkdir()
    fill(tmp_path / "model", config="old", stale="old")
    with atomic_directory(tmp_path / "model") as staging:
        fill(staging, config="new")
    assert listing(tmp_path) == ["model"]
    assert listing(tmp_path / "model") == ["config"] and (tmp_path / "model" / "config").read_text() == "new"


def test_atomic_directory_leaves_the_old_folder_when_the_block_fails(tmp_path):
    (tmp_path / "model").mkdir()
    fill(tmp_path / "model", config="old")
    with pytest.raises(RuntimeError, match="save failed"):
        with atomic_directory(tmp_path / "model") as staging:
            fill(staging, config="half")
            raise RuntimeError("save failed")
    assert listing(tmp_path) == ["model"] and (tmp_path / "model" / "config").read_text() == "old"


def test_a_kill_between_the_renames_leaves_no_folder_rather_than_a_mixed_one(tmp_path, monkeypatch):
    """The one moment neither folder is in place: after the old one was moved aside, before the new one came."""
    (tmp_path / "model").mkdir()
    fill(tmp_path / "model", config="old")
    real_replace = os.replace
    calls = []

    def replace_then_die(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as far as this folder can tell, the process stopped here
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "model") as staging:
            fill(staging, config="new")
    assert not (tmp_path / "model").exists()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.replaced-")]
    assert (aside / "config").read_text() == "old"


def test_atomic_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="model: it is not a directory"):
        with atomic_directory(tmp_path / "model"):
            pass
    assert listing(tmp_path) == ["model"]


def test_write_atomic_replaces_the_whole_file_or_leaves_it(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old, and longer than the new text")
    write_atomic(path, "new")
    assert path.read_text() == "new" and listing(tmp_path) == ["report.md"]
    monkeypatch.setattr(files.os, "fsync", lambda handle: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "newer")
    assert path.read_text() == "new" and listing(tmp_path) == ["report.md"]


def test_read_jsonl_names_the_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(ValueError, match=r"rows.jsonl, line 3: not valid JSON"):
        next(rows)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 1: expected a JSON object, got list"):
        list(read_jsonl(path))
