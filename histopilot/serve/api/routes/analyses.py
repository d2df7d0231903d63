"""Analyses as background jobs: start, list, poll or stream, then fetch what they wrote."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from histopilot.agents.audit import AuditLog, AuditTrail
from histopilot.serve.api.registry import FINISHED, AnalysisRecord
from histopilot.serve.api.state import ConflictError, NotFoundError, ServerState, State, User
from histopilot.tools.report import load_report, render
from histopilot.tools.report.render import ReportFormat

router = APIRouter(prefix="/v1/analyses", tags=["analyses"])
POLL_SECONDS = 0.25


class AnalysisRequest(BaseModel):
    slide: str = Field(description="Slide id or name (GET /v1/slides).")
    question: str | None = Field(None, max_length=2000)
    budget: int | None = Field(None, ge=1, le=500)
    trajectories: int | None = Field(None, ge=1, le=32)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stain: str | None = Field(
        None, max_length=200, description="he, ihc or the markers (ER, 'ER,PR'); default: estimated"
    )


class AnalysisList(BaseModel):
    data: list[AnalysisRecord]


_REPORT_TYPES = {
    ReportFormat.md: "text/markdown; charset=utf-8",
    ReportFormat.html: "text/html; charset=utf-8",
    ReportFormat.json: "application/json",
    ReportFormat.fhir: "application/fhir+json",
}


@router.post("", status_code=202)
def start_analysis(body: AnalysisRequest, state: State, user: User) -> AnalysisRecord:
    """Queue a full analysis of a slide; poll it, or stream ``/events``, until it is done."""
    slide = state.catalog.find(body.slide)
    settings = body.model_dump(
        include={"budget", "trajectories", "seed", "stain"}, exclude_none=True
    )
    return state.jobs.start(user, slide, body.question, settings)


@router.get("")
def list_analyses(state: State, user: User) -> AnalysisList:
    return AnalysisList(data=state.registry.analyses(user))


@router.get("/{analysis_id}")
def analysis_status(analysis_id: str, state: State, user: User) -> AnalysisRecord:
    return _own(state, user, analysis_id)


@router.get(
    "/{analysis_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def analysis_events(analysis_id: str, state: State, user: User) -> StreamingResponse:
    """Server-sent events: ``progress`` (one agent step each) until a final ``status``."""
    _own(state, user, analysis_id)

    async def events() -> AsyncIterator[str]:
        sent = 0
        while True:
            record = await run_in_threadpool(_own, state, user, analysis_id)
            for line in record.progress[sent:]:
                yield f"event: progress\ndata: {json.dumps(line)}\n\n"
            sent = len(record.progress)
            if record.status in FINISHED:
                yield f"event: status\ndata: {record.model_dump_json()}\n\n"
                return
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/{analysis_id}/audit")
async def analysis_audit(analysis_id: str, state: State, user: User) -> AuditTrail:
    """What the analysis ran: models and revisions, prompts, steps, regions, timings, and what
    the guardrails withheld."""

    def read() -> AuditTrail:
        _own(state, user, analysis_id)
        records = AuditLog(state.checkpointer).records(analysis_id)
        return AuditTrail(records=[r for r in records if r.thread_id == analysis_id])

    return await run_in_threadpool(read)


@router.get("/{analysis_id}/report", response_class=Response)
async def analysis_report(
    analysis_id: str,
    state: State,
    user: User,
    format: Annotated[ReportFormat, Query(description="md, html, json or fhir")] = ReportFormat.md,
) -> Response:
    """The report: the full draft in Markdown, or the synoptic report as HTML, JSON or FHIR."""
    folder = await run_in_threadpool(_finished_folder, state, user, analysis_id)
    if format is ReportFormat.md:
        text = (folder / "report.md").read_text(encoding="utf-8")
    else:
        text = await run_in_threadpool(
            lambda: render(load_report(folder / "analysis.json"), format.value)
        )
    headers = {"Content-Disposition": f'inline; filename="{analysis_id}-report.{format.value}"'}
    if format is ReportFormat.html:  # self-contained: inline styles, nothing else
        headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return Response(text, media_type=_REPORT_TYPES[format], headers=headers)


@router.get("/{analysis_id}/overlay", response_class=FileResponse)
def analysis_overlay(analysis_id: str, state: State, user: User) -> FileResponse:
    """The thumbnail with tissue outline, importance map and numbered regions (PNG)."""
    return FileResponse(_finished_folder(state, user, analysis_id) / "overlay.png")


@router.get("/{analysis_id}/regions")
def analysis_regions(analysis_id: str, state: State, user: User) -> Response:
    """The regions examined as GeoJSON (level-0 pixels; opens as annotations in QuPath)."""
    path = _finished_folder(state, user, analysis_id) / "regions.geojson"
    return Response(path.read_bytes(), media_type="application/geo+json")


def _own(state: ServerState, user: str, analysis_id: str) -> AnalysisRecord:
    record = state.registry.analysis(user, analysis_id)
    if record is None:
        raise NotFoundError(f"no analysis {analysis_id!r}.")
    return record


def _finished_folder(state: ServerState, user: str, analysis_id: str) -> Path:
    record = _own(state, user, analysis_id)
    if record.status != "done":
        raise ConflictError(
            f"analysis {analysis_id} is {record.status}"
            + (f": {record.error}" if record.error else "; its outputs come when it is done.")
        )
    return state.jobs.folder_of(analysis_id)
