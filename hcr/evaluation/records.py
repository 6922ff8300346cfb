"""``results.jsonl`` and ``summary.json``: append-as-you-go records, crash-tolerant reading, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

from hcr.files import write_atomic  # re-exported: the runner writes its files with it

__all__ = ["RECORD_FIELDS", "RecordWriter", "format_summary", "read_records", "summarize", "write_atomic"]

RECORD_FIELDS = ("index", "question", "gold", "prediction", "correct", "rule", "output_tokens", "compressions",
                 "peak_cache", "seconds", "output")


def read_records(path, *, repair: bool = False) -> list[dict]:
    """The records of a results file (none if it does not exist).

    A last line without its newline is what a crash mid-write leaves: it is ignored
    (its item is evaluated again) and, with ``repair``, cut off so that appending
    goes on from a clean line. Any other unreadable line is an error naming it.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if repair and complete < len(data):
        with path.open("r+b") as file:
            file.truncate(complete)
    records = []
    for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); "
                             f"fix or remove the line, or evaluate into a new --out") from None
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            raise ValueError(f"{path}, line {number}: not a result record (no integer 'index')")
        records.append(record)
    return records


class RecordWriter:
    """Appends records to a jsonl file, one line each, flushed: a crash loses at most the line being written."""

    def __init__(self, path):
        self.path = Path(path)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                file.flush()


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], settings: dict) -> dict:
    """The numbers of an evaluation: accuracy, output length, peak cache, compressions, time; and its settings."""
    rules: dict[str, int] = {}
    for record in records:
        rules[record["rule"]] = rules.get(record["rule"], 0) + 1
    correct = sum(bool(r["correct"]) for r in records)
    return {
        "items": len(records),
        "correct": correct,
        "accuracy": correct / len(records) if records else None,
        "mean_output_tokens": _mean(r["output_tokens"] for r in records),
        "mean_peak_cache": _mean(r["peak_cache"] for r in records),
        "max_peak_cache": max((r["peak_cache"] for r in records), default=None),
        "mean_compressions": _mean(r["compressions"] for r in records),
        "seconds_per_item": _mean(r["seconds"] for r in records),
        "rules": dict(sorted(rules.items())),
        "settings": settings,
    }


def format_summary(summary: dict) -> str:
    """A small table of the summary, for the terminal."""

    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("items", str(summary["items"])),
        ("accuracy", f"{number(summary['accuracy'], 3)} ({summary['correct']}/{summary['items']})"),
        ("mean output tokens", number(summary["mean_output_tokens"], 1)),
        ("peak cache (mean / max)", f"{number(summary['mean_peak_cache'], 1)} / {summary['max_peak_cache']}"),
        ("mean compressions", number(summary["mean_compressions"])),
        ("seconds per item", number(summary["seconds_per_item"], 3)),
        ("answers found by", ", ".join(f"{rule} {count}" for rule, count in summary["rules"].items()) or "-"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
