"""Reading the tables and image cells training data comes in: CSV, TSV, JSON Lines, JSON and
Parquet rows, and image cells that are paths (kept inside their folder) or embedded bytes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from histopilot.errors import TrainingDataError
from histopilot.finetune.conversations import ConversionReport, check_image
from histopilot.storage import atomic_file


class ImageCells:
    """Resolves a record's image cell (a path, or embedded bytes) to a usable image file.

    Paths are taken relative to ``root`` and must stay inside it; embedded bytes are written
    once, under their hash, to ``out/images``.
    """

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out = root.resolve(), out.resolve()
        self._checked: dict[Path, str | None] = {}

    def resolve(self, cell: Any) -> tuple[Path | None, str | None]:
        """(absolute image path, None) or (None, why the image cannot be used)."""
        if isinstance(cell, dict) and cell.get("bytes"):
            if not isinstance(cell["bytes"], bytes):
                return None, "unreadable image: embedded 'bytes' are not bytes"
            return self._write_bytes(cell["bytes"])
        if isinstance(cell, dict):
            cell = cell.get("path")
        if not isinstance(cell, str) or not cell.strip():
            return None, "missing image: no image named"
        candidate = (self.root / cell.strip()).resolve()
        if not candidate.is_relative_to(self.root):
            return None, f"image outside the image folder: {cell.strip()}"
        if candidate not in self._checked:  # a VQA table asks many questions of one image
            self._checked[candidate] = check_image(candidate)
        problem = self._checked[candidate]
        return (None, problem) if problem else (candidate, None)

    def path(self, cell: Any) -> tuple[str | None, str | None]:
        """Like :meth:`resolve`, relative to ``out`` (where the dataset file is written)."""
        found, problem = self.resolve(cell)
        return (os.path.relpath(found, self.out) if found else None), problem

    def _write_bytes(self, data: bytes) -> tuple[Path | None, str | None]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                suffix = "." + (image.format or "png").lower()
        except Image.DecompressionBombError:
            return None, "image too large: embedded bytes"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
            return None, f"unreadable image: embedded bytes ({error})"
        target = self.out / "images" / f"{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
        if not target.exists():
            with atomic_file(target) as tmp:
                tmp.write_bytes(data)
        return target, None


def json_items(source: Path, report: ConversionReport) -> Iterator[tuple[int, Any]]:
    """Items of a JSON list, or lines of a JSON Lines file (a broken line is reported)."""
    text = source.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise TrainingDataError(f"{source} is not valid JSON: {error}") from error
        yield from enumerate(items, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            report.read += 1
            report.skip(number, "broken JSON")


# -- tables -----------------------------------------------------------------------------------
def read_table(source: Path, report: ConversionReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of a CSV, TSV, JSON Lines or Parquet table; broken JSON lines are
    added to ``report``."""
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with source.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            yield from enumerate(reader, start=2)
    elif suffix == ".parquet":
        import pyarrow.parquet as parquet

        try:
            table = parquet.read_table(source)
        except Exception as error:
            raise TrainingDataError(f"{source} is not a readable Parquet file: {error}") from error
        for number, batch_row in enumerate(table.to_pylist(), start=1):
            yield number, batch_row
    elif suffix in (".jsonl", ".json"):
        for number, item in json_items(source, report):
            yield number, item if isinstance(item, dict) else {}
    else:
        raise TrainingDataError(
            f"{source}: tables are read from .csv, .tsv, .jsonl, .json or .parquet files"
        )


def table_rows(
    source: Path, report: ConversionReport, columns: tuple[str, ...]
) -> Iterator[tuple[int, dict]]:
    checked = False
    for number, row in read_table(source, report):
        if not checked:
            missing = [name for name in columns if name not in row]
            if missing:
                raise TrainingDataError(
                    f"{source} has no column(s) {', '.join(missing)} (it has "
                    f"{', '.join(map(str, row)) or 'none'}); name them with the column options"
                )
            checked = True
        report.read += 1
        yield number, row
