"""``POST /v1/extract``: structured fields, each with its text span, from free-text reports."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, model_validator

from histopilot.errors import HistopilotError
from histopilot.serve.api.state import State, User
from histopilot.tools.extract import SCHEMA_CHOICES
from histopilot.tools.report.document import EXTRACTION_NOTICE
from histopilot.tools.report.schemas import SCHEMA_ALIASES

router = APIRouter(prefix="/v1", tags=["extraction"])
MAX_REPORT_CHARS = 200_000


class ReportIn(BaseModel):
    id: str | None = Field(None, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_REPORT_CHARS)


class ExtractionRequest(BaseModel):
    """One report (``text``) or many (``reports``)."""

    text: str | None = Field(None, min_length=1, max_length=MAX_REPORT_CHARS)
    reports: list[ReportIn] | None = Field(None, min_length=1, max_length=100)
    schema_name: str = Field(
        "auto", alias="schema", description="A site schema, or 'auto' to detect the organ."
    )

    @model_validator(mode="after")
    def _one_form(self) -> ExtractionRequest:
        if (self.text is None) == (self.reports is None):
            raise ValueError("give either 'text' (one report) or 'reports' (a list), not both")
        return self


class ExtractionResult(BaseModel):
    id: str | None
    schema_name: str = Field(serialization_alias="schema")
    fields: dict[str, dict[str, Any]]
    warnings: list[str]


class ExtractionResponse(BaseModel):
    results: list[ExtractionResult]
    notice: str = EXTRACTION_NOTICE


@router.post("/extract", response_model_by_alias=True)
async def extract(body: ExtractionRequest, state: State, _user: User) -> ExtractionResponse:
    if body.schema_name not in SCHEMA_CHOICES and body.schema_name not in SCHEMA_ALIASES:
        raise HistopilotError(
            f"schema {body.schema_name!r} is not one histopilot knows; choose one of "
            f"{', '.join([*SCHEMA_CHOICES, *SCHEMA_ALIASES])}."
        )
    reports = body.reports or [ReportIn(text=body.text or "")]

    def run() -> ExtractionResponse:
        results = []
        for report in reports:
            schema, fields, warnings = state.extractor(report.text, body.schema_name)
            results.append(
                ExtractionResult(id=report.id, schema_name=schema, fields=fields, warnings=warnings)
            )
        return ExtractionResponse(results=results)

    return await run_in_threadpool(run)
