"""Reading evaluation sets: rows of a CSV, TSV, JSON Lines or Parquet table, keyed by id.

Public benchmarks name their columns differently, so a runner's columns can be renamed
(``--column answer=label``) instead of converting the file first, and one field can gather
several columns (``--column choices=A,B,C,D`` for option columns as SlideBench writes them).
Unusable rows are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from histopilot.errors import TrainingDataError
from histopilot.finetune.conversations import ConversionReport
from histopilot.finetune.tables import read_table


def parse_columns(pairs: Iterable[str], known: Iterable[str]) -> dict[str, str]:
    """``["answer=label", …]`` → ``{"answer": "label"}``, refusing names a runner lacks;
    ``choices=A,B,C,D`` names several columns, read into one list."""
    known = tuple(known)
    mapping = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not column or name not in known:
            raise TrainingDataError(
                f"--column {pair!r}: write NAME=COLUMN, where NAME is one of {', '.join(known)}"
            )
        mapping[name] = column
    return mapping


def read_rows(
    source: Path,
    required: Iterable[str],
    columns: dict[str, str] | None = None,
    *,
    optional: Iterable[str] = (),
    text_columns: Iterable[str] = (),
) -> tuple[dict[str, dict[str, Any]], ConversionReport]:
    """Rows of ``source`` by id (its ``id`` column, else ``#`` and the row number), with the
    runner's column names; rows whose ``text_columns`` are empty or not text, or whose id
    repeats, are skipped."""
    if not source.is_file():
        raise TrainingDataError(f"no evaluation set at {source}")
    columns = columns or {}
    required, optional, text_columns = tuple(required), tuple(optional), tuple(text_columns)
    report = ConversionReport(source=str(source), format=source.suffix.lstrip("."))
    rows: dict[str, dict[str, Any]] = {}
    named = [c for name, spec in columns.items() if name != "id" for c in spec.split(",")]
    for number, row in read_table(source, report):
        if not report.read:  # every column asked for, renamed or required, must be there
            needed = [c for name in required for c in columns.get(name, name).split(",")]
            _check_columns(source, row, list(dict.fromkeys([*needed, *named])))
        report.read += 1
        given = row.get(columns.get("id", "id"))
        key = f"#{number}" if given is None or given == "" else str(given)
        renamed = {}
        for name in (*required, *optional):
            sources = columns.get(name, name).split(",")
            if len(sources) > 1:
                renamed[name] = [row[s] for s in sources if s in row and row[s] not in ("", None)]
            elif sources[0] in row:
                renamed[name] = row[sources[0]]
        problem = _text_problem(renamed, text_columns)
        if problem:
            report.skip(key, problem)
        elif key in rows:
            report.skip(key, "duplicate id")
        else:
            rows[key] = renamed
            report.kept += 1
    return rows, report


def _text_problem(row: dict[str, Any], text_columns: tuple[str, ...]) -> str | None:
    """Why a row's text columns cannot be used, or None; numbers are turned into text."""
    for name in text_columns:
        value = row.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            row[name] = value = str(value)
        if value is not None and not isinstance(value, str):
            return f"not text: {name} holds a {type(value).__name__}"
    empty = [name for name in text_columns if not (row.get(name) or "").strip()]
    return f"empty {', '.join(empty)}" if empty else None


def _check_columns(source: Path, row: dict[str, Any], needed: list[str]) -> None:
    missing = [name for name in needed if name not in row]
    if missing:
        raise TrainingDataError(
            f"{source} has no column(s) {', '.join(missing)} (it has "
            f"{', '.join(map(str, row)) or 'none'}); rename them with --column NAME=COLUMN"
        )


def positive_number(cell: Any) -> float | None:
    """A cell read as a positive number (an mpp), or None when it is empty or is not one."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None
