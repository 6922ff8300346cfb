"""File helpers shared by training, evaluation and the doublethink reports (imports nothing of hcr).

``read_jsonl`` and ``require_fields`` so that every reader of rows names the file, line and
field of a bad one; ``atomic_path`` / ``write_atomic`` / ``atomic_directory`` so that a killed
run leaves the old file (or folder) or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path", "read_jsonl", "require_fields", "umask", "write_atomic"]


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` if the block ends without error.

    The temporary name keeps ``path``'s suffix, so writers that choose the format by it
    (``savefig``) still do.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    # created here, not by mkstemp, so that it gets the usual permissions (mkstemp's are private)
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        handle = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


@contextmanager
def atomic_directory(path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill (a model, its tokenizer); put in ``path``'s place if the block
    ends without error, else removed.

    An existing ``path`` is renamed aside, the new folder renamed in and the old one deleted: a kill
    between the two renames leaves no folder at ``path`` (the old one lies beside it, hidden), never a
    half-written one that loads. Guards against a failing or killed process, not power loss.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save into {path}: it is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; a saved folder is not
        replaced = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
        if path.exists():
            os.replace(path, replaced)
        os.replace(staging, path)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a success


def umask() -> int:
    """The process's file-mode creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``: never half-written."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def require_fields(row: dict, fields, where: str, hint: str = "") -> None:
    """A ValueError naming ``where``, the first of ``fields`` that ``row`` lacks (or holds null) and its fields."""
    for field in fields:
        if row.get(field) is None:
            present = "has no field" if field not in row else "has a null"
            raise ValueError(f"{where}: {present} {field!r}; its fields are {sorted(row)}{hint}")
