"""What a cohort run is given: slides or reports, from a manifest table, a folder or files.

A manifest is a CSV, TSV, JSON Lines or Parquet table with one row per slide (``path`` or
``slide``; optional ``id``, ``mpp`` and ``label``) or per report (``path`` or ``report`` to a
text file, or the report itself in ``text``). Other columns are kept as the item's metadata
and copied into its result. Relative paths are read from the manifest's folder.

Every item has an id, which names its result files, so ids are checked here: letters, digits,
``.``, ``_`` and ``-`` only (no path can be smuggled through an id), and unique. Rows that
cannot become items are returned as :class:`Rejected` with the reason; the run reports them.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from histopilot.errors import HistopilotError, TrainingDataError
from histopilot.finetune.conversations import ConversionReport
from histopilot.finetune.tables import read_table
from histopilot.retrieval.features import slide_id_of
from histopilot.slide.readers import WHOLE_SLIDE_SUFFIXES
from histopilot.tools.extract.batch import TEXT_SUFFIXES

Task = Literal["index", "analyze", "extract"]
TASKS: tuple[Task, ...] = ("index", "analyze", "extract")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
#: Files a folder of slides is searched for (TIFF too: many slides are plain or OME-TIFF).
SLIDE_SUFFIXES = tuple(sorted(WHOLE_SLIDE_SUFFIXES | {".tif", ".tiff"}))
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_PATH_COLUMNS = {
    "index": ("path", "slide"),
    "analyze": ("path", "slide"),
    "extract": ("path", "report"),
}
_KNOWN = {"id", "path", "slide", "report", "text", "mpp", "label"}


class CohortItem(BaseModel):
    """One slide or report of the cohort."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: str | None = None  # absolute path of the slide or report file
    text: str | None = None  # a report given in the manifest itself
    mpp: float | None = None  # µm/px, for slides that do not declare it
    label: str | None = None  # stored with an indexed slide's patches
    metadata: dict[str, str | int | float | bool | None] = {}

    def fingerprint(self) -> dict[str, Any]:
        """What the item's result depends on, so a rerun redoes an item whose input changed
        (a rescanned slide, an edited report) and skips the rest."""
        seen: dict[str, Any] = {"mpp": self.mpp, "label": self.label}
        if self.text is not None:
            return seen | {"text_sha256": hashlib.sha256(self.text.encode()).hexdigest()}
        path = Path(self.path or "")
        try:
            stat = path.stat()
        except OSError:
            return seen | {"path": self.path, "missing": True}
        return seen | {"path": self.path, "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}


class Rejected(BaseModel):
    """An input that could not become an item, and why."""

    id: str
    reason: str


class Cohort(BaseModel):
    items: list[CohortItem]
    rejected: list[Rejected]


def read_cohort(sources: list[Path], task: Task) -> Cohort:
    """The items of ``sources`` (manifests, folders, slide or report files), in order."""
    if not sources:
        raise HistopilotError("give at least one manifest, folder, slide or report.")
    items: list[CohortItem] = []
    rejected: list[Rejected] = []
    owners: dict[str, str] = {}  # by case-folded id: results/A.json and a.json are one file
    for source in sources:  # on case-insensitive file systems
        for entry in _entries(source, task):
            key = entry.id.casefold()
            if isinstance(entry, Rejected):
                rejected.append(entry)
            elif key in owners:
                rejected.append(
                    Rejected(id=entry.id, reason=f"the id is already used by {owners[key]}")
                )
            else:
                owners[key] = entry.path or f"the row of {entry.id!r}"
                items.append(entry)
    return Cohort(items=items, rejected=rejected)


def _entries(source: Path, task: Task) -> Iterator[CohortItem | Rejected]:
    if source.is_dir():
        suffixes = TEXT_SUFFIXES if task == "extract" else SLIDE_SUFFIXES
        files = sorted(p for p in source.iterdir() if p.is_file() and _has_suffix(p, suffixes))
        if not files:
            kind = "report (.txt, .md)" if task == "extract" else "slide"
            raise HistopilotError(f"{source} holds no {kind} files.")
        for file in files:
            yield _item(_id_of(file, task), {}, file, task)
    elif source.is_file() and source.suffix.lower() in TABLE_SUFFIXES:
        yield from _manifest_rows(source, task)
    elif source.exists():
        yield _item(_id_of(source, task), {}, source, task)
    else:
        raise HistopilotError(f"no manifest, folder, slide or report at {source}.")


def _manifest_rows(manifest: Path, task: Task) -> Iterator[CohortItem | Rejected]:
    report = ConversionReport(source=str(manifest), format=manifest.suffix.lstrip("."))
    accepted = (*_PATH_COLUMNS[task], *(("text",) if task == "extract" else ()))
    checked = False
    try:
        for number, row in read_table(manifest, report):
            if not checked and not any(column in row for column in accepted):
                raise HistopilotError(
                    f"the manifest {manifest} needs a column {' or '.join(map(repr, accepted))} "
                    f"(it has {', '.join(map(repr, row)) or 'none'})."
                )
            checked = True
            yield _row_item(row, number, manifest.parent, task)
    except TrainingDataError as error:
        raise HistopilotError(str(error).replace("training data", "manifest")) from error
    except csv.Error as error:  # e.g. a cell longer than the CSV reader takes
        raise HistopilotError(
            f"the manifest {manifest} is not readable as CSV ({error}); give long reports as "
            "files (a 'path' column) or in JSON lines."
        ) from error
    for skipped in report.skipped:
        yield Rejected(id=f"{manifest.name}:{skipped.record}", reason=skipped.reason)


def _row_item(row: dict[str, Any], number: int, folder: Path, task: Task) -> CohortItem | Rejected:
    given = next((row[c] for c in _PATH_COLUMNS[task] if _present(row.get(c))), None)
    text = row.get("text") if task == "extract" else None
    ident = str(row["id"]).strip() if _present(row.get("id")) else None
    if given is None and not _present(text):
        reason = "the row names no file" + (" and holds no text" if task == "extract" else "")
        return Rejected(id=ident or f"row {number}", reason=reason)
    if given is not None and not isinstance(given, str):
        return Rejected(id=ident or f"row {number}", reason=f"the path {given!r} is not text")
    path = (folder / given).resolve() if given is not None else None
    if ident is None:
        if path is None:
            return Rejected(id=f"row {number}", reason="a report given as text needs an 'id'")
        ident = _id_of(path, task)
    metadata = {str(key): _scalar(value) for key, value in row.items() if key not in _KNOWN}
    if path is None:
        return _checked(CohortItem(id=ident, text=str(text), metadata=metadata))
    return _item(ident, row, path, task, metadata)


def _item(
    ident: str, row: dict[str, Any], path: Path, task: Task, metadata: dict | None = None
) -> CohortItem | Rejected:
    mpp = row.get("mpp")
    if _present(mpp):
        try:
            mpp = float(mpp)
        except (TypeError, ValueError):
            mpp = -1.0
        if not 0 < mpp < 100:
            return Rejected(id=ident, reason=f"mpp {row['mpp']!r} is not a resolution in µm/px")
    label = row.get("label")
    return _checked(
        CohortItem(
            id=ident,
            path=str(path.resolve()),
            mpp=mpp if _present(mpp) and task != "extract" else None,
            label=str(label).strip() if _present(label) and task == "index" else None,
            metadata=metadata or {},
        )
    )


def _checked(item: CohortItem) -> CohortItem | Rejected:
    if not _ID.fullmatch(item.id):
        return Rejected(
            id=item.id[:80],
            reason="an id is 1-200 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it names the item's result files)",
        )
    return item


def _id_of(path: Path, task: Task) -> str:
    return path.stem if task == "extract" else slide_id_of(path)


def _scalar(value: Any) -> str | int | float | bool | None:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)
