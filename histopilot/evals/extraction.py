"""How well an extractor reads reports: per-field accuracy against gold structured fields.

The gold file is JSON lines with ``text`` and ``gold`` (the TCGA format: gold values abstracted
from clinical records, not annotated on the text). Three figures per field:

- **accuracy (all)**: correct / records with a gold value. A field the extractor leaves empty
  counts as wrong, so this rewards deriving what a report never writes.
- **coverage**: records where the extractor gave a value / records with a gold value.
- **accuracy (stated)**: correct / records with a gold value *whose text states the field*.

"States the field" is decided by a broad pattern per field, written here and independent of the
extractor's own patterns (a pT-like token for T, a receptor name followed by a result word for
ER …). A record whose text states the field but which the extractor misses or misreads counts
against it; records whose gold disagrees with what the text states stay in, so part of every
shortfall is the gold's and not the extractor's.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from histopilot.errors import ReportInputError
from histopilot.tools.report.schemas import category_group

Fields = dict[str, dict[str, Any]]


class GoldRecord(BaseModel):
    report_id: str
    text: str
    tcga_project: str | None = None
    gold: dict[str, Any]


def _lower(value: Any) -> str | None:
    return None if value is None else str(value).strip().lower()


def _integer(value: Any) -> int | None:
    try:
        return None if value is None else int(float(value))
    except (TypeError, ValueError):
        return None


def _group(value: Any) -> str | None:
    group = category_group(value)
    return None if group is None or group.endswith("X") else group


def _grade(value: Any) -> str | None:
    text = _lower(value)
    if text is None:
        return None
    if text in ("1", "2", "3", "4"):
        return f"g{text}"
    return {"high grade": "high", "low grade": "low"}.get(text, text)


def _receptor(value: Any) -> str | None:
    text = _lower(value)
    return "positive" if text == "low positive" else text


def _her2_ihc(fields: Fields) -> str | None:
    score = fields.get("her2_ihc_score", {}).get("value")
    if score is not None:
        return {"3+": "positive", "2+": "equivocal"}.get(score, "negative")
    return _lower(fields.get("her2_status", {}).get("value"))


def _ish(value: Any) -> str | None:
    text = _lower(value)
    return {"positive": "amplified", "negative": "not amplified"}.get(text, text)


def _value(name: str, normalise: Callable[[Any], Any]) -> Callable[[Fields], Any]:
    return lambda fields: normalise(fields.get(name, {}).get("value"))


_DIGIT = r"[0-4OolI]"
_STATED = {
    "T": rf"(?<![A-Za-z0-9])(?:y?p|c|P)\s?T\s?(?:{_DIGIT}|is)"
    rf"|(?<![A-Za-z0-9])T{_DIGIT}[a-d]?\s?,?\s?N[0-3OX]|primary\s+tumou?r\s*\(p?T\)",
    "N": rf"(?<![A-Za-z0-9])(?:y?p|c)\s?N\s?{_DIGIT}"
    rf"|(?<![A-Za-z0-9])T{_DIGIT}[a-d]?\s?,?\s?N{_DIGIT}"
    rf"|regional\s+lymph\s+nodes\s*\(p?N\)\s*:\s*p?N\s?{_DIGIT}",
    "M": r"(?<![A-Za-z0-9])(?:y?p|c)?M\s?[01Oo](?![0-9])[a-d]?",
    "nodes": r"(?:lymph\s+nodes?|nodes?)[^.;]{0,60}\d|\d+\s*/\s*\d+"
    r"|\b(?:one|two|three|four|five|six|seven|eight|nine|ten)\b[^.;]{0,30}lymph\s+nodes?",
    "ER": r"(?:\bER\b|estrogen|oestrogen)[^.;]{0,60}(?:positive|negative|%|\+|-)",
    "PR": r"(?:\bPR\b|\bPgR\b|progesterone)[^.;]{0,60}(?:positive|negative|%|\+|-)",
    "HER2": r"her[\s-]?2[^.;]{0,60}(?:positive|negative|equivocal|[0-3]\s?\+|amplif)",
    "gleason": r"gleason[^.;]{0,60}\d",
    "margin": r"margins?[^.;]{0,60}(?:negative|positive|free|involved|uninvolved|clear|close)",
    "grade": r"\bgrade\b|differentiated|(?<![A-Za-z0-9])G[1-4](?![0-9])",
    "residual": r"(?<![A-Za-z0-9])R\s?[0-2OX](?![0-9A-Za-z])",
    "histology": r"carcinoma|melanoma|mesothelioma|seminoma|sarcoma|germ\s+cell",
}


@dataclass(frozen=True)
class FieldCheck:
    """How one gold field is compared with what an extractor returned."""

    name: str
    gold_key: str
    predicted: Callable[[Fields], Any]
    gold: Callable[[Any], Any]
    stated: str


CHECKS: tuple[FieldCheck, ...] = (
    FieldCheck("T category", "t_group", _value("pT", _group), str, "T"),
    FieldCheck("N category", "n_group", _value("pN", _group), str, "N"),
    FieldCheck("M category", "m_group", _value("pM", _group), str, "M"),
    FieldCheck(
        "histologic type (ICD-O-3)",
        "icd_o_3_histology",
        _value("histologic_type_icdo3", str),
        str,
        "histology",
    ),
    FieldCheck("grade", "histologic_grade", _value("grade", _grade), _grade, "grade"),
    FieldCheck("margin status", "margin_status", _value("margin_status", _lower), _lower, "margin"),
    FieldCheck(
        "residual tumour", "residual_tumor", _value("residual_tumor", _lower), _lower, "residual"
    ),
    FieldCheck(
        "lymph nodes examined",
        "lymph_nodes_examined",
        _value("lymph_nodes_examined", _integer),
        _integer,
        "nodes",
    ),
    FieldCheck(
        "lymph nodes positive",
        "lymph_nodes_positive_he",
        _value("lymph_nodes_positive", _integer),
        _integer,
        "nodes",
    ),
    FieldCheck("ER status", "er_status", _value("er_status", _receptor), _lower, "ER"),
    FieldCheck("PR status", "pr_status", _value("pr_status", _receptor), _lower, "PR"),
    FieldCheck("HER2 IHC status", "her2_ihc_status", _her2_ihc, _lower, "HER2"),
    FieldCheck(
        "HER2 IHC score", "her2_ihc_score", _value("her2_ihc_score", _lower), _lower, "HER2"
    ),
    FieldCheck(
        "HER2 ISH status", "her2_ish_status", _value("her2_ish_status", _lower), _ish, "HER2"
    ),
    FieldCheck(
        "Gleason primary",
        "gleason_primary_pattern",
        _value("gleason_primary", _integer),
        _integer,
        "gleason",
    ),
    FieldCheck(
        "Gleason secondary",
        "gleason_secondary_pattern",
        _value("gleason_secondary", _integer),
        _integer,
        "gleason",
    ),
    FieldCheck(
        "Gleason score", "gleason_score", _value("gleason_score", _integer), _integer, "gleason"
    ),
)


class FieldScore(BaseModel):
    field: str
    gold_key: str
    with_gold: int = Field(description="Records with a gold value")
    covered: int = Field(description="…of which the extractor gave a value")
    correct: int
    stated: int = Field(description="Records with a gold value whose text states the field")
    correct_stated: int
    accuracy_all: float
    coverage: float
    accuracy_stated: float | None


class ExtractionScores(BaseModel):
    records: int
    failed: list[str] = Field(default_factory=list, description="Ids the extractor could not read")
    fields: list[FieldScore]
    macro_accuracy_all: float
    macro_accuracy_stated: float
    confusion: dict[str, dict[str, dict[str, int]]] = Field(
        description="For T and N: gold group → predicted group ('none' when empty) → count"
    )


def read_gold(path: Path) -> list[GoldRecord]:
    """The gold records of a JSON-lines file; a malformed line names its number."""
    if not path.is_file():
        raise ReportInputError(
            f"{path} does not exist; pass a JSON-lines file with 'text' and 'gold'"
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(GoldRecord.model_validate_json(line))
        except ValidationError as error:
            raise ReportInputError(
                f"{path}:{number} is not a gold record (needs report_id, text and gold): "
                f"{error.errors()[0]['msg']}"
            ) from None
    if not records:
        raise ReportInputError(f"{path} holds no records")
    return records


def score(records: Iterable[GoldRecord], predictions: dict[str, Fields]) -> ExtractionScores:
    """Compare predictions (record id → flat fields) with the gold of each record."""
    records = list(records)
    tallies = {check.name: Counter() for check in CHECKS}
    confusion: dict[str, dict[str, Counter]] = {"T": {}, "N": {}}
    stated_patterns = {
        key: re.compile(pattern, re.IGNORECASE if key not in ("T", "N", "M", "residual") else 0)
        for key, pattern in _STATED.items()
    }
    for record in records:
        fields = predictions.get(record.report_id)
        for check in CHECKS:
            gold = record.gold.get(check.gold_key)
            if gold is None:
                continue
            tally = tallies[check.name]
            expected = check.gold(gold)
            predicted = check.predicted(fields) if fields is not None else None
            stated = bool(stated_patterns[check.stated].search(record.text))
            right = predicted is not None and predicted == expected
            tally.update(
                with_gold=1,
                covered=predicted is not None,
                correct=right,
                stated=stated,
                correct_stated=right and stated,
            )
            if check.gold_key in ("t_group", "n_group"):
                table = confusion[check.gold_key[0].upper()].setdefault(str(expected), Counter())
                table[str(predicted) if predicted is not None else "none"] += 1
    scores = [
        FieldScore(
            field=check.name,
            gold_key=check.gold_key,
            with_gold=t["with_gold"],
            covered=t["covered"],
            correct=t["correct"],
            stated=t["stated"],
            correct_stated=t["correct_stated"],
            accuracy_all=t["correct"] / t["with_gold"],
            coverage=t["covered"] / t["with_gold"],
            accuracy_stated=t["correct_stated"] / t["stated"] if t["stated"] else None,
        )
        for check in CHECKS
        if (t := tallies[check.name])["with_gold"]
    ]
    stated_scores = [s.accuracy_stated for s in scores if s.accuracy_stated is not None]
    return ExtractionScores(
        records=len(records),
        failed=sorted({r.report_id for r in records} - set(predictions)),
        fields=scores,
        macro_accuracy_all=sum(s.accuracy_all for s in scores) / max(1, len(scores)),
        macro_accuracy_stated=sum(stated_scores) / max(1, len(stated_scores)),
        confusion={
            axis: {g: dict(sorted(c.items())) for g, c in sorted(t.items())}
            for axis, t in confusion.items()
        },
    )


def markdown_table(scores: ExtractionScores) -> str:
    """The per-field table, as it goes into docs/evaluation.md."""
    lines = [
        "| field | with gold | accuracy (all) | coverage | stated | accuracy (stated) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scores.fields:
        stated = f"{s.accuracy_stated:.3f}" if s.accuracy_stated is not None else "–"
        lines.append(
            f"| {s.field} | {s.with_gold} | {s.accuracy_all:.3f} | {s.coverage:.3f} "
            f"| {s.stated} | {stated} |"
        )
    lines.append(
        f"| **macro** | | **{scores.macro_accuracy_all:.3f}** | | "
        f"| **{scores.macro_accuracy_stated:.3f}** |"
    )
    return "\n".join(lines)


def write_json(path: Path, scores: ExtractionScores) -> None:
    path.write_text(json.dumps(scores.model_dump(mode="json"), indent=2), encoding="utf-8")
