"""Description: what one field of view shows, with the measurements behind the words.

Each region is its own ``describe`` branch (fanned out with ``Send``). The branch reads the
field, measures it, collects the votes of its most similar reference patches, and writes the
finding: a vision-language model sees the image and the measurements when one is configured;
otherwise the sentence is built from the measurements themselves, so it never says more than
was measured.
"""

from __future__ import annotations

import time

import numpy as np
from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.runtime import Runtime
from pydantic import BaseModel, Field

from histopilot.agents.context import AgentContext, SlideWorkspace, context_of
from histopilot.agents.guardrails import Guard
from histopilot.agents.measure import measure_region, measured_description
from histopilot.agents.models import (
    ask,
    is_offline,
    model_name,
    prompt,
)
from histopilot.agents.state import (
    DescribeTask,
    Evidence,
    Finding,
    Measurements,
    Region,
    SlideRef,
)
from histopilot.retrieval.reference import ReferenceBank
from histopilot.serve.messages import image_part

#: Reference patches cited as evidence per region.
REFERENCE_EVIDENCE = 3

FEATURE_RULES = {
    "cellular-atypical": "densely cellular tissue with enlarged, variable nuclei",
    "cellular-uniform": "densely cellular tissue with small, uniform nuclei",
    "stroma": "sparsely cellular eosinophilic tissue (stroma or muscle)",
    "sparse": "sparse tissue (fat, mucin or loose connective tissue)",
}
"""Classes of the rule-based differential, used when no reference bank is configured."""


class RegionDescription(BaseModel):
    """A describer model's account of one field."""

    description: str = Field(description="Findings in this field, in pathology terms")
    suspicion: float = Field(
        0.0, ge=0.0, le=1.0, description="0 = clearly unremarkable, 1 = must be examined closer"
    )


def describe(task: DescribeTask, runtime: Runtime[AgentContext]) -> dict:
    """One region in (a ``Send`` branch), its finding and reference evidence out."""
    started = time.perf_counter()
    region = task["region"]
    finding, evidence = describe_region(
        context_of(runtime), task["slide"], region, task["question"]
    )
    return {
        "findings": {region.id: finding},
        "evidence": evidence,
        "warnings": [f"describe {region.id}: {finding.note}"] if finding.note else [],
        "timings": {"describe": time.perf_counter() - started},
    }


def describe_region(
    context: AgentContext, slide: SlideRef | str, region: Region, question: str | None = None
) -> tuple[Finding, dict[str, Evidence]]:
    """Read, measure and describe one region; shared by the graph and the chat's tool."""
    workspace = context.workspace(slide)
    image = workspace.read(region.x, region.y, region.width, region.height, region.mpp)
    measurements = measure_region(image, region.mpp)
    tiles = tiles_in(workspace, region)
    votes, vote_note = region_votes(workspace, tiles, measurements, context.reference)
    prior = float(workspace.maps.importance[tiles].mean()) if len(tiles) else 0.0
    text = measured_description(measurements, region.magnification, region.mpp)
    if votes:
        text += " " + vote_note
    suspicion = measured_suspicion(prior, measurements)
    source, note = "measured", ""
    model = context.models.get("describer")
    if not is_offline(model):
        request = [{"type": "text", "text": _request(region, text, question)}, image_part(image)]
        described, problem = ask(
            model,
            RegionDescription,
            [SystemMessage(prompt("describe")), HumanMessage(request)],
        )
        if described is None:
            note = f"the describer's answer was unusable ({problem}); measured description kept"
        else:
            guard = Guard(
                material=context.material(slide),
                regions={region.id},
                high_power_seen=region.magnification == "high",
            )
            text, withheld = guard.screen(described.description, region.id, marker=True)
            suspicion, source = described.suspicion, f"model:{model_name(model)}"
            if withheld:
                note = "withheld from the description: " + "; ".join(
                    dict.fromkeys(action.reason for action in withheld)
                )
    finding = Finding(
        region_id=region.id,
        text=text,
        measurements=measurements,
        votes=votes,
        suspicion=round(float(np.clip(suspicion, 0.0, 1.0)), 3),
        source=source,
        note=note,
    )
    return finding, reference_evidence(workspace, tiles, region, context.reference)


def tiles_in(workspace: SlideWorkspace, region: Region) -> np.ndarray:
    """Indices of the triage tiles whose top-left corner lies inside ``region``."""
    coords = workspace.maps.features.coords
    inside = (
        (coords[:, 0] >= region.x)
        & (coords[:, 0] < region.x + region.width)
        & (coords[:, 1] >= region.y)
        & (coords[:, 1] < region.y + region.height)
    )
    return np.flatnonzero(inside)


