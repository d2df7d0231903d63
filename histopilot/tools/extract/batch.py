"""Extraction over many reports: inputs in, one record per report written as it finishes.

Inputs are text files, folders of them, or JSON lines with a ``text`` field (the record keeps
its ``report_id`` or ``id``). Output is JSON lines or CSV, appended record by record, so an
interrupted run keeps what it finished and a rerun skips the ids already written. A record that
cannot be read or extracted is reported with its id and skipped; the batch goes on.
"""

from __future__ import annotations

import csv
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from histopilot.errors import HistopilotError, ModelUnavailableError, OutputError, ReportInputError
from histopilot.tools.report.document import ExtractionRecord
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


def iter_reports(inputs: list[Path], *, skip: Path | None = None) -> Iterator[ReportText | Failure]:
    """Every report in ``inputs``, in order; unreadable ones as a :class:`Failure`.

    A text file's id is its path inside the folder given, without the suffix (``a/r`` for
    ``reports/a/r.txt``), or its stem when the file itself was given. ``skip`` (the output
    file) is never read as input.
    """
    skip = skip.resolve() if skip is not None else None
    for path in inputs:
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl") and p.resolve() != skip
            )
            if not files:
                yield Failure(id=str(path), reason="the folder holds no .txt, .md or .jsonl files")
            for file in files:
                yield from _read_file(file, file.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            if path.resolve() != skip:
                yield from _read_file(path, path.stem)
        else:
            yield Failure(id=str(path), reason="no such file or folder")


def _read_file(path: Path, ident: str) -> Iterator[ReportText | Failure]:
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path)
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        yield Failure(id=ident, reason=f"cannot read it ({error.strerror})")
        return
    yield checked_report(ident, text)


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
            yield checked_report(ident, item["text"])


def checked_report(ident: str, text: str) -> ReportText | Failure:
    """The report, or why it is refused (empty, or too long to be one report)."""
    if not text.strip():
        return Failure(id=ident, reason="the report is empty")
    if len(text) > MAX_REPORT_CHARS:
        return Failure(
            id=ident,
            reason=f"{len(text):,} characters; reports over {MAX_REPORT_CHARS:,} are refused",
        )
    return ReportText(id=ident, text=text)


CSV_HEADER = ["id", "schema", *FIELDS, *(f"{name}_span" for name in FIELDS)]


class RecordWriter:
    """Appends records to a .jsonl or .csv file, and knows which ids it already holds.

    A line cut short by an interrupted run is removed before anything is appended, so that
    record is done again and the next one starts on a line of its own. A CSV must have been
    written by us (same header), or it is refused rather than appended to.
    """

    def __init__(self, path: Path) -> None:
        if path.suffix.lower() not in (".jsonl", ".csv"):
            raise ReportInputError(f"--out must end in .jsonl or .csv, not {path.name!r}")
        if path.is_dir():
            raise ReportInputError(f"--out {path} is a folder; give a .jsonl or .csv file path")
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_cut_line()
        self.done = self._written_ids()
        new = not path.exists() or path.stat().st_size == 0
        try:
            self._file = path.open("a", encoding="utf-8", newline="")
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror}") from error
        self._csv = csv.writer(self._file) if self.csv else None
        if self._csv is not None and new:
            self._csv.writerow(CSV_HEADER)

    def _drop_cut_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with self.path.open("r+b") as existing:
                existing.truncate(keep)

    def _written_ids(self) -> set[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        with self.path.open(encoding="utf-8", errors="replace", newline="") as existing:
            if not self.csv:
                return {
                    record["id"]
                    for line in existing
                    if isinstance(record := _json_or_none(line), dict) and "id" in record
                }
            rows = csv.reader(existing)
            if next(rows, None) != CSV_HEADER:
                raise ReportInputError(
                    f"{self.path} exists and is not a histopilot extraction CSV (its header "
                    "differs); choose another --out, or move the file away"
                )
            return {row[0] for row in rows if len(row) == len(CSV_HEADER)}

    def write(self, record: ExtractionRecord) -> None:
        if self._csv is not None:
            fields = record.fields
            values = [_cell(fields.get(name, {}).get("value")) for name in FIELDS]
            spans = [_cell(fields.get(name, {}).get("span")) for name in FIELDS]
            self._csv.writerow([record.id, record.schema_name, *values, *spans])
        else:
            line = json.dumps(record.model_dump(by_alias=True), ensure_ascii=False)
            self._file.write(line + "\n")
        self._file.flush()
        self.done.add(record.id)

    def close(self) -> None:
        self._file.close()


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


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
    """(written, skipped as already done, failures).

    Reports are read as they are needed and at most ``concurrency`` run at once (useful against
    a server; the rules gain nothing from it), with a few more queued, so a batch of any size
    keeps little in memory. Records are written in input order as soon as they and every
    earlier one are done. ``on_done`` is called once per input record, whatever became of it.
    """
    failures: list[Failure] = []
    written = skipped = 0
    queued: deque[Future] = deque()

    def one(report: ReportText) -> ExtractionRecord | Failure:
        try:
            schema, fields, warnings = extractor(report.text)
        except ModelUnavailableError:
            raise  # the server is gone: every later record would fail the same way
        except HistopilotError as error:
            return Failure(id=report.id, reason=str(error)[:300])
        except Exception as error:  # noqa: BLE001 - one record's failure must not end the batch
            return Failure(id=report.id, reason=f"{type(error).__name__}: {str(error)[:300]}")
        return ExtractionRecord(id=report.id, schema=schema, fields=fields, warnings=warnings)

    def finish(future: Future) -> None:
        nonlocal written
        result = future.result()
        if isinstance(result, Failure):
            failures.append(result)
        else:
            writer.write(result)
            written += 1

    def tick() -> None:
        if on_done:
            on_done()

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        seen: set[str] = set()
        for item in iter_reports(inputs, skip=writer.path):
            if isinstance(item, ReportText) and item.id in seen:
                item = Failure(id=item.id, reason="an earlier record has the same id")
            if isinstance(item, Failure) or item.id in writer.done:
                if isinstance(item, Failure):
                    failures.append(item)
                else:
                    skipped += 1
                tick()
                continue
            seen.add(item.id)
            queued.append(pool.submit(one, item))
            while len(queued) > 2 * max(1, concurrency) or (queued and queued[0].done()):
                finish(queued.popleft())
                tick()
        while queued:
            finish(queued.popleft())
            tick()
    return written, skipped, failures
