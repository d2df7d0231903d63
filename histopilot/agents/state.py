"""What the agent graph remembers: ids, coordinates and small Pydantic models, never pixels.

Checkpoints serialise the state after every step, so it must stay small and JSON-like: images,
tile embeddings and importance maps live in the run's :class:`~histopilot.agents.context.
SlideWorkspace` and on disk. Collections that parallel branches write to (regions, findings,
evidence) are dictionaries keyed by id with a merging reducer, so fan-out results combine in a
deterministic order whatever order the branches finish in.
"""

from __future__ import annotations

import operator
from typing import Annotated, Literal, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from pydantic import BaseModel, ConfigDict, Field

from histopilot.agents.guardrails.material import Material
from histopilot.agents.guardrails.policy import GuardAction
from histopilot.tools.report.document import DRAFT_NOTICE, Citation, SynopticReport

Magnification = Literal["low", "medium", "high"]
MAGNIFICATIONS: tuple[Magnification, ...] = ("low", "medium", "high")

HEURISTIC_NOTICE = (
    f"{DRAFT_NOTICE} Heuristic analysis from measured image features and reference similarity."
)
"""Carried by every output of the offline strategy, where a person reads it."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlideRef(_Record):
    """The slide a run is about: enough to open it again in another process."""

    path: str
    slide_id: str
    mpp: float | None = Field(None, description="µm/px at level 0 (after any override)")
    width: int
    height: int


class Region(_Record):
    """A field of view the agents looked at, in level-0 pixels."""

    id: str = Field(description="Stable id, e.g. 'T1.03': trajectory 1, third region")
    x: int
    y: int
    width: int
    height: int
    magnification: Magnification
    mpp: float | None = Field(None, description="µm/px the field was read at")
    trajectory: int
    step: int
    parent: str | None = Field(None, description="The lower-power region this one zooms into")
    score: float = Field(0.0, description="Navigation score when it was chosen")
    reason: str = ""

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height


class Measurements(_Record):
    """What was measured on a region's pixels. ``None`` means not measurable at this power
    or without a known µm/px (nuclei are not counted at low power)."""

    tissue_fraction: float
    cellularity: float | None = Field(None, description="Share of tissue area in nuclei")
    nuclei_per_mm2: float | None = None
    nuclear_area_um2: float | None = Field(None, description="Median nuclear area")
    nuclear_area_cv: float | None = Field(None, description="Coefficient of variation")
    hematoxylin: float = Field(description="Mean hematoxylin optical density over tissue")
    eosin: float = Field(description="Mean eosin optical density over tissue")


class Finding(_Record):
    """What one region shows: a description, the measurements behind it, and the votes of its
    most similar reference patches."""

    region_id: str
    text: str
    measurements: Measurements
    votes: dict[str, float] = Field(
        default_factory=dict, description="Reference label → share of similar patches"
    )
    suspicion: float = Field(0.0, ge=0.0, le=1.0, description="How much it merits a closer look")
    source: str = Field(description="'measured' or 'model:<name>'")
    note: str = ""


class Evidence(_Record):
    """Something outside the slide that supports or weighs against a hypothesis."""

    id: str
    kind: Literal["reference", "knowledge", "similar_patch"]
    text: str
    label: str | None = None
    score: float = 0.0
    source: str = Field(description="Where it came from: a patch id, a file, a term id")
    region_id: str | None = None


class Hypothesis(_Record):
    label: str
    name: str
    probability: float = Field(ge=0.0, le=1.0)
    interval: tuple[float, float] = Field(
        (0.0, 1.0), description="90 % credible interval of the probability"
    )
    support: list[str] = Field(default_factory=list, description="Region ids that support it")


class Differential(_Record):
    hypotheses: list[Hypothesis] = Field(default_factory=list)
    confidence: float = Field(0.0, ge=0.0, le=1.0, description="Belief that the top is right")
    method: str = Field(description="How it was reached: reference k-NN, feature rules, model")
    note: str = ""

    @property
    def top(self) -> Hypothesis | None:
        return self.hypotheses[0] if self.hypotheses else None


class Directive(_Record):
    """Where the diagnoser wants the navigator to look next."""

    target: str = Field(description="What to look for, in words or a reference label")
    magnification: Magnification = "high"
    near_region: str | None = Field(None, description="Look inside or near this region")
    reason: str = ""


class TriageResult(_Record):
    risk: float = Field(ge=0.0, le=1.0, description="Slide-level risk: navigation prior only")
    method: Literal["mil", "zero-shot", "heuristic"]
    tiles: int = Field(description="Tissue tiles an exhaustive pass would have to look at")
    tissue_fraction: float
    budget: int = Field(description="Regions per trajectory, after triage adjusted it")
    note: str = ""


class TrajectoryResult(_Record):
    trajectory: int
    seed: int = Field(description="The run's seed; trajectory k samples with (seed, k, step)")
    regions: list[str]
    differential: Differential
    stop_reason: str


class Diagnosis(_Record):
    label: str
    name: str
    probability: float
    confidence: float = Field(description="Probability × agreement between trajectories")
    agreement: float = Field(description="Share of trajectories whose top choice this is")
    votes: dict[str, int]
    indeterminate: bool
    statement: str


class Certainty(_Record):
    """How far the assessment can be trusted, in the figures a reader needs to judge it."""

    confidence: float = Field(description="Probability of the leading class × agreement")
    threshold: float = Field(description="Below this confidence the report is indeterminate")
    indeterminate: bool
    agreement: float = Field(description="Share of trajectories whose top choice it is")
    votes: dict[str, int] = Field(description="Top choice → trajectories that made it")
    tissue_examined: float = Field(description="Share of tissue tiles inside examined regions")
    tissue_examined_high_power: float = Field(description="The same, high-power regions only")


class ReportStatement(_Record):
    text: str
    citations: list[Citation] = Field(default_factory=list)


class ReportDraft(_Record):
    """A typed draft whose every finding cites regions, with its synoptic report."""

    title: str
    diagnosis: str
    findings: list[ReportStatement]
    differential: list[Hypothesis]
    evidence: list[Evidence]
    limitations: list[str]
    narrative: str
    notice: str = HEURISTIC_NOTICE
    status: Literal["draft", "reviewed"] = "draft"
    reviewer_note: str = ""
    synoptic: SynopticReport | None = Field(
        None, description="The site's synoptic elements; None in drafts written before them"
    )
    certainty: Certainty | None = Field(None, description="None in drafts written before it")
    material: Material | None = Field(None, description="What the slide can show")
    guardrails: list[GuardAction] = Field(
        default_factory=list, description="What the guardrails withheld from this draft, and why"
    )


def merge_records(left: dict | None, right: dict | None) -> dict:
    """Reducer for id-keyed collections: later writes replace earlier ones with the same id."""
    return {**(left or {}), **(right or {})}


def merge_timings(left: dict | None, right: dict | None) -> dict:
    """Reducer adding up seconds per node, so repeated and parallel steps accumulate."""
    merged = dict(left or {})
    for name, seconds in (right or {}).items():
        merged[name] = merged.get(name, 0.0) + seconds
    return merged


class AnalysisState(TypedDict, total=False):
    """The whole analysis of one slide (the outer graph)."""

    slide: SlideRef
    question: str | None
    messages: Annotated[list[AnyMessage], add_messages]
    triage: TriageResult
    material: Material
    regions: Annotated[dict[str, Region], merge_records]
    findings: Annotated[dict[str, Finding], merge_records]
    evidence: Annotated[dict[str, Evidence], merge_records]
    trajectories: Annotated[list[TrajectoryResult], operator.add]
    differential: Differential
    diagnosis: Diagnosis
    report: ReportDraft
    stop_reason: str
    warnings: Annotated[list[str], operator.add]
    timings: Annotated[dict[str, float], merge_timings]


class TrajectoryState(TypedDict, total=False):
    """One seeded walk over the slide (the inner navigate ⇄ describe → diagnose loop)."""

    slide: SlideRef
    question: str | None
    triage: TriageResult
    trajectory: int
    seed: int
    step: int
    regions: Annotated[dict[str, Region], merge_records]
    findings: Annotated[dict[str, Finding], merge_records]
    evidence: Annotated[dict[str, Evidence], merge_records]
    differential: Differential
    directive: Directive | None
    stop_reason: str | None
    warnings: Annotated[list[str], operator.add]
    timings: Annotated[dict[str, float], merge_timings]


class DescribeTask(TypedDict):
    """What one ``describe`` branch receives through ``Send``."""

    slide: SlideRef
    region: Region
    question: str | None


STATE_MODELS: tuple[type[BaseModel], ...] = (
    SlideRef,
    Region,
    Measurements,
    Finding,
    Evidence,
    Hypothesis,
    Differential,
    Directive,
    TriageResult,
    TrajectoryResult,
    Diagnosis,
    Citation,
    ReportStatement,
    ReportDraft,
    SynopticReport,
    Certainty,
    Material,
    GuardAction,
)
"""The types a checkpoint may rebuild (the serializer's allow-list)."""
