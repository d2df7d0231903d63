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
from pydantic import BaseModel

from histopilot.agents.context import AgentContext
from histopilot.agents.graph import compile_analysis

ProgressCallback = Callable[[str], None]
ReviewCallback = Callable[[dict[str, Any]], dict[str, Any]]


class AnalysisRun(BaseModel):
    """How a run ended: its thread, final state, and the seconds it took."""

    model_config = {"arbitrary_types_allowed": True}

    thread_id: str
    state: dict[str, Any]
    seconds: float


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
    """Analyse one slide. With review on, ``on_review`` gets the interrupt's payload and
    returns the reviewer's decision (``{"approve": bool, "note": str}``)."""
    started = time.perf_counter()
    thread_id = thread_id or f"analysis-{uuid.uuid4().hex[:12]}"
    graph = compile_analysis(checkpointer)
    config = {
        "configurable": {"thread_id": thread_id},
        "recursion_limit": context.settings.recursion_limit,
    }
    payload: Any = {"slide_path": str(Path(slide_path).resolve()), "question": question}
    while True:
        for _namespace, mode, chunk in graph.stream(
            payload, config, context=context, stream_mode=["custom", "updates"], subgraphs=True
        ):
            if mode == "custom" and on_progress and isinstance(chunk, dict):
                on_progress(str(chunk.get("progress", chunk)))
        snapshot = graph.get_state(config)
        if not snapshot.interrupts:
            break
        if on_review is None:
            # Paused for review and nobody to ask: the thread waits for a later resume.
            break
        payload = Command(resume=on_review(snapshot.interrupts[0].value))
    return AnalysisRun(
        thread_id=thread_id, state=dict(snapshot.values), seconds=time.perf_counter() - started
    )
