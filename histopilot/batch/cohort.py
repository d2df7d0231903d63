"""``run_cohort``: read the inputs, skip what is finished, run the rest, write the summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from histopilot.batch.engines import Engine, run_engine
from histopilot.batch.manifest import CohortItem, read_cohort
from histopilot.batch.store import CohortStore
from histopilot.batch.tasks import BatchOptions, Outcome
from histopilot.errors import HistopilotError

Progress = Callable[[CohortItem, Outcome], None]


class BatchSummary(BaseModel):
    """What one run did: counts by status, time, and one row per input."""

    task: str
    engine: str
    out: str
    workers: int
    done: int
    failed: int
    skipped: int
    rejected: int
    not_run: int
    seconds: float
    items_per_hour: float | None
    items: list[dict[str, Any]]


def run_cohort(
    sources: list[Path],
    options: BatchOptions,
    out: Path,
    *,
    engine: Engine = "local",
    workers: int | None = None,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    on_outcome: Progress | None = None,
) -> BatchSummary:
    """Run ``options.task`` over every slide or report in ``sources``, writing into ``out``.

    Items finished by an earlier run into ``out`` from the same input are skipped; failed and
    new ones run. If the run stops early (the cluster goes away, Ctrl-C), what finished is
    kept and the summary lists the rest as ``not run``; run the same command again to go on.

    The local engine starts its workers with ``spawn``, which imports the caller's main
    module in each worker: a script that calls this belongs under
    ``if __name__ == "__main__":``, as with any Python process pool.
    """
    started = time.perf_counter()
    cohort = read_cohort(sources, options.task)
    store = CohortStore(out, options)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for item in cohort.items:
        if store.finished(item):
            rows[item.id] = {"id": item.id, "status": "skipped", "error": None}
        else:
            rows[item.id] = {"id": item.id, "status": "not run", "error": None}
            todo.append(item)

    def record(item: CohortItem, outcome: Outcome) -> None:
        try:
            store.record(item, outcome)
        except HistopilotError as error:  # e.g. a full disk: this item fails, the run goes on
            outcome = outcome.model_copy(
                update={"status": "failed", "error": f"its result could not be saved: {error}"}
            )
            store.record(item, outcome)
        rows[item.id] = {
            "id": item.id,
            "status": outcome.status,
            "seconds": round(outcome.seconds, 3),
            "worker": outcome.worker,
            "error": outcome.error,
        }
        if on_outcome is not None:
            on_outcome(item, outcome)

    used = workers or 0
    try:
        used = run_engine(
            engine,
            todo,
            options,
            workers=workers,
            on_outcome=record,
            address=address,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )
    finally:
        store.close()
        summary = _summary(options, engine, out, used, rows, cohort.rejected, started)
        store.write_summary(summary.items, summary.model_dump(exclude={"items"}))
    return summary


def _summary(options, engine, out, workers, rows, rejected, started) -> BatchSummary:
    refused = [{"id": r.id, "status": "rejected", "error": r.reason} for r in rejected]
    items = [*rows.values(), *refused]
    count = {status: sum(1 for row in items if row["status"] == status) for status in _STATUSES}
    seconds = time.perf_counter() - started
    processed = count["done"] + count["failed"]
    return BatchSummary(
        task=options.task,
        engine=engine,
        out=str(out),
        workers=workers,
        done=count["done"],
        failed=count["failed"],
        skipped=count["skipped"],
        rejected=count["rejected"],
        not_run=count["not run"],
        seconds=round(seconds, 2),
        items_per_hour=round(3600 * processed / seconds, 1) if processed else None,
        items=items,
    )


_STATUSES = ("done", "failed", "skipped", "rejected", "not run")
