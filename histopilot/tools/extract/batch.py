"""Extraction over many reports: inputs in, one record per report written as it finishes.

Inputs are text files, folders of them, or JSON lines with a ``text`` field (the record keeps
its ``report_id`` or ``id``). Output is JSON lines or CSV, appended record by record, so an
interrupted run keeps what it finished and a rerun skips the ids already written. A record that
cannot be read or extracted is reported with its id and skipped; the batch goes on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from histopilot.errors import HistopilotError, ModelUnavailableError, ReportInputError
from histopilot.tools.report.schemas import FIELDS

TEXT_SUFFIXES = (".txt", ".text", ".md")
#: Reports longer than this are refused: a pathology report is a few pages, not a book.
MAX_REPORT_CHARS = 200_000


class ReportText(BaseModel):
    id: str
    text: str


class Failure(BaseModel):
    id: str
    reason: str


Extractor = Callable[[str], tuple[str, dict[str, dict[str, Any]], list[str]]]
"""text → (schema name, flat fields, warnings)."""


def iter_reports(inputs: list[Path]) -> Iterator[ReportText | Failure]:
    """Every report in ``inputs``, in order; unreadable ones as a :class:`Failure`."""
    for path in inputs:
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl")
            )
            if not files:
                yield Failure(id=str(path), reason="the folder holds no .txt, .md or .jsonl files")
            for file in files:
                yield from _read_file(file)
        elif path.is_file():
            yield from _read_file(path)
        else:
            yield Failure(id=str(path), reason="no such file or folder")


def _read_file(path: Path) -> Iterator[ReportText | Failure]:
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path)
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        yield Failure(id=str(path), reason=f"cannot read it ({error.strerror})")
        return
    yield _checked(path.stem, text)


def _read_jsonl(path: Path) -> Iterator[ReportText | Failure]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fallback = f"{path.name}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                yield Failure(id=fallback, reason=f"not JSON ({error.msg})")
                continue
            if not isinstance(item, dict):
                yield Failure(
                    id=fallback, reason="a line must be a JSON object with a 'text' field"
                )
                continue
            ident = str(item.get("report_id") or item.get("id") or fallback)
            if not isinstance(item.get("text"), str):
                yield Failure(id=ident, reason="no 'text' field with the report as a string")
                continue
            yield _checked(ident, item["text"])


def _checked(ident: str, text: str) -> ReportText | Failure:
    if not text.strip():
        return Failure(id=ident, reason="the report is empty")
    if len(text) > MAX_REPORT_CHARS:
        return Failure(
            id=ident,
            reason=f"{len(text):,} characters; reports over {MAX_REPORT_CHARS:,} are refused",
        )
    return ReportText(id=ident, text=text)


class RecordWriter:
    """Appends records to a .jsonl or .csv file, and knows which ids it already holds."""

    def __init__(self, path: Path) -> None:
        if path.suffix.lower() not in (".jsonl", ".csv"):
            raise ReportInputError(f"--out must end in .jsonl or .csv, not {path.name!r}")
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        self.done = self._written_ids()
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file) if self.csv else None
        if self._csv is not None and new:
            self._csv.writerow(["id", "schema", *FIELDS, *(f"{f}_span" for f in FIELDS)])

    def _written_ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        done = set()
        with self.path.open(encoding="utf-8", errors="replace", newline="") as existing:
            if self.csv:
                done = {row["id"] for row in csv.DictReader(existing) if row.get("id")}
            else:
                for line in existing:
                    try:
                        done.add(json.loads(line)["id"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted run is redone
        return done

    def write(self, record: dict[str, Any]) -> None:
        if self._csv is not None:
            fields = record["fields"]
            values = [_cell(fields.get(f, {}).get("value")) for f in FIELDS]
            spans = [_cell(fields.get(f, {}).get("span")) for f in FIELDS]
            self._csv.writerow([record["id"], record["schema"], *values, *spans])
        else:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(record["id"])

    def close(self) -> None:
        self._file.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return f"{value[0]}-{value[1]}"
    return str(value)


def run_batch(
    inputs: list[Path],
    extractor: Extractor,
    writer: RecordWriter,
    *,
    concurrency: int = 1,
    on_done: Callable[[], None] | None = None,
) -> tuple[int, int, list[Failure]]:
    """(written, skipped as already done, failures). Records are written as they finish;
    ``concurrency`` requests run at once (useful against a server, not for the rules)."""
    failures: list[Failure] = []
    pending = []
    skipped = 0
    for item in iter_reports(inputs):
        if isinstance(item, Failure):
            failures.append(item)
        elif item.id in writer.done:
            skipped += 1
        else:
            pending.append(item)
    written = 0

    def one(report: ReportText) -> dict[str, Any] | Failure:
        try:
            schema, fields, warnings = extractor(report.text)
        except ModelUnavailableError:
            raise
        except (HistopilotError, ValidationError, ValueError) as error:
            return Failure(id=report.id, reason=str(error)[:300])
        return {"id": report.id, "schema": schema, "fields": fields, "warnings": warnings}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for result in pool.map(one, pending):
            if isinstance(result, Failure):
                failures.append(result)
            else:
                writer.write(result)
                written += 1
            if on_done:
                on_done()
    return written, skipped, failures
