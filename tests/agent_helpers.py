"""Build agent contexts for tests: offline models unless a test scripts some."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.context import AgentContext
from histopilot.agents.run import AnalysisRun, run_analysis
from histopilot.config import AgentsConfig
from histopilot.retrieval.encoders import load_encoder
from histopilot.retrieval.reference import ReferenceBank
from histopilot.serve.offline import OfflineModel

ROLES = ("orchestrator", "describer", "diagnoser", "reporter")


def make_context(
    feature_cache: Path,
    *,
    model: Any = None,
    reference: Path | None = None,
    slide_mpp: float | None = None,
    **settings: Any,
) -> AgentContext:
    """A context with ``model`` in every role (offline when ``None``) and small defaults."""
    defaults = {"budget": 6, "trajectories": 2, "regions_per_step": 2, "min_regions": 2}
    return AgentContext(
        settings=AgentsConfig(**(defaults | settings)),
        models={role: model if model is not None else OfflineModel(role) for role in ROLES},
        encoder=load_encoder("offline"),
        reference=ReferenceBank.open(reference) if reference else None,
        feature_cache=feature_cache,
        slide_mpp=slide_mpp,
    )


def analyse(slide: Path, context: AgentContext, **kwargs: Any) -> AnalysisRun:
    """One analysis with an in-memory checkpointer."""
    with open_checkpointer("memory", Path("unused")) as checkpointer:
        return run_analysis(slide, context, checkpointer, **kwargs)