def region_votes(
    workspace: SlideWorkspace,
    tiles: np.ndarray,
    measurements: Measurements,
    reference: ReferenceBank | None,
) -> tuple[dict[str, float], str]:
    """Vote shares per class for a region and a sentence saying what it resembles."""
    maps = workspace.maps
    if reference is not None and maps.votes is not None and len(tiles):
        shares = maps.votes[tiles].mean(0)
        votes = {
            label: round(float(s), 4)
            for label, s in zip(reference.labels, shares, strict=True)
            if s >= 0.005
        }
        names = reference.names
        method = "most similar reference patches"
    else:
        votes = rule_votes(measurements)
        names = FEATURE_RULES
        method = "feature rules"
    ranked = sorted(votes.items(), key=lambda item: -item[1])[:3]
    listed = ", ".join(f"{names.get(label, label)} {share:.0%}" for label, share in ranked)
    return votes, f"Resembles ({method}): {listed}."


def rule_votes(m: Measurements) -> dict[str, float]:
    """A soft assignment to :data:`FEATURE_RULES` from the measurements alone.

    Thresholds come from this segmentation on CRC-VAL-HE-7K (0.5 µm/px): carcinoma epithelium
    has nuclei covering ~34 % of tissue with median area ~50 µm² and robust CV ~0.7; lymphoid
    tissue ~35 % with ~30 µm² and CV ~0.4; stroma and muscle ~15 %; mucin and fat under 8 %.
    """
    if m.tissue_fraction < 0.05:
        return {}
    sparse = _sigmoid((0.45 - m.tissue_fraction) / 0.1)
    if m.cellularity is None:
        # Low power: cellularity from hematoxylin only; nuclear size cannot be judged.
        cellular = _sigmoid((m.hematoxylin - 0.25) / 0.05) * (1 - sparse)
        atypical = 0.5
    else:
        sparse = max(sparse, _sigmoid((0.08 - m.cellularity) / 0.02))
        cellular = _sigmoid((m.cellularity - 0.25) / 0.05) * (1 - sparse)
        large = _sigmoid(((m.nuclear_area_um2 or 0) - 42) / 6)
        variable = _sigmoid(((m.nuclear_area_cv or 0) - 0.6) / 0.08)
        atypical = (large + variable) / 2
    scores = {
        "cellular-atypical": cellular * atypical,
        "cellular-uniform": cellular * (1 - atypical),
        "stroma": (1 - cellular) * (1 - sparse),
        "sparse": sparse,
    }
    total = sum(scores.values()) or 1.0
    return {label: round(score / total, 4) for label, score in scores.items()}


def measured_suspicion(prior: float, m: Measurements) -> float:
    """How much a field merits a closer look: its triage prior, and at medium or high power
    also its cellularity (dense, cellular tissue is where lesions hide)."""
    if m.cellularity is None:
        return prior
    return 0.5 * prior + 0.5 * min(1.0, m.cellularity / 0.4)


def reference_evidence(
    workspace: SlideWorkspace,
    tiles: np.ndarray,
    region: Region,
    reference: ReferenceBank | None,
) -> dict[str, Evidence]:
    """The reference patches closest to the region's mean tile vector."""
    if reference is None or not len(tiles):
        return {}
    vectors = workspace.maps.features.features[tiles]
    mean = vectors.mean(0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    hits = reference.index.search(mean[None], REFERENCE_EVIDENCE)[0]
    return {
        f"{region.id}/ref{hit.rank}": Evidence(
            id=f"{region.id}/ref{hit.rank}",
            kind="reference",
            text=f"{reference.names.get(hit.label or '', hit.label)} reference patch "
            f"{hit.slide_id} (cosine {hit.score:.2f})",
            label=hit.label,
            score=round(hit.score, 4),
            source=f"reference:{hit.slide_id}#{hit.id}",
            region_id=region.id,
        )
        for hit in hits
    }


def _request(region: Region, measured: str, question: str | None) -> str:
    ask = f"The user asks: {question}\n" if question else ""
    return (
        f"{ask}Field {region.id}, {region.magnification} power"
        + (f" at {region.mpp:g} µm/px" if region.mpp else "")
        + f".\nMeasured: {measured}\nDescribe this field."
    )


def _sigmoid(value: float) -> float:
    return float(1 / (1 + np.exp(-value)))
