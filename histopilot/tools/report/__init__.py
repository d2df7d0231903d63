"""Synoptic reports: schemas per site, drafting from a slide analysis, rendering, FHIR export.

>>> report = load_report("case-42/analysis.json")        # doctest: +SKIP
>>> html = render(report, "html")                         # also "md", "json", "fhir"
>>> bundle = to_fhir(report)                              # a validated FHIR R4 Bundle (dict)

Schemas live in :mod:`~histopilot.tools.report.schemas`; what a drafted report holds in
:mod:`~histopilot.tools.report.document`.
"""

from histopilot.tools.report.document import (
    Citation,
    ElementInfo,
    SynopticReport,
    describe_schema,
    label,
    load_report,
    parse_report,
)
from histopilot.tools.report.draft import grounded_elements, measured_elements, schema_for
from histopilot.tools.report.fhir import to_fhir
from histopilot.tools.report.render import (
    ReportFormat,
    markdown_elements,
    render,
    to_html,
    to_json,
    to_markdown,
)
from histopilot.tools.report.schemas import (
    FIELDS,
    SCHEMA_ALIASES,
    SCHEMAS,
    Reported,
    SynopticBase,
    schema_named,
)

__all__ = [
    "FIELDS",
    "SCHEMAS",
    "SCHEMA_ALIASES",
    "Citation",
    "ElementInfo",
    "ReportFormat",
    "Reported",
    "SynopticBase",
    "SynopticReport",
    "describe_schema",
    "grounded_elements",
    "label",
    "load_report",
    "markdown_elements",
    "measured_elements",
    "parse_report",
    "render",
    "schema_for",
    "schema_named",
    "to_fhir",
    "to_html",
    "to_json",
    "to_markdown",
]
