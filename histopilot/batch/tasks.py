"""What a worker does with one item: embed a slide, analyse it, or extract a report's fields.

A :class:`CohortWorker` lives in a worker process (a process of the local pool, or a Ray actor)
and loads what its task needs once, on its first item: the patch encoder, the agents' models
and resources, or the extractor. It never raises for an item: whatever goes wrong is returned
as a failed :class:`Outcome` with a message a person can act on, so one bad slide never stops
a cohort. Outcomes carry results, never write them: the driver alone writes the output folder,
so it needs no shared file system and no two processes write one file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from histopilot.batch.manifest import CohortItem, Task
from histopilot.config import HistopilotConfig, RoleConfig
from histopilot.errors import HistopilotError, first_line
from histopilot.retrieval.features import SlideFeatures

log = logging.getLogger(__name__)


class BatchOptions(BaseModel):
    """The task and everything its results depend on; sent to every worker."""

    model_config = ConfigDict(frozen=True)

    task: Task
    config: HistopilotConfig
    schema_name: str = Field("auto", description="extract: the report schema, or auto.")
    question: str | None = Field(None, description="analyze: a question for every slide.")
    agents: dict[str, Any] = Field(
        default_factory=dict, description="analyze: [agents] settings replaced for this run."
    )
    shards: int = Field(1, ge=1, le=64, description="index: shards of the cohort's patch index.")

    @field_validator("schema_name")
    @classmethod
    def _known_schema(cls, schema: str) -> str:
        from histopilot.tools.extract import SCHEMA_CHOICES
        from histopilot.tools.report.schemas import SCHEMA_ALIASES

        if schema not in SCHEMA_CHOICES and schema not in SCHEMA_ALIASES:
            choices = ", ".join([*SCHEMA_CHOICES, *SCHEMA_ALIASES])
            raise ValueError(f"--schema {schema!r} is not a schema; choose one of {choices}")
        return schema

    def digest(self) -> str:
        """A hash of the settings this task's results depend on, so one folder never mixes
        results of two settings, while a change that cannot alter them (a timeout, a server
        address, where caches live) leaves an earlier run's results usable."""
        config = self.config
        if self.task == "index":
            relevant: dict[str, Any] = {"encoder": config.encoders.patch, "shards": self.shards}
        elif self.task == "extract":
            relevant = {"extractor": _model_settings(config.roles.extractor)}
            relevant["schema"] = self.schema_name
        else:
            roles = ("orchestrator", "describer", "diagnoser", "reporter")
            agents = config.agents.model_dump(mode="json", exclude={"checkpoints", "feature_cache"})
            relevant = {
                "roles": {role: _model_settings(config.roles[role]) for role in roles},
                "encoder": config.encoders.patch,
                "agents": agents | self.agents,
                "question": self.question,
            }
        text = json.dumps({"digest": DIGEST_VERSION, "task": self.task, **relevant}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Bumped when what a digest covers changes.
DIGEST_VERSION = 1


def _model_settings(role: RoleConfig) -> dict[str, Any]:
    """What in a role's settings changes its answers (not where or how long it is asked)."""
    return role.model_dump(
        mode="json",
        include={"backend", "model", "adapter", "temperature", "top_p", "max_tokens", "seed"},
    )


class Outcome(BaseModel):
    """How one item went: its result (JSON-ready), files to write beside it, and for the
    index task the slide's embeddings."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: str
    status: Literal["done", "failed"]
    seconds: float
    worker: str
    error: str | None = None
    result: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    features: SlideFeatures | None = None


class CohortWorker:
    """One worker's models and resources, loaded on first use and kept for its items."""

    def __init__(self, options: BatchOptions) -> None:
        self.options = options
        self._loaded: dict[str, Any] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, item: CohortItem) -> Outcome:
        started = time.perf_counter()
        try:
            result, files, features = _TASKS[self.options.task](self, item)
        except Exception as error:  # recorded against the item, never raised
            if not isinstance(error, HistopilotError):
                log.exception("%s failed", item.id)
            return Outcome(
                id=item.id,
                status="failed",
                seconds=time.perf_counter() - started,
                worker=self.name,
                error=_message(error),
            )
        return Outcome(
            id=item.id,
            status="done",
            seconds=time.perf_counter() - started,
            worker=self.name,
            result=result,
            files=files,
            features=features,
        )

    def loaded(self, name: str, load) -> Any:
        if name not in self._loaded:
            self._loaded[name] = load()
        return self._loaded[name]


