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


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


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


def _same_grade(predicted: Any, gold: Any) -> bool:
    """Equal, or the WHO 1973 → 2004 correspondence when the gold is two-tier (urothelium):
    G3–G4 are high grade and G1 low grade; G2 straddles both and never matches."""
    if predicted == gold:
        return True
    return {"g1": "low", "g3": "high", "g4": "high"}.get(predicted) == gold


def _receptor(value: Any) -> str | None:
    text = _lower(value)
    return "positive" if text == "low positive" else text


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
    "M": r"(?<![A-Za-z0-9])(?:y?p|c)\s?M\s?[01Oo][a-d]?(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9])N[0-3OX][a-c]?\s?,?\s?M[01O](?![A-Za-z0-9])",
    "nodes": r"(?:lymph\s+nodes?|nodes?)[^.;]{0,60}\d|\d+\s*/\s*\d+"
    r"|\b(?:one|two|three|four|five|six|seven|eight|nine|ten)\b[^.;]{0,30}lymph\s+nodes?",
    "ER": r"(?:\bER\b|estrogen|oestrogen)[^.;]{0,60}(?:positive|negative|%|\+|-)",
    "PR": r"(?:\bPR\b|\bPgR\b|progesterone)[^.;]{0,60}(?:positive|negative|%|\+|-)",
    "HER2": r"her[\s-]?2[^.;]{0,60}(?:positive|negative|equivocal|[0-3]\s?\+)",
    "HER2 score": r"her[\s-]?2[^.;]{0,60}(?:[0-3]\s?\+|score)",
    "HER2 ISH": r"her[\s-]?2[^;]{0,80}(?:FISH|ISH\b|amplif)|(?:FISH|ISH\b)[^;]{0,80}her[\s-]?2",
    "gleason": r"gleason[^.;]{0,60}\d",
    "margin": r"margins?[^.;]{0,60}(?:negative|positive|free|involved|uninvolved|clear|close)",
    "grade": r"\bgrade\b|differentiated|(?<![A-Za-z0-9])G[1-4](?![0-9])",
    "residual": r"(?<![A-Za-z0-9])R\s?[0-2OX](?![0-9A-Za-z])",
    "histology": r"carcinoma|melanoma|mesothelioma|seminoma|sarcoma|germ\s+cell",
}


#: Every T or N category a text may be writing, broadly: any "T2"/"N1"-like token, prefixed or
#: not, and OCR's O, I, l for 0 and 1 after a prefix or inside a T N run ("pNO", "T2NO"), never
#: in a word such as "No". Broad on purpose: a record counts as "gold never written" only when
#: no token anywhere could be its gold.
_WRITTEN = {
    letter: re.compile(
        rf"(?<![A-Za-z0-9])(?:y?p|c|P)?\s?{letter}\s?([0-4])(?![0-9])"
        rf"|(?<![A-Za-z0-9])(?:y?p|c|P)\s?{letter}\s?([OIl])[a-d]?(?![a-z])"
        rf"|(?<=[0-4a-dX])\s?,?\s?{letter}\s?([OIl])[a-d]?(?![a-z])"
    )
    for letter in "TN"
}


def _written(letter: str) -> Callable[[str], set[str]]:
    """The T (or N) groups a text writes anywhere, prefixed or not."""
    ocr = {"O": "0", "o": "0", "l": "1", "I": "1"}
    return lambda text: {
        f"{letter}{ocr.get(digit, digit)}"
        for groups in _WRITTEN[letter].findall(text)
        for digit in groups
        if digit
    }


@dataclass(frozen=True)
class FieldCheck:
    """How one gold field is compared with what an extractor returned."""

    name: str
    gold_key: str
    predicted: Callable[[Fields], Any]
    gold: Callable[[Any], Any]
    stated: str
    same: Callable[[Any, Any], bool] = lambda predicted, gold: predicted == gold
    written: Callable[[str], set[str]] | None = None
    """Every value the text writes for the field, where that can be read simply: a record whose
    gold is none of them disagrees with its own text."""


CHECKS: tuple[FieldCheck, ...] = (
    FieldCheck("T category", "t_group", _value("pT", _group), str, "T", written=_written("T")),
    FieldCheck("N category", "n_group", _value("pN", _group), str, "N", written=_written("N")),
    FieldCheck("M category", "m_group", _value("pM", _group), str, "M"),
    FieldCheck(
        "histologic type (ICD-O-3)",
        "icd_o_3_histology",
        _value("histologic_type_icdo3", _text),
        str,
        "histology",
    ),
    FieldCheck("grade", "histologic_grade", _value("grade", _grade), _grade, "grade", _same_grade),
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
    FieldCheck(
        "HER2 IHC status", "her2_ihc_status", _value("her2_ihc_status", _lower), _lower, "HER2"
    ),
    FieldCheck(
        "HER2 IHC score", "her2_ihc_score", _value("her2_ihc_score", _lower), _lower, "HER2 score"
    ),
    FieldCheck(
        "HER2 ISH status", "her2_ish_status", _value("her2_ish_status", _lower), _ish, "HER2 ISH"
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
    gold_not_written: int | None = Field(
        None,
        description="Records that state the field but never write the gold value (T and N)",
    )
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
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ReportInputError(
            f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8 JSON lines"
        ) from None
    records = []
    for number, line in enumerate(lines, 1):
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
            if stated and check.written is not None:
                tally.update(gold_not_written=expected not in check.written(record.text))
            right = predicted is not None and check.same(predicted, expected)
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
            gold_not_written=t["gold_not_written"] if check.written is not None else None,
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
        "| field | with gold | accuracy (all) | coverage | stated | accuracy (stated) "
        "| gold never written |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scores.fields:
        stated = f"{s.accuracy_stated:.3f}" if s.accuracy_stated is not None else "–"
        unwritten = "–" if s.gold_not_written is None else str(s.gold_not_written)
        lines.append(
            f"| {s.field} | {s.with_gold} | {s.accuracy_all:.3f} | {s.coverage:.3f} "
            f"| {s.stated} | {stated} | {unwritten} |"
        )
    lines.append(
        f"| **macro** | | **{scores.macro_accuracy_all:.3f}** | | "
        f"| **{scores.macro_accuracy_stated:.3f}** | |"
    )
    return "\n".join(lines)


def confusion_table(scores: ExtractionScores, axis: str) -> str:
    """The T or N confusion (gold rows, predicted columns) as a Markdown table."""
    table = scores.confusion[axis]
    columns = [*sorted({c for row in table.values() for c in row} - {"none"}), "none"]
    lines = [
        f"| gold {axis} | " + " | ".join(columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    lines += [
        f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |"
        for gold, row in table.items()
    ]
    return "\n".join(lines)
