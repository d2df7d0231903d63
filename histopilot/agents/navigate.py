"""Navigation: choose the next fields of view, the way a pathologist moves over a slide.

Candidates are windows on the triage tile grid at three powers: low (8×8 tiles, about 0.9 mm
at the default 0.5 µm/px tiles, read at 4× the tile µm/px), medium (4×4) and high (2×2, read
at the tiles' resolution). Each candidate's score is

    prior (triage importance × tissue) × relevance (to the directive, question or leading
    hypothesis) × novelty (share not yet seen at that power) × zoom (inside a field already
    seen one power lower, as one zooms into a promising low-power field)

and regions are *sampled* in proportion to score² with a seeded generator, never taken by
argmax: trajectories with different seeds see different, plausible paths (PathFinder's
navigator samples for the same reason), and the same seed always sees the same regions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.types import Command, Send
from pydantic import BaseModel, Field

from histopilot.agents.context import AgentContext, SlideWorkspace, context_of
from histopilot.agents.models import (
    ask,
    is_offline,
    model_name,
    prompt,
)
from histopilot.agents.progress import progress
from histopilot.agents.state import (
    MAGNIFICATIONS,
    DescribeTask,
    Differential,
    Directive,
    Finding,
    Magnification,
    Region,
    TrajectoryState,
)
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.reference import ReferenceBank

WINDOW_TILES: dict[Magnification, int] = {"low": 8, "medium": 4, "high": 2}
#: Score factor for a medium or high-power field outside every field seen one power lower.
OUTSIDE_PARENT = 0.05
#: Candidates with less than this share of unseen tissue at their power are not offered.
MIN_NOVELTY = 0.5
#: A region whose suspicion reaches this is worth zooming into.
ZOOM_SUSPICION = 0.4
#: Score factor for windows inside the region a directive points at.
FOCUS_BOOST = 3.0
#: Relevance never drops below this, so a wrong guess about the target cannot hide tissue.
RELEVANCE_FLOOR = 0.25


@dataclass(frozen=True)
class Candidate:
    column: int  # first tile column of the window
    row: int
    size: int  # tiles per side
    magnification: Magnification
    score: float
    parent: str | None


def read_mpp(tile_mpp: float | None, magnification: Magnification) -> float | None:
    """µm/px a field is read at: a window of ``n`` tiles is read at ``n / 2`` × the tiles'
    resolution, so every field is a 448 px image at the default 224 px tiles."""
    return tile_mpp * WINDOW_TILES[magnification] / 2 if tile_mpp else None


def candidates(
    workspace: SlideWorkspace,
    magnification: Magnification,
    visited: list[Region],
    relevance: np.ndarray | None,
    focus: Region | None = None,
) -> list[Candidate]:
    """Every window at ``magnification`` with unseen tissue, scored (highest first); windows
    inside ``focus`` (a directive's region) count ``FOCUS_BOOST`` times more."""
    maps = workspace.maps
    rows, columns = maps.grid_shape
    if len(maps.cells) == 0:
        return []
    size = min(WINDOW_TILES[magnification], rows, columns)
    tissue = _grid(maps.cells, np.ones(len(maps.cells)), maps.grid_shape)
    importance = _grid(maps.cells, maps.importance, maps.grid_shape)
    relevant = _grid(maps.cells, relevance, maps.grid_shape) if relevance is not None else tissue
    tile = maps.tile_size
    seen = _coverage(
        [r for r in visited if r.magnification == magnification], tile, maps.grid_shape
    )
    parents = [
        r
        for r in visited
        if MAGNIFICATIONS.index(r.magnification) == MAGNIFICATIONS.index(magnification) - 1
    ]
    sums = {
        name: cv2.integral(grid)
        for name, grid in {
            "tissue": tissue,
            "importance": importance,
            "relevant": relevant,
            "seen": seen * tissue,
        }.items()
    }
    stride = max(1, size // 2)
    slide_width, slide_height = workspace.slide.dimensions
    found = []
    for row in _starts(rows, size, stride):
        for column in _starts(columns, size, stride):
            window = {name: _box(total, row, column, size) for name, total in sums.items()}
            if window["tissue"] == 0:
                continue
            novelty = 1.0 - window["seen"] / window["tissue"]
            if novelty < MIN_NOVELTY:
                continue
            prior = window["importance"] / window["tissue"] * np.sqrt(window["tissue"] / size**2)
            relevance_factor = RELEVANCE_FLOOR + window["relevant"] / window["tissue"]
            # Regions are clipped to the slide, so the window is too before it is compared.
            box = (
                column * tile,
                row * tile,
                min(size * tile, slide_width - column * tile),
                min(size * tile, slide_height - row * tile),
            )
            parent = _containing(parents, box)
            # With no field seen one power lower (a directive asked for this power), every
            # window is equally far from a parent and the factor drops out of the sampling.
            zoom = 1.0 if parent or not parents else OUTSIDE_PARENT
            inside_focus = focus is not None and _containing([focus], box)
            score = float(
                prior * relevance_factor * novelty * zoom * (FOCUS_BOOST if inside_focus else 1.0)
            )
            found.append(
                Candidate(column, row, size, magnification, score, parent.id if parent else None)
            )
    return sorted(found, key=lambda c: -c.score)


def sample(candidates_: list[Candidate], count: int, rng: np.random.Generator) -> list[Candidate]:
    """Up to ``count`` non-overlapping candidates drawn in proportion to score²."""
    pool = [c for c in candidates_ if c.score > 0]
    chosen: list[Candidate] = []
    while pool and len(chosen) < count:
        weights = np.array([c.score for c in pool]) ** 2
        pick = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
        chosen.append(pick)
        pool = [c for c in pool if _overlap(c, pick) < 0.25]
    return chosen


def to_region(
    candidate: Candidate,
    workspace: SlideWorkspace,
    *,
    trajectory: int,
    step: int,
    number: int,
    reason: str,
) -> Region:
    tile = workspace.maps.tile_size
    width, height = workspace.slide.dimensions
    x, y = candidate.column * tile, candidate.row * tile
    side = candidate.size * tile
    return Region(
        id=f"T{trajectory}.{number:02d}",
        x=x,
        y=y,
        width=min(side, width - x),
        height=min(side, height - y),
        magnification=candidate.magnification,
        mpp=read_mpp(workspace.maps.features.mpp, candidate.magnification),
        trajectory=trajectory,
        step=step,
        parent=candidate.parent,
        score=round(candidate.score, 4),
        reason=reason,
    )


def next_magnification(
    regions: list[Region], findings: dict[str, Finding], directive: Directive | None
) -> Magnification:
    """Start at low power; zoom one step into a field that merits it; otherwise go back to low
    power for a new area. A directive's power wins."""
    if directive is not None:
        return directive.magnification
    if not regions:
        return "low"
    last_step = max(r.step for r in regions)
    latest = [r for r in regions if r.step == last_step]
    level = MAGNIFICATIONS.index(latest[0].magnification)
    suspicion = max((findings[r.id].suspicion for r in latest if r.id in findings), default=0.0)
    if suspicion >= ZOOM_SUSPICION and level < len(MAGNIFICATIONS) - 1:
        return MAGNIFICATIONS[level + 1]
    return "low"


def navigation_target(
    question: str | None, directive: Directive | None, differential: Differential | None
) -> str | None:
    """What navigation should look for: the directive, else the question, else the leading
    hypothesis."""
    if directive is not None:
        return directive.target
    if question:
        return question
    if differential is not None and differential.top is not None:
        return differential.top.label
    return None


def tile_relevance(
    workspace: SlideWorkspace,
    target: str | None,
    reference: ReferenceBank | None,
    encoder: PatchEncoder,
) -> np.ndarray | None:
    """Per-tile relevance in [0, 1] to ``target``: the reference bank's votes for the label it
    names, else text–image similarity when the encoder has a text tower, else ``None``."""
    if not target:
        return None
    if target in workspace.relevance:
        return workspace.relevance[target]
    maps = workspace.maps
    relevance = None
    label = reference.label_for(target) if reference is not None else None
    if label is not None and maps.votes is not None:
        relevance = maps.votes[:, reference.labels.index(label)]
    elif encoder.has_text and len(maps.features):
        similarity = maps.features.features @ encoder.encode_text([target])[0]
        spread = similarity.max() - similarity.min()
        relevance = (similarity - similarity.min()) / spread if spread > 0 else similarity * 0
    if relevance is not None:
        with workspace.lock:
            workspace.relevance[target] = relevance.astype(np.float32)
    return relevance


def _grid(cells: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    grid = np.zeros(shape, np.float64)
    grid[cells[:, 1], cells[:, 0]] = values
    return grid


def _coverage(regions: list[Region], tile: int, shape: tuple[int, int]) -> np.ndarray:
    covered = np.zeros(shape, np.float64)
    for region in regions:
        c0, r0 = region.x // tile, region.y // tile
        c1 = -(-(region.x + region.width) // tile)
        r1 = -(-(region.y + region.height) // tile)
        covered[r0:r1, c0:c1] = 1.0
    return covered


def _starts(length: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - size, 0) + 1, stride))
    if starts[-1] != max(length - size, 0):
        starts.append(length - size)
    return starts


def _box(integral: np.ndarray, row: int, column: int, size: int) -> float:
    r1, c1 = row + size, column + size
    return float(
        integral[r1, c1] - integral[row, c1] - integral[r1, column] + integral[row, column]
    )


def _containing(parents: list[Region], box: tuple[int, int, int, int]) -> Region | None:
    """The first of ``parents`` that holds the level-0 ``box`` (x, y, width, height)."""
    x, y, width, height = box
    for parent in parents:
        if (
            parent.x <= x
            and parent.y <= y
            and x + width <= parent.x + parent.width
            and y + height <= parent.y + parent.height
        ):
            return parent
    return None


def _overlap(a: Candidate, b: Candidate) -> float:
    width = min(a.column + a.size, b.column + b.size) - max(a.column, b.column)
    height = min(a.row + a.size, b.row + b.size) - max(a.row, b.row)
    return max(width, 0) * max(height, 0) / (a.size * a.size)


# -- the node -------------------------------------------------------------------------------
class NavigationChoice(BaseModel):
    """The orchestrator's pick among the offered candidate fields."""

    choices: list[str] = Field(description="Candidate ids, most useful first")
    reason: str = Field("", description="Why these fields, in one sentence")


#: Candidates shown to a model-driven navigator.
OFFERED_CANDIDATES = 8


def navigate(state: TrajectoryState, runtime: Runtime[AgentContext]) -> Command:
    """Pick the next fields and fan out one ``describe`` branch per field."""
    started = time.perf_counter()
    context = context_of(runtime)
    workspace = context.workspace(state["slide"])
    regions = sorted(state.get("regions", {}).values(), key=lambda r: r.id)
    findings = state.get("findings", {})
    directive = state.get("directive")
    step = state.get("step", 0) + 1
    remaining = state["triage"].budget - len(regions)
    count = min(context.settings.regions_per_step, remaining)
    target = navigation_target(state.get("question"), directive, state.get("differential"))
    relevance = tile_relevance(workspace, target, context.reference, context.encoder)
    wanted = next_magnification(regions, findings, directive)
    # The wanted power first, then the others from low up, so a trajectory only stops when
    # no tissue is left unseen at any power.
    offered: list[Candidate] = []
    focus = state.get("regions", {}).get(directive.near_region) if directive else None
    for power in (wanted, *[m for m in MAGNIFICATIONS if m != wanted]):
        offered = candidates(workspace, power, regions, relevance, focus)
        if offered:
            break
    if count <= 0 or not offered:
        reason = "budget spent" if count <= 0 else "no unseen tissue left"
        return Command(goto=END, update={"stop_reason": reason, **_timed(started)})
    rng = np.random.default_rng([context.settings.seed, state["trajectory"], step])
    chosen, why, warnings = _choose(context, state, offered, count, rng, target, relevance)
    new = [
        to_region(
            candidate,
            workspace,
            trajectory=state["trajectory"],
            step=step,
            number=len(regions) + i + 1,
            reason=why,
        )
        for i, candidate in enumerate(chosen)
    ]
    progress(
        f"trajectory {state['trajectory']}: step {step}, "
        f"{len(new)} {new[0].magnification}-power field(s)"
    )
    sends = [
        Send(
            "describe", DescribeTask(slide=state["slide"], region=r, question=state.get("question"))
        )
        for r in new
    ]
    update = {
        "step": step,
        "regions": {r.id: r for r in new},
        "directive": None,
        "warnings": warnings,
        **_timed(started),
    }
    return Command(goto=sends, update=update)


def _choose(
    context: AgentContext,
    state: TrajectoryState,
    offered: list[Candidate],
    count: int,
    rng: np.random.Generator,
    target: str | None,
    relevance: np.ndarray | None,
) -> tuple[list[Candidate], str, list[str]]:
    """Sampled candidates, or the orchestrator's choice when a model drives navigation."""
    reason = (
        f"sampled by prior × relevance to {target!r} × novelty"
        if target and relevance is not None
        else "sampled by triage prior × novelty"
    )
    model = context.models.get("orchestrator")
    if is_offline(model):
        return sample(offered, count, rng), reason, []
    shown = offered[:OFFERED_CANDIDATES]
    tile = context.workspace(state["slide"]).maps.tile_size
    listing = "\n".join(
        f"C{i}: {c.magnification} power at level-0 x={c.column * tile}, y={c.row * tile}, "
        f"prior score {c.score:.3f}" + (f", inside {c.parent}" if c.parent else "")
        for i, c in enumerate(shown, 1)
    )
    findings = "\n".join(f"{f.region_id}: {f.text}" for f in state.get("findings", {}).values())
    request = (
        f"Question: {state.get('question') or 'full diagnostic read'}\n"
        f"Looking for: {target or 'anything abnormal'}\n"
        f"Findings so far:\n{findings or '(none yet)'}\n\nCandidate fields:\n{listing}\n\n"
        f"Choose up to {count} candidate ids."
    )
    answer, problem = ask(
        model, NavigationChoice, [SystemMessage(prompt("navigate")), HumanMessage(request)]
    )
    if answer is None:
        return sample(offered, count, rng), reason, [f"navigate: {problem}; sampled instead"]
    by_id = {f"C{i}": c for i, c in enumerate(shown, 1)}
    picked = [by_id[c] for c in dict.fromkeys(answer.choices) if c in by_id][:count]
    if not picked:
        return (
            sample(offered, count, rng),
            reason,
            ["navigate: the model chose no offered candidate; sampled instead"],
        )
    return picked, answer.reason or f"chosen by {model_name(model)}", []


def _timed(started: float) -> dict:
    return {"timings": {"navigate": time.perf_counter() - started}}
