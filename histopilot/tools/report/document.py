"""What a synoptic report is once drafted, and how one is read back from the files we write.

A :class:`SynopticReport` is one portable document: the filled site schema, the text around it
(diagnosis, narrative, limitations), the slide regions its values rest on, and who may rely on
it (status, notice). The agents embed it in ``analysis.json``; the structured extractor writes
a smaller record of fields with their text spans. :func:`load_report` accepts either, or the
report on its own, so every renderer works from whichever file a user has.

Elements are described from the schemas themselves (labels from field names, units from value
types), so a field added to a schema is labelled, rendered and exported without a second list.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from histopilot import __version__
from histopilot.errors import ReportInputError
from histopilot.tools.report.schemas import (
    SCHEMAS,
    Millimetres,
    Percent,
    PerSquareMillimetre,
    Reported,
    SynopticBase,
    schema_named,
)

M = TypeVar("M", bound=BaseModel)

SiteElements = Annotated[
    Union[tuple(SCHEMAS.values())],  # noqa: UP007 -- a union built from the registry
    Field(discriminator="schema_name"),
]
"""Any site schema, told apart by its ``schema_name`` so that JSON rebuilds the right class."""

#: Quoted evidence longer than this is cut, with an ellipsis.
QUOTE_CHARS = 120
DRAFT_NOTICE = "Draft for pathologist review; not a diagnosis."
"""The words every output a person reads carries, in its text (not only in a header or a
field a client may drop), so copying the text copies the warning."""
EXTRACTION_NOTICE = (
    f"{DRAFT_NOTICE} Fields extracted automatically from a free-text report; check each "
    "against the source before relying on it."
)


class Citation(BaseModel):
    """A slide region a report cites: its id and level-0 box, so a viewer can jump to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    region_id: str
    x: int
    y: int
    width: int
    height: int
    magnification: Literal["low", "medium", "high"]


class SynopticReport(BaseModel):
    """A drafted (or extracted) synoptic report, complete enough to render and export alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="The analysis thread id, or the extraction record's id")
    title: str
    slide_id: str | None = Field(None, description="None when the source is a text report")
    elements: SiteElements
    diagnosis: str = ""
    narrative: str = ""
    limitations: list[str] = Field(default_factory=list)
    citations: list[Citation] = Field(
        default_factory=list, description="The regions the elements and findings cite"
    )
    source_text: str | None = Field(
        None, description="The report text that element spans index, when it is known"
    )
    notice: str
    status: Literal["draft", "reviewed"] = "draft"
    reviewer_note: str = ""
    created: AwareDatetime | None = Field(None, description="When it was drafted; None if unknown")
    histopilot: str = Field(__version__, description="The histopilot version that wrote it")

    def stated(self) -> dict[str, Reported]:
        """The elements that carry a value, in the schema's order."""
        return {name: reported for name, reported in _elements(self.elements) if reported.stated}

    def not_stated(self) -> list[str]:
        """The names of the schema's elements without a value, in the schema's order."""
        stated = self.stated()
        return [name for name, _ in _elements(self.elements) if name not in stated]

    def evidence(self, reported: Reported) -> str:
        """What a value rests on, in words: its regions, the source's words (or the span when
        the source is not at hand), and how it was reached."""
        parts = []
        if reported.region_ids:
            parts.append("regions " + ", ".join(reported.region_ids))
        if reported.span is not None and self.source_text is not None:
            quoted = " ".join(self.source_text[reported.span[0] : reported.span[1]].split())
            cut = quoted if len(quoted) <= QUOTE_CHARS else quoted[: QUOTE_CHARS - 1] + "…"
            parts.append(f"“{cut}”")
        elif reported.span is not None:
            parts.append(f"characters {reported.span[0]}–{reported.span[1]}")
        if reported.basis:
            parts.append(reported.basis)
        return "; ".join(parts)


def _elements(elements: SynopticBase) -> list[tuple[str, Reported]]:
    return [
        (name, getattr(elements, name))
        for name in type(elements).model_fields
        if name != "schema_name"
    ]


# -- describing elements ----------------------------------------------------------------------
#: Words in field names that read better in their clinical spelling.
_WORDS = {
    "er": "ER",
    "pr": "PR",
    "her2": "HER2",
    "ki67": "Ki-67",
    "ihc": "IHC",
    "ish": "ISH",
    "dcis": "DCIS",
    "icdo3": "ICD-O-3",
}
_UNITS: dict[Any, str] = {Millimetres: "mm", Percent: "%", PerSquareMillimetre: "/mm2"}


def label(name: str) -> str:
    """A field's name as a person reads it: ``tumor_size_mm`` → "Tumor size (mm)", ``pT`` →
    "pT", ``er_percent`` → "ER (%)"."""
    if not name.islower():
        return name
    words = name.split("_")
    suffix = ""
    if words[-1] in ("mm", "percent") and len(words) > 1:
        suffix = " (mm)" if words.pop() == "mm" else " (%)"
    elif words[-2:] == ["per", "mm2"]:
        words[-2:] = ["per", "mm²"]
    text = " ".join(_WORDS.get(word, word) for word in words)
    return text[0].upper() + text[1:] + suffix


