"""Run an analysis end to end: stream the graph, pause for review if asked, write the outputs.

The CLI, the demo and (later) the API all go through :func:`run_analysis`, so a thread started
in one can be resumed in another: the thread id and checkpointer are the only link.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.types import Command
from pydantic import BaseModel, Field

from histopilot.agents.audit import AuditLog, AuditRecord, AuditRecorder, analysis_audit, now
from histopilot.agents.context import AgentContext
from histopilot.agents.graph import compile_analysis
from histopilot.errors import HistopilotError

ProgressCallback = Callable[[str], None]
ReviewCallback = Callable[[dict[str, Any]], dict[str, Any]]


class AnalysisRun(BaseModel):
    """How a run ended: its thread, final state, and the seconds it took."""

    model_config = {"arbitrary_types_allowed": True}

    thread_id: str
    state: dict[str, Any]
    seconds: float
    audit: list[AuditRecord] = Field(
        description="The thread's audit records, this run's last (a resumed thread has several)"
    )


def run_analysis(
    slide_path: str | Path,
    context: AgentContext,
    checkpointer: BaseCheckpointSaver,
    *,
    question: str | None = None,
    thread_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_review: ReviewCallback | None = None,
) -> AnalysisRun:
    """Analyse one slide in thread ``thread_id`` (a new one when omitted or unknown).

    A thread that exists is resumed, never restarted: one paused for review goes on with the
    reviewer's decision (``on_review`` gets the interrupt's payload and returns
    ``{"approve": bool, "note": str}``), one that was cut short continues from its last
    checkpoint. A finished thread, or a thread about another slide, is refused.
    """
    started, began = time.perf_counter(), now()
    thread_id = thread_id or new_thread_id()
    slide = str(Path(slide_path).resolve())
    graph = compile_analysis(checkpointer)
    recorder = AuditRecorder()
    config = {
        "configurable": {"thread_id": thread_id},
        "recursion_limit": context.settings.recursion_limit,
        "callbacks": [recorder],
    }
    snapshot = graph.get_state(config)
    payload: Any = {"slide_path": slide, "question": question}
    if snapshot.values:
        _check_resumable(snapshot.values, snapshot.next, slide, thread_id)
        payload = None
    while True:
        if snapshot.interrupts:
            if on_review is None:
                break  # paused for review, nobody to ask: the thread waits for a later resume
            payload = Command(resume=on_review(snapshot.interrupts[0].value))
        for _namespace, mode, chunk in graph.stream(
            payload, config, context=context, stream_mode=["custom", "updates"], subgraphs=True
        ):
            if mode == "custom" and on_progress and isinstance(chunk, dict):
                on_progress(str(chunk.get("progress", chunk)))
        snapshot = graph.get_state(config)
        if not snapshot.interrupts:
            break
    seconds = time.perf_counter() - started
    log = AuditLog(checkpointer)
    record = analysis_audit(
        thread_id,
        dict(snapshot.values),
        context.provenance(),
        recorder,
        record_id=f"{thread_id}#{log.count(thread_id, 'analysis') + 1}",
        started=began,
        seconds=seconds,
    )
    log.add(record)
    audit = [r for r in log.records(thread_id) if r.thread_id == thread_id] or [record]
    return AnalysisRun(
        thread_id=thread_id, state=dict(snapshot.values), seconds=seconds, audit=audit
    )


def new_thread_id() -> str:
    return f"analysis-{uuid.uuid4().hex[:12]}"


def _check_resumable(values: dict, pending: tuple, slide: str, thread_id: str) -> None:
    known = values.get("slide")
    known_path = known.path if known is not None else values.get("slide_path")
    if known_path and str(Path(known_path).resolve()) != slide:
        raise HistopilotError(
            f"thread {thread_id} is the analysis of {known_path}, not {slide}; "
            "omit --thread to start a new analysis."
        )
    if not pending:
        raise HistopilotError(
            f"thread {thread_id} has finished; its report is in the thread's analysis.json. "
            "Omit --thread to analyse the slide again."
        )