TaskResult = tuple[dict[str, Any], dict[str, str], SlideFeatures | None]


def _index(worker: CohortWorker, item: CohortItem) -> TaskResult:
    from histopilot.retrieval.encoders import load_encoder
    from histopilot.retrieval.features import embed_slide
    from histopilot.slide import open_slide

    encoder = worker.loaded("encoder", lambda: load_encoder(worker.options.config.encoders.patch))
    with open_slide(_slide_path(item), mpp=item.mpp) as slide:
        features = embed_slide(slide, encoder)
    features = replace(features, slide_id=item.id)  # the cohort's id names it in the index
    result = {
        "patches": len(features),
        "encoder": features.encoder,
        "dim": int(features.features.shape[1]),
        "tile_size_level0": features.size_level0,
        "mpp": features.mpp,
    }
    return result, {}, features


def _analyze(worker: CohortWorker, item: CohortItem) -> TaskResult:
    from histopilot.agents.checkpoints import open_checkpointer
    from histopilot.agents.context import AgentContext
    from histopilot.agents.outputs import (
        analysis_record,
        audit_json,
        regions_geojson,
        report_markdown,
    )
    from histopilot.agents.run import run_analysis

    options = worker.options
    shared = worker.loaded(
        "context", lambda: AgentContext.from_config(options.config, **options.agents)
    )
    path = _slide_path(item)
    try:
        with open_checkpointer("memory") as checkpointer:
            run = run_analysis(
                path,
                replace(shared, slide_mpp=item.mpp),
                checkpointer,
                question=options.question,
                thread_id=f"batch-{item.id}",
            )
    finally:
        shared.release(path)  # one slide open at a time per worker
    state = run.state
    diagnosis = state["diagnosis"]
    record = analysis_record(state, run.thread_id)
    result = {
        "assessment": state["report"].diagnosis,
        "confidence": diagnosis.confidence,
        "regions": len(state.get("regions", {})),
        "tissue_tiles": state["triage"].tiles,
        "notice": state["report"].notice,
    }
    files = {
        "report.md": report_markdown(state),
        "analysis.json": _json(record),
        "regions.geojson": _json(regions_geojson(state)),
        "audit.json": audit_json(run.audit),
    }
    return result, files, None


def _extract(worker: CohortWorker, item: CohortItem) -> TaskResult:
    from histopilot.tools.extract import configured_extractor
    from histopilot.tools.extract.batch import Failure, checked_report, iter_reports

    options = worker.options
    extractor = worker.loaded(
        "extractor", lambda: configured_extractor(options.config, options.schema_name)
    )
    if item.text is not None:
        report = checked_report(item.id, item.text)
    else:
        reports = list(itertools.islice(iter_reports([Path(item.path or "")]), 2))
        if len(reports) != 1:
            raise HistopilotError(
                f"{item.path} holds {'no report' if not reports else 'several reports'}; "
                "give one report per file, or list reports in a manifest with a 'text' column."
            )
        report = reports[0]
    if isinstance(report, Failure):
        raise HistopilotError(report.reason)
    schema, fields, warnings = extractor(report.text)
    return {"schema": schema, "fields": fields, "warnings": warnings}, {}, None


_TASKS = {"index": _index, "analyze": _analyze, "extract": _extract}


def _slide_path(item: CohortItem) -> Path:
    path = Path(item.path or "")
    if not path.exists():
        raise HistopilotError(f"no slide at {path}.")
    return path


def _message(error: Exception) -> str:
    if isinstance(error, HistopilotError):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error) or 'no message'}"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"
