"""Synoptic reports as people read them (Markdown, HTML) and as programs do (JSON, FHIR).

Both human layouts follow a signed-out synoptic report: a header (report, slide, date, status),
a banner while the report is a draft, the stated elements grouped as the CAP protocols group
them, each with its evidence (the regions it rests on, or the words of the source it was read
from), then what is not stated, the narrative, where the cited regions are, and the
limitations. The HTML page is one self-contained file (inline CSS, no script, no external
asset) and escapes every value that comes from data, so a hostile string in a report can never
become markup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import StrEnum
from html import escape

from histopilot.tools.report.document import (
    SynopticReport,
    format_value,
    label,
    schema_title,
)
from histopilot.tools.report.fhir import to_fhir
from histopilot.tools.report.schemas import Reported, SynopticBase

DRAFT_BANNER = "DRAFT — requires pathologist review"
#: How the elements every schema shares are grouped; a site's own elements follow them.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Tumour",
        (
            "procedure",
            "tumor_site",
            "laterality",
            "histologic_type",
            "histologic_type_icdo3",
            "grade",
            "tumor_size_mm",
            "tumor_focality",
        ),
    ),
    (
        "Extent and staging",
        ("pT", "pN", "pM", "stage_group", "lymphovascular_invasion", "perineural_invasion"),
    ),
    ("Margins", ("margin_status", "margin_distance_mm", "closest_margin", "residual_tumor")),
    ("Lymph nodes", ("lymph_nodes_examined", "lymph_nodes_positive", "extranodal_extension")),
)
SITE_GROUP = "Site-specific elements and biomarkers"


class ReportFormat(StrEnum):
    """The formats :func:`render` writes."""

    md = "md"
    html = "html"
    json = "json"
    fhir = "fhir"


def render(report: SynopticReport, fmt: ReportFormat | str) -> str:
    """``report`` as ``fmt``: ``md``, ``html``, ``json`` (the report itself) or ``fhir`` (an
    R4 Bundle with a DiagnosticReport and one Observation per stated element)."""
    return _RENDERERS[ReportFormat(fmt)](report)


def _grouped(report: SynopticReport) -> list[tuple[str, list[tuple[str, Reported]]]]:
    """The stated elements in their groups, in reading order; empty groups are left out."""
    stated = report.stated()
    shared = {name for _, names in GROUPS for name in names}
    groups = [(title, [(n, stated[n]) for n in names if n in stated]) for title, names in GROUPS]
    groups.append((SITE_GROUP, [(n, r) for n, r in stated.items() if n not in shared]))
    return [(title, rows) for title, rows in groups if rows]


def _header(report: SynopticReport) -> list[tuple[str, str]]:
    schema = type(report.elements)
    created = report.created.strftime("%Y-%m-%d %H:%M UTC") if report.created else "not recorded"
    status = "Draft" if report.status == "draft" else "Reviewed"
    if report.reviewer_note:
        status += f" ({report.reviewer_note})"
    return [
        ("Report", report.id),
        ("Slide", report.slide_id or "none (text report)"),
        ("Date", created),
        ("Status", status),
        ("Protocol", schema_title(schema)),
        ("histopilot", report.histopilot),
    ]


def _regions(report: SynopticReport) -> list[str]:
    """Where each cited region is, so a viewer (QuPath, the web viewer) can be taken there."""
    return [
        f"{c.region_id}: {c.magnification} power, x {c.x}, y {c.y}, {c.width} × {c.height} px"
        for c in report.citations
    ]


# -- Markdown ---------------------------------------------------------------------------------
#: Characters that let text act as Markdown: links and images ([ ] !), emphasis (* _ ~), code
#: (`), headings (#), table cells (|), and the escape itself.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#!|~])")


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or line: one line, every character Markdown
    would act on escaped (no links, images, emphasis or code from report data), no tags."""
    flat = " ".join(text.split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat).replace("<", "&lt;")


def markdown_elements(report: SynopticReport) -> list[str]:
    """The element table and the not-stated list, as Markdown lines (report.md reuses them)."""
    schema = type(report.elements)
    lines = [
        "## Synoptic elements",
        "",
        f"Schema `{report.elements.schema_name}`: {_md(schema_title(schema))}.",
        "",
        "| Element | Value | Evidence |",
        "| --- | --- | --- |",
    ]
    for title, rows in _grouped(report):
        lines.append(f"| **{title}** | | |")
        lines += [
            f"| {_md(label(name))} | {_md(format_value(schema, name, reported.value))} "
            f"| {_md(report.evidence(reported))} |"
            for name, reported in rows
        ]
    if not report.stated():
        lines.append("| _No element is stated._ | | |")
    missing = report.not_stated()
    if missing:
        lines += ["", "**Not stated:** " + ", ".join(label(name) for name in missing) + "."]
    return lines


def to_markdown(report: SynopticReport) -> str:
    lines = [f"# {_md(report.title)}", ""]
    if report.status == "draft":
        lines += [f"> **{DRAFT_BANNER}**", ""]
    lines += [" · ".join(f"**{key}:** {_md(value)}" for key, value in _header(report)), ""]
    if report.diagnosis:
        lines += ["## Diagnosis", "", _md(report.diagnosis), ""]
    lines += [*markdown_elements(report), ""]
    if report.narrative:
        lines += ["## Narrative", "", _md(report.narrative), ""]
    if report.citations:
        lines += [
            "## Regions cited (level-0 pixels)",
            "",
            *(f"- {_md(r)}" for r in _regions(report)),
            "",
        ]
    if report.limitations:
        lines += ["## Limitations", "", *(f"- {_md(note)}" for note in report.limitations), ""]
    lines += [f"_{_md(report.notice)}_", ""]
    return "\n".join(lines)


