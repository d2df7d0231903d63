"""Full analyses as background jobs: queue, run, record progress, write the outputs.

A job is :func:`~histopilot.agents.run.run_analysis` in the graph's checkpointer under the
analysis id, followed by :func:`~histopilot.agents.outputs.write_outputs` into the job's own
folder (written whole or not at all). Jobs run on a small pool of threads, never on the event
loop; progress lines go to the registry as they come, so a client that polls or streams sees
the agents at work.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver

from histopilot.agents.context import AgentContext
from histopilot.agents.outputs import write_outputs
from histopilot.agents.run import run_analysis
from histopilot.errors import HistopilotError
from histopilot.serve.api.background import background_pool
from histopilot.serve.api.catalog import CatalogSlide
from histopilot.serve.api.registry import AnalysisRecord, Registry
from histopilot.storage import atomic_directory

log = logging.getLogger(__name__)
#: Analyses one user may have queued or running at once.
MAX_PENDING_PER_USER = 4


class TooManyAnalysesError(HistopilotError):
    """A user asked for more analyses than may wait at once."""


class AnalysisJobs:
    def __init__(
        self,
        registry: Registry,
        context: AgentContext,
        checkpointer: BaseCheckpointSaver,
        folder: Path,
        *,
        workers: int,
        scrub: Callable[[str], str],
    ) -> None:
        self.registry = registry
        self.context = context
        self.checkpointer = checkpointer
        self.folder = folder
        self.scrub = scrub  # takes the server's folders out of error messages
        self._pool = background_pool(workers, "analysis")

    def start(
        self,
        owner: str,
        slide: CatalogSlide,
        question: str | None,
        settings: dict[str, Any],
    ) -> AnalysisRecord:
        """Queue an analysis; ``settings`` override ``[agents]`` for this run (validated)."""
        pending = [a for a in self.registry.analyses(owner) if a.status in ("queued", "running")]
        if len(pending) >= MAX_PENDING_PER_USER:
            raise TooManyAnalysesError(
                f"you have {len(pending)} analyses queued or running; start more when one ends."
            )
        context = self.context.with_settings(**settings) if settings else self.context
        analysis_id = f"analysis-{uuid.uuid4().hex[:12]}"
        record = self.registry.add_analysis(owner, analysis_id, slide.id, slide.name, question)
        self._pool.submit(self._run, analysis_id, slide, question, context)
        return record

    def folder_of(self, analysis_id: str) -> Path:
        return self.folder / analysis_id

    def _run(
        self, analysis_id: str, slide: CatalogSlide, question: str | None, context: AgentContext
    ) -> None:
        try:
            self.registry.set_status(analysis_id, "running")
            run = run_analysis(
                slide.path,
                context,
                self.checkpointer,
                question=question,
                thread_id=analysis_id,
                on_progress=lambda line: self.registry.add_progress(analysis_id, line),
            )
            workspace = context.workspace(run.state["slide"])
            with atomic_directory(self.folder_of(analysis_id)) as out:
                files = write_outputs(
                    run.state, workspace, out, thread_id=analysis_id, audit=run.audit
                )
            diagnosis, report = run.state["diagnosis"], run.state["report"]
            guarded = report.diagnosis != diagnosis.statement  # the guardrails withheld it
            summary = {
                "assessment": report.diagnosis,
                "label": None if guarded else diagnosis.label,
                "confidence": diagnosis.confidence,
                "indeterminate": diagnosis.indeterminate or guarded,
                "regions": len(run.state.get("regions", {})),
                "seconds": round(run.seconds, 2),
                "files": sorted(Path(path).name for path in files.model_dump().values()),
                "notice": run.state["report"].notice,
            }
        except HistopilotError as error:
            self.registry.set_status(analysis_id, "failed", error=self.scrub(str(error)))
            return
        except Exception as error:
            log.exception("analysis %s failed", analysis_id)
            self.registry.set_status(
                analysis_id, "failed", error=f"internal error ({type(error).__name__})"
            )
            return
        self.registry.set_status(analysis_id, "done", summary=summary)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
