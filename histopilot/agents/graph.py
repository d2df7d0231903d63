"""The analysis graph::

    START → triage ─Send×K→ trajectory ──→ vote → report ─(review on)→ review → END
                            │
                            └ navigate ─Send×n→ describe → diagnose ─(stop)→ END
                                 ↑_________ directive ____________|

Each trajectory is the inner graph, run with its own seed; the outer graph merges what they
saw through the state's reducers and lets them vote. Model-calling nodes retry on transient
server errors; every compiled graph gets a checkpointer except the one LangGraph's own server
loads (:mod:`histopilot.agents.studio`), which brings its own.
"""

from __future__ import annotations

import math
import time

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, RetryPolicy, Send
from typing_extensions import TypedDict

from histopilot.agents.context import AgentContext, context_of
from histopilot.agents.describe import describe
from histopilot.agents.diagnose import diagnose, vote
from histopilot.agents.navigate import navigate
from histopilot.agents.progress import progress
from histopilot.agents.report import report, review
from histopilot.agents.state import (
    AnalysisState,
    Differential,
    TrajectoryResult,
    TrajectoryState,
    TriageResult,
)
from histopilot.errors import ModelUnavailableError


def transient(error: Exception) -> bool:
    """Worth another try: a model server that timed out, dropped the connection or failed with
    a 5xx after the client's own retries. A missing model or a rejected key is not."""
    import openai  # only when a node failed: offline runs never load the client

    return isinstance(error, ModelUnavailableError) and isinstance(
        error.__cause__, openai.APIConnectionError | openai.InternalServerError
    )


MODEL_RETRY = RetryPolicy(max_attempts=2, initial_interval=1.0, retry_on=transient)


class AnalysisInput(TypedDict, total=False):
    """What a run starts from: a slide path and, optionally, a question."""

    slide_path: str
    question: str | None


def triage(state: AnalysisInput, runtime: Runtime[AgentContext]) -> Command:
    """Embed and score the slide, set the budget, and start the trajectories."""
    started = time.perf_counter()
    context = context_of(runtime)
    progress("triage: embedding tissue tiles and scoring the slide")
    workspace = context.workspace(state["slide_path"])
    maps = workspace.maps
    settings = context.settings
    # Riskier slides get the full budget, quiet ones down to 75 % of it; never fewer regions
    # than it takes to zoom from low through medium to high power.
    budget = round(settings.budget * (0.75 + 0.25 * maps.risk))
    floor = max(settings.min_regions, 2 * settings.regions_per_step + 1)
    budget = min(settings.budget, max(budget, floor))
    result = TriageResult(
        risk=round(maps.risk, 4),
        method=maps.method,
        tiles=len(maps.features),
        tissue_fraction=round(workspace.tissue.tissue_fraction, 4),
        budget=budget,
        note=maps.note,
    )
    slide = workspace.ref()
    progress(
        f"triage ({result.method}): risk {result.risk:.2f}, {result.tiles} tissue tiles, "
        f"budget {budget} regions × {settings.trajectories} trajectories"
    )
    starts = [
        Send(
            "trajectory",
            TrajectoryState(
                slide=slide,
                question=state.get("question"),
                triage=result,
                trajectory=k,
                seed=settings.seed,
                step=0,
            ),
        )
        for k in range(1, settings.trajectories + 1)
    ]
    return Command(
        goto=starts,
        update={
            "slide": slide,
            "question": state.get("question"),
            "triage": result,
            "material": context.material(slide),
            "timings": {"triage": time.perf_counter() - started},
        },
    )


def build_trajectory_graph() -> StateGraph:
    builder = StateGraph(TrajectoryState, context_schema=AgentContext)
    builder.add_node("navigate", navigate, retry_policy=MODEL_RETRY, destinations=("describe", END))
    builder.add_node("describe", describe, retry_policy=MODEL_RETRY)
    builder.add_node("diagnose", diagnose, retry_policy=MODEL_RETRY, destinations=("navigate", END))
    builder.add_edge(START, "navigate")
    builder.add_edge("describe", "diagnose")
    return builder


def build_analysis_graph() -> StateGraph:
    """The uncompiled analysis graph (compile it with a checkpointer: :func:`compile_analysis`)."""
    walk = build_trajectory_graph().compile(name="trajectory")

    def trajectory(task: TrajectoryState, runtime: Runtime[AgentContext]) -> dict:
        """One seeded walk; its regions, findings and evidence merge into the analysis."""
        started = time.perf_counter()
        settings = context_of(runtime).settings
        # Each step is three supersteps (navigate, describe, diagnose); the outer run's limit
        # counts the outer graph's steps, so the walk gets its own.
        steps = math.ceil(task["triage"].budget / settings.regions_per_step) + 2
        final = walk.invoke(
            task, config={"recursion_limit": 3 * steps + 5}, context=runtime.context
        )
        differential = final.get("differential")
        if differential is None:
            differential = Differential(method="none", note="no region described")
        result = TrajectoryResult(
            trajectory=task["trajectory"],
            seed=task["seed"],
            regions=sorted(final.get("regions", {})),
            differential=differential,
            stop_reason=final.get("stop_reason") or "finished",
        )
        return {
            "regions": final.get("regions", {}),
            "findings": final.get("findings", {}),
            "evidence": final.get("evidence", {}),
            "trajectories": [result],
            "warnings": final.get("warnings", []),
            "timings": {
                **final.get("timings", {}),
                "trajectory_wall": time.perf_counter() - started,
            },
        }

    builder = StateGraph(AnalysisState, context_schema=AgentContext, input_schema=AnalysisInput)
    builder.add_node("triage", triage, destinations=("trajectory",))
    builder.add_node("trajectory", trajectory)
    builder.add_node("vote", vote)
    builder.add_node("report", report, retry_policy=MODEL_RETRY, destinations=("review", END))
    builder.add_node("review", review)
    builder.add_edge(START, "triage")
    builder.add_edge("trajectory", "vote")
    builder.add_edge("vote", "report")
    builder.add_edge("review", END)
    return builder


def compile_analysis(checkpointer: BaseCheckpointSaver) -> CompiledStateGraph:
    """The analysis graph with its checkpointer (required: review and resume depend on it)."""
    if checkpointer is None:
        raise ValueError("the analysis graph needs a checkpointer (InMemorySaver in tests)")
    return build_analysis_graph().compile(checkpointer=checkpointer, name="analysis")
