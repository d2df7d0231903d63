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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from histopilot import __version__
from histopilot.batch.manifest import CohortItem
from histopilot.batch.tasks import BatchOptions, Outcome
from histopilot.errors import OutputError, SearchIndexError
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.patch_index import METADATA, PatchIndex
from histopilot.storage import atomic_file

BATCH_FILE = "batch.json"


class CohortStore:
    def __init__(self, out: Path, options: BatchOptions) -> None:
        self.out = out
        self.options = options
        self._index: PatchIndex | None = None
        self._open = ExitStack()
        self._claim_folder()

    def close(self) -> None:
        """Save the cohort index's search structure (written once per run, not per slide)."""
        self._open.close()
        self._index = None

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
            self._forget_outputs(item.id)  # nothing of an earlier success outlives it
            _write_json(failure, entry | {"error": outcome.error})
            return
        if outcome.features is not None:
            index = self.patch_index(outcome.features)
            if index.slide_path(item.id) not in (None, outcome.features.slide_path):
                index.remove_slides([item.id])  # the manifest moved this id to another file
            index.add_slide(outcome.features, label=item.label)
        if outcome.files:
            folder = self.out / "analyses" / item.id
            for name, text in outcome.files.items():
                with atomic_file(folder / name) as tmp:
                    tmp.write_text(text, encoding="utf-8")
        _write_json(self._result_path(item.id), entry | {"result": outcome.result})
        failure.unlink(missing_ok=True)

    def _forget_outputs(self, item_id: str) -> None:
        shutil.rmtree(self.out / "analyses" / item_id, ignore_errors=True)
        if self.options.task == "index" and (self.out / "index").is_dir():
            index = self._open_index()
            if index is not None and index.slide_path(item_id) is not None:
                index.remove_slides([item_id])

    def patch_index(self, features: SlideFeatures) -> PatchIndex:
        """The cohort's patch index, created with the first slide's encoder and dimension."""
        index = self._open_index()
        if index is None:
            shutil.rmtree(self.out / "index", ignore_errors=True)  # a creation cut short
            index = self._hold(
                PatchIndex.create(
                    self.out / "index",
                    encoder=features.encoder,
                    dim=int(features.features.shape[1]),
                    shards=self.options.shards,
                )
            )
        return index

    def _open_index(self) -> PatchIndex | None:
        """The index as the last run left it; one whose search structure a killed run left
        behind its table is rebuilt from the table."""
        if self._index is None and (self.out / "index" / METADATA).is_file():
            try:
                opened = PatchIndex.open(self.out / "index")
            except SearchIndexError:
                opened = PatchIndex.open(self.out / "index", check=False)
                opened.rebuild()
            self._hold(opened)
        return self._index

    def _hold(self, index: PatchIndex) -> PatchIndex:
        self._index = self._open.enter_context(index.deferred_saving())
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