# -- HTML -------------------------------------------------------------------------------------
_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430;
  max-width: 54rem; margin: 2rem auto; padding: 0 1.25rem; }
header { border-bottom: 2px solid #1d2430; padding-bottom: .75rem; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
h2 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
dl.meta { display: grid; grid-template-columns: max-content 1fr max-content 1fr;
  gap: .15rem 1rem; margin: 0; font-size: .9rem; }
dl.meta dt { color: #5b6473; } dl.meta dd { margin: 0; }
.banner { background: #fff4d6; border: 2px solid #c98a00; color: #6b4700; font-weight: 700;
  text-align: center; padding: .6rem; margin: 1rem 0; letter-spacing: .03em; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; vertical-align: top; padding: .35rem .5rem;
  border-bottom: 1px solid #d9dee6; }
thead th { font-size: .78rem; text-transform: uppercase; letter-spacing: .04em; color: #5b6473; }
tr.group th { background: #eef1f5; font-size: .9rem; }
td.element { width: 36%; } td.element small { display: block; color: #5b6473; font-size: .78rem; }
td.value { font-weight: 600; }
td.evidence { width: 26%; font-size: .8rem; color: #5b6473; }
p.missing, ul.regions { font-size: .9rem; color: #5b6473; }
.signoff { margin-top: 2rem; display: grid; grid-template-columns: 1fr 1fr; gap: 2rem; }
.signoff span { display: block; border-top: 1px solid #1d2430; padding-top: .25rem;
  font-size: .8rem; color: #5b6473; margin-top: 2rem; }
footer { margin-top: 1.5rem; border-top: 1px solid #d9dee6; padding-top: .5rem;
  font-size: .85rem; color: #5b6473; }
@media print { body { margin: 0; max-width: none; }
  .banner, tr.group th { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""


def _h(text: object) -> str:
    return escape(str(text), quote=True)


def to_html(report: SynopticReport) -> str:
    meta = "".join(f"<dt>{_h(key)}</dt><dd>{_h(value)}</dd>" for key, value in _header(report))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(report.title)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f'<header><h1>{_h(report.title)}</h1><dl class="meta">{meta}</dl></header>',
    ]
    if report.status == "draft":
        parts.append(f'<p class="banner" role="note">{_h(DRAFT_BANNER)}</p>')
    if report.diagnosis:
        parts.append(f"<section><h2>Diagnosis</h2><p>{_h(report.diagnosis)}</p></section>")
    parts.append("<section><h2>Synoptic elements</h2>")
    parts.append(_html_table(report))
    missing = report.not_stated()
    if missing:
        listed = ", ".join(_h(label(name)) for name in missing)
        parts.append(f'<p class="missing"><strong>Not stated:</strong> {listed}.</p>')
    parts.append("</section>")
    if report.narrative:
        parts.append(f"<section><h2>Narrative</h2><p>{_h(report.narrative)}</p></section>")
    if report.citations:
        items = "".join(f"<li>{_h(region)}</li>" for region in _regions(report))
        parts.append(
            f'<section><h2>Regions cited (level-0 pixels)</h2><ul class="regions">{items}</ul>'
            "</section>"
        )
    if report.limitations:
        items = "".join(f"<li>{_h(note)}</li>" for note in report.limitations)
        parts.append(f"<section><h2>Limitations</h2><ul>{items}</ul></section>")
    if report.status == "draft":
        parts.append(
            '<section class="signoff"><span>Pathologist</span><span>Signature and date</span>'
            "</section>"
        )
    parts += [f"<footer>{_h(report.notice)}</footer>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _html_table(report: SynopticReport) -> str:
    schema: type[SynopticBase] = type(report.elements)
    rows = []
    for title, elements in _grouped(report):
        rows.append(f'<tr class="group"><th colspan="3">{_h(title)}</th></tr>')
        for name, reported in elements:
            description = schema.model_fields[name].description or ""
            rows.append(
                f'<tr><td class="element">{_h(label(name))}<small>{_h(description)}</small></td>'
                f'<td class="value">{_h(format_value(schema, name, reported.value))}</td>'
                f'<td class="evidence">{_h(report.evidence(reported))}</td></tr>'
            )
    if not rows:
        rows.append('<tr><td colspan="3">No element is stated.</td></tr>')
    return (
        "<table><thead><tr><th>Element</th><th>Value</th><th>Evidence</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# -- JSON and FHIR ----------------------------------------------------------------------------
def to_json(report: SynopticReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


def _fhir_json(report: SynopticReport) -> str:
    return json.dumps(to_fhir(report), indent=2, ensure_ascii=False) + "\n"


_RENDERERS: dict[ReportFormat, Callable[[SynopticReport], str]] = {
    ReportFormat.md: to_markdown,
    ReportFormat.html: to_html,
    ReportFormat.json: to_json,
    ReportFormat.fhir: _fhir_json,
}
