"""The output folder of a cohort run, written so that any run can be killed and rerun.

Layout::

    batch.json              the task and the digest of its settings
    results/<id>.json       one per finished item: its result, input fingerprint, timings
    failed/<id>.json        the last failure of an item (removed when it later succeeds)
    analyses/<id>/          analyze: report.md, analysis.json, regions.geojson
    index/                  index: one patch index over the cohort (``histopilot search``)
    summary.csv, summary.json   every item's status in the last run

Each file is written under a temporary name and renamed into place, and an item's result is
written last, after its files and its patches: a result on disk means the item is complete.
An item is finished when its result exists and was made from the same input (path, size and
modification time, or the report's hash); a rerun skips those and does the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from histopilot import __version__
from histopilot.batch.manifest import CohortItem
from histopilot.batch.tasks import BatchOptions, Outcome
from histopilot.errors import OutputError, SearchIndexError
from histopilot.storage import atomic_file

BATCH_FILE = "batch.json"


class CohortStore:
    def __init__(self, out: Path, options: BatchOptions) -> None:
        self.out = out
        self.options = options
        self._index = None
        self._claim_folder()

    def _claim_folder(self) -> None:
        """Refuse a folder that holds something else, or another task's or setting's results."""
        marker = self.out / BATCH_FILE
        wanted = {"task": self.options.task, "settings": self.options.digest()}
        if marker.is_file():
            try:
                found = json.loads(marker.read_text("utf-8"))
            except (OSError, ValueError) as error:
                raise OutputError(f"{marker} is unreadable ({error}); use a new --out.") from error
            if {key: found.get(key) for key in wanted} != wanted:
                raise OutputError(
                    f"{self.out} holds the results of a {found.get('task')!r} run with other "
                    "settings; a cohort's results must come from one setting. Use a new --out."
                )
            return
        if self.out.is_file():
            raise OutputError(f"{self.out} is a file; choose a folder for the results.")
        if self.out.is_dir() and any(self.out.iterdir()):
            raise OutputError(
                f"{self.out} is not empty and holds no earlier batch run; choose a new folder."
            )
        _write_json(marker, wanted | {"histopilot": __version__})

    # -- reading -------------------------------------------------------------------------
    def finished(self, item: CohortItem) -> bool:
        """Whether an earlier run completed ``item`` from the same input."""
        try:
            stored = json.loads(self._result_path(item.id).read_text("utf-8"))
        except (OSError, ValueError):
            return False
        return stored.get("input") == _jsonable(item.fingerprint())

    def result(self, item_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._result_path(item_id).read_text("utf-8"))
        except (OSError, ValueError):
            return None

    # -- writing -------------------------------------------------------------------------
    def record(self, item: CohortItem, outcome: Outcome) -> None:
        """Write one item's outcome; a success replaces any earlier failure and vice versa."""
        failure = self.out / "failed" / f"{item.id}.json"
        entry = {
            "id": item.id,
            "status": outcome.status,
            "input": _jsonable(item.fingerprint()),
            "metadata": item.metadata,
            "seconds": round(outcome.seconds, 3),
            "worker": outcome.worker,
        }
        if outcome.status == "failed":
            self._result_path(item.id).unlink(missing_ok=True)
            _write_json(failure, entry | {"error": outcome.error})
            return
        if outcome.features is not None:
            self.patch_index(outcome).add_slide(outcome.features, label=item.label)
        if outcome.files:
            folder = self.out / "analyses" / item.id
            for name, text in outcome.files.items():
                with atomic_file(folder / name) as tmp:
                    tmp.write_text(text, encoding="utf-8")
        _write_json(self._result_path(item.id), entry | {"result": outcome.result})
        failure.unlink(missing_ok=True)

    def patch_index(self, outcome: Outcome):
        """The cohort's patch index, created with the first slide's encoder and dimension;
        one left inconsistent by a killed run is rebuilt from its metadata table."""
        from histopilot.retrieval.patch_index import METADATA, PatchIndex

        if self._index is None:
            path = self.out / "index"
            if not (path / METADATA).is_file():
                shutil.rmtree(path, ignore_errors=True)  # a creation cut short
                features = outcome.features
                self._index = PatchIndex.create(
                    path,
                    encoder=features.encoder,
                    dim=int(features.features.shape[1]),
                    shards=self.options.shards,
                )
            else:
                try:
                    self._index = PatchIndex.open(path)
                except SearchIndexError:
                    self._index = PatchIndex.open(path, check=False)
                    self._index.rebuild()
        return self._index

    def write_summary(self, rows: list[dict[str, Any]], totals: dict[str, Any]) -> None:
        import csv

        with atomic_file(self.out / "summary.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["id", "status", "seconds", "worker", "error"])
            writer.writeheader()
            writer.writerows({key: row.get(key) for key in writer.fieldnames} for row in rows)
        _write_json(self.out / "summary.json", totals | {"items": rows})

    def _result_path(self, item_id: str) -> Path:
        return self.out / "results" / f"{item_id}.json"


def _write_json(path: Path, value: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (so stored and fresh fingerprints compare)."""
    return json.loads(json.dumps(value))
