"""What an analysis leaves on disk: report.md, analysis.json, overlay.png, regions.geojson.

``regions.geojson`` follows QuPath's GeoJSON conventions (``objectType``, ``name``,
``classification`` with a colour), so the regions open as annotations on the slide in QuPath;
coordinates are level-0 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel

from histopilot import __version__
from histopilot.agents.audit import AuditRecord, AuditTrail
from histopilot.agents.context import SlideWorkspace
from histopilot.agents.state import ReportDraft
from histopilot.slide.render import draw_regions, draw_tissue_outline, overlay_heatmap, save_png
from histopilot.storage import atomic_file
from histopilot.tools.report.render import markdown_elements

OVERVIEW_SIZE = 1600
POWER_COLOURS = {"low": [86, 180, 233], "medium": [230, 159, 0], "high": [213, 94, 0]}


class AnalysisFiles(BaseModel):
    report: str
    analysis: str
    overlay: str
    regions: str
    audit: str


def write_outputs(
    state: dict[str, Any],
    workspace: SlideWorkspace,
    out: Path,
    *,
    thread_id: str,
    audit: list[AuditRecord],
) -> AnalysisFiles:
    out.mkdir(parents=True, exist_ok=True)
    return AnalysisFiles(
        audit=str(_write(out / "audit.json", audit_json(audit))),
        report=str(_write(out / "report.md", report_markdown(state))),
        analysis=str(
            _write(
                out / "analysis.json",
                json.dumps(analysis_record(state, thread_id), indent=2, ensure_ascii=False),
            )
        ),
        overlay=str(save_png(overlay_image(state, workspace), out / "overlay.png")),
        regions=str(_write(out / "regions.geojson", json.dumps(regions_geojson(state), indent=1))),
    )


def audit_json(records: list[AuditRecord]) -> str:
    """The audit records of an analysis as the JSON document written beside its report."""
    return AuditTrail(records=records).model_dump_json(indent=2)


def analysis_record(state: dict[str, Any], thread_id: str) -> dict[str, Any]:
    """The analysis as JSON: everything in state except the chat messages."""
    record: dict[str, Any] = {"histopilot": __version__, "thread_id": thread_id}
    for key, value in state.items():
        if key in ("messages", "slide_path"):
            continue
        record[key] = _jsonable(value)
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def report_markdown(state: dict[str, Any]) -> str:
    report: ReportDraft = state["report"]
    lines = [
        f"# {report.title}",
        "",
        f"> **{report.notice}**",
        "",
        f"Status: {report.status}" + (f" ({report.reviewer_note})" if report.reviewer_note else ""),
        "",
        "## Assessment",
        "",
        report.diagnosis,
        "",
        *([*markdown_elements(report.synoptic), ""] if report.synoptic else []),
        "## Findings",
        "",
    ]
    for statement in report.findings:
        cited = ", ".join(
            f"{c.region_id} [{c.magnification}, x={c.x}, y={c.y}, {c.width}×{c.height}]"
            for c in statement.citations
        )
        lines.append(f"- {statement.text}" + (f" — regions: {cited}" if cited else ""))
    lines += [
        "",
        "## Differential",
        "",
        "| Class | Probability | 90 % intervals (span over trajectories) | Regions |",
        "| --- | --- | --- | --- |",
    ]
    for h in report.differential:
        regions = ", ".join(h.support[:8]) + (" …" if len(h.support) > 8 else "")
        lines.append(
            f"| {h.name} | {h.probability:.2f} | {h.interval[0]:.2f}–{h.interval[1]:.2f} "
            f"| {regions} |"
        )
    if report.certainty is not None:
        c = report.certainty
        votes = ", ".join(f"{label} {n}" for label, n in c.votes.items())
        lines += [
            "",
            "## Certainty",
            "",
            f"- Confidence {c.confidence:.2f} (indeterminate below {c.threshold:.2f})"
            + (": **indeterminate — review**" if c.indeterminate else ""),
            f"- Trajectory agreement {c.agreement:.0%} (top choices: {votes or 'none'})",
            f"- Tissue examined {c.tissue_examined:.0%}, at high power "
            f"{c.tissue_examined_high_power:.0%}",
        ]
    if report.evidence:
        lines += ["", "## Evidence consulted (quoted sources; data, not findings)", ""]
        lines += [f"- {e.text} ({e.source})" for e in report.evidence]
    lines += ["", "## Limitations", ""]
    lines += [f"- {note}" for note in report.limitations]
    lines += ["", "## Narrative", "", report.narrative, "", f"_{report.notice}_", ""]
    return "\n".join(lines)


def regions_geojson(state: dict[str, Any]) -> dict[str, Any]:
    findings = state.get("findings", {})
    features = []
    for region in sorted(state.get("regions", {}).values(), key=lambda r: r.id):
        x0, y0, x1, y1 = region.x, region.y, region.x + region.width, region.y + region.height
        finding = findings.get(region.id)
        features.append(
            {
                "type": "Feature",
                "id": region.id,
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": region.id,
                    "classification": {
                        "name": f"{region.magnification} power",
                        "color": POWER_COLOURS[region.magnification],
                    },
                    "trajectory": region.trajectory,
                    "step": region.step,
                    "mpp": region.mpp,
                    "description": finding.text if finding else "",
                    "suspicion": finding.suspicion if finding else None,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def overlay_image(state: dict[str, Any], workspace: SlideWorkspace) -> np.ndarray:
    """Thumbnail with the tissue outline, triage's importance map and the numbered regions."""
    slide, maps = workspace.slide, workspace.maps
    with workspace.lock:
        overview, downsample = slide.overview(max_size=OVERVIEW_SIZE)
    heat = np.full(maps.grid_shape, np.nan, np.float32)
    if len(maps.cells):
        heat[maps.cells[:, 1], maps.cells[:, 0]] = maps.importance
    # The grid covers whole tiles; crop the heatmap to the slide's extent before scaling.
    rows, columns = maps.grid_shape
    tile = maps.tile_size
    height, width = overview.shape[:2]
    scale = tile / downsample
    heat_image = cv2.resize(
        heat, (round(columns * scale), round(rows * scale)), interpolation=cv2.INTER_NEAREST
    )[:height, :width]
    padded = np.full((height, width), np.nan, np.float32)
    padded[: heat_image.shape[0], : heat_image.shape[1]] = heat_image
    canvas = overlay_heatmap(overview, padded, alpha=0.35)
    canvas = draw_tissue_outline(canvas, workspace.tissue, downsample)
    regions = sorted(state.get("regions", {}).values(), key=lambda r: r.id)
    return draw_regions(canvas, downsample, [r.box for r in regions], [r.id for r in regions])


def _write(path: Path, text: str) -> Path:
    with atomic_file(path) as handle:
        Path(handle).write_text(text, encoding="utf-8")
    return path
