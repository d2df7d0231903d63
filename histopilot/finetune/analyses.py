"""Reviewed histopilot analyses as training data: each finding becomes its region's crop,
asked about at the region's magnification and answered with the finding's text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from histopilot.agents.state import Finding, Region, SlideRef
from histopilot.errors import HistopilotError, first_line
from histopilot.finetune.conversations import Conversation, ConversionReport, single_turn, validated
from histopilot.slide.render import save_png

REGION_PROMPT = "Describe the histology in this {power}-power field of an H&E slide."


def from_analyses(
    source: Path,
    out: Path,
    report: ConversionReport,
    include_drafts: bool,
    slide_root: str | Path | None,
) -> Iterator[Conversation]:
    files = [source] if source.is_file() else sorted(source.rglob("analysis.json"))
    for file in files:
        try:
            analysis = _Analysis.model_validate_json(file.read_bytes())
        except (OSError, ValueError) as error:
            report.read += 1
            report.skip(file, f"invalid record: not a histopilot analysis ({first_line(error)})")
            continue
        report.read += len(analysis.findings)
        records = {region_id: f"{file}:{region_id}" for region_id in analysis.findings}
        if analysis.report.status != "reviewed" and not include_drafts:
            for record in records.values():
                report.skip(record, "not reviewed: the report is a draft")
            continue
        yield from _analysis_regions(analysis, records, out, report, slide_root)


def _analysis_regions(analysis, records, out, report, slide_root) -> Iterator[Conversation]:
    from histopilot.slide import open_slide

    try:
        slide = open_slide(_slide_path(analysis.slide.path, slide_root))
    except HistopilotError as error:
        for record in records.values():
            report.skip(record, f"slide not readable: {error}")
        return
    with slide:
        for region_id, finding in analysis.findings.items():
            region = analysis.regions.get(region_id)
            if region is None:
                report.skip(records[region_id], "invalid record: the finding's region is missing")
                continue
            try:
                crop = _region_crop(slide, region)
            except HistopilotError as error:
                report.skip(records[region_id], f"region not readable: {error}")
                continue
            # Named by where the pixels come from, so two analyses of one slide never share
            # (or overwrite) a crop unless they looked at the very same field.
            where = f"{analysis.slide.path}|{region.x},{region.y},{region.width},{region.height}"
            name = f"images/{hashlib.sha256(f'{where}|{region.mpp}'.encode()).hexdigest()[:24]}.png"
            save_png(crop, out / name)
            conversation = validated(
                report,
                records[region_id],
                id=f"{analysis.thread_id}/{analysis.slide.slide_id}/{region_id}",
                images=[name],
                messages=single_turn(
                    REGION_PROMPT.format(power=region.magnification), finding.text.strip()
                ),
            )
            if conversation:
                yield conversation


class _Analysis(BaseModel):
    """The parts of ``analysis.json`` a training example is made of, validated."""

    thread_id: str = "analysis"
    slide: SlideRef
    regions: dict[str, Region]
    findings: dict[str, Finding]
    report: _ReportStatus


class _ReportStatus(BaseModel):
    status: str


def _slide_path(recorded: str, slide_root: str | Path | None) -> Path:
    if slide_root is None:
        return Path(recorded)
    return Path(slide_root) / Path(recorded).name


def _region_crop(slide, region: Region, longest: int = 448) -> np.ndarray:
    x, y, width, height = region.x, region.y, region.width, region.height
    downsample = max(1.0, max(width, height) / longest)
    if region.mpp and slide.mpp is not None:
        downsample = max(downsample, region.mpp / slide.mpp.mean)
    return slide.read_region_at(
        x,
        y,
        max(1, round(width / downsample)),
        max(1, round(height / downsample)),
        downsample=downsample,
    )