def value_type(schema: type[SynopticBase], name: str) -> Any:
    """The type of a field's value: ``Reported[X]`` → ``X``."""
    return schema.model_fields[name].annotation.__pydantic_generic_metadata__["args"][0]


def unit_of(schema: type[SynopticBase], name: str) -> str | None:
    """The UCUM unit of a numeric field, or None."""
    return _UNITS.get(value_type(schema, name))


def format_value(schema: type[SynopticBase], name: str, value: Any) -> str:
    """A value as it is printed in a report: numbers with their unit, ``23 mm``, ``80 %``."""
    if isinstance(value, float):
        unit = unit_of(schema, name)
        text = f"{value:g}"
        return f"{text} {unit.replace('mm2', 'mm²')}" if unit else text
    return str(value)


class ElementInfo(BaseModel):
    """One field of a schema, described for people (``histopilot report schema``)."""

    name: str
    label: str
    values: str = Field(description="Allowed values, or the kind of value with its range")
    description: str


def describe_schema(schema: type[SynopticBase]) -> list[ElementInfo]:
    """Every field of ``schema`` with its label, accepted values and description."""
    return [
        ElementInfo(
            name=name,
            label=label(name),
            values=_values_text(schema, name),
            description=field.description or "",
        )
        for name, field in schema.model_fields.items()
        if name != "schema_name"
    ]


def _values_text(schema: type[SynopticBase], name: str) -> str:
    kind = value_type(schema, name)
    if get_origin(kind) is Literal:
        return ", ".join(str(value) for value in get_args(kind))
    base, *constraints = get_args(kind) if get_origin(kind) is Annotated else (kind,)
    if base is str:
        return "code (see description)" if constraints else "text"
    bounds = [rule for item in constraints for rule in getattr(item, "metadata", [])]
    low = next((rule.ge for rule in bounds if hasattr(rule, "ge")), None)
    high = next((rule.le for rule in bounds if hasattr(rule, "le")), None)
    text = "whole number" if base is int else "number"
    if low is not None:
        text += f" {low:g}–{high:g}" if high is not None else f" ≥ {low:g}"
    unit = unit_of(schema, name)
    return f"{text} {unit}" if unit else text


def schema_title(schema: type[SynopticBase]) -> str:
    """The first line of a schema's docstring: what it covers, e.g. "Prostate needle biopsy"."""
    return (schema.__doc__ or schema.__name__).strip().splitlines()[0].rstrip(".")


# -- reading ----------------------------------------------------------------------------------
class ExtractionRecord(BaseModel):
    """What the structured extractor writes for one text report: fields with their spans."""

    id: str
    schema_name: str = Field(alias="schema")
    fields: dict[str, Any]
    warnings: list[str] = Field(default_factory=list)


def load_report(path: str | Path) -> SynopticReport:
    """The synoptic report in ``path``: an ``analysis.json`` from ``histopilot analyze``, a
    synoptic report on its own, or an extraction record (``{"id", "schema", "fields"}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportInputError(f"no file at {path}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportInputError(f"cannot read {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            raise ReportInputError(
                f"{path} holds more than one JSON document (JSON lines?); put the one record "
                "to render in a file of its own."
            ) from None
        raise ReportInputError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    return parse_report(data, source=str(path))


def parse_report(data: Any, *, source: str = "the input") -> SynopticReport:
    """A synoptic report from parsed JSON of any of the shapes :func:`load_report` reads."""
    if isinstance(data, dict) and "report" in data:
        synoptic = data["report"].get("synoptic") if isinstance(data["report"], dict) else None
        if synoptic is None:
            raise ReportInputError(
                f"{source} is an analysis whose report has no synoptic part (written before "
                "synoptic drafting existed); run `histopilot analyze` on the slide again."
            )
        return _validated(SynopticReport, synoptic, source)
    if isinstance(data, dict) and {"schema", "fields"} <= data.keys():
        record = _validated(ExtractionRecord, data, source)
        elements = _validated(schema_named(record.schema_name), record.fields, source)
        return SynopticReport(
            id=record.id,
            title=f"Report {record.id}: extracted elements",
            elements=elements,
            limitations=record.warnings,
            notice=EXTRACTION_NOTICE,
        )
    if isinstance(data, dict) and "elements" in data:
        return _validated(SynopticReport, data, source)
    raise ReportInputError(
        f"{source} is neither an analysis.json from `histopilot analyze`, a synoptic report, "
        'nor an extraction record ({"id", "schema", "fields"}).'
    )


def _validated(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'top level'}: {problem['msg']}"
            for problem in error.errors()[:3]
        )
        more = f" (and {error.error_count() - 3} more)" if error.error_count() > 3 else ""
        raise ReportInputError(
            f"{source} does not fit the report format: {problems}{more}."
        ) from None


def utc_now() -> datetime:
    """Now, in UTC, to the second: report times are read by people, not profilers."""
    return datetime.now(UTC).replace(microsecond=0)
