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

The same field comparisons score one report against another (:func:`field_agreement`), which
is how ``eval report-generation`` judges a generated report's content rather than its wording.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from histopilot.errors import ReportInputError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.outputs import Evaluation, Figure, Series, Table, failure
from histopilot.tools.report.schemas import category_group

Fields = dict[str, dict[str, Any]]
#: Report text → (schema name, fields, warnings), as ``extract_fields`` returns them.
Extractor = Callable[[str], tuple[str, Fields, list[str]]]


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


def extraction_tables(scores: ExtractionScores) -> list[Table]:
    """The per-field table as it goes into docs/evaluation.md, then the T and N confusions."""
    fields = Table(
        title="Per-field accuracy",
        header=[
            "field",
            "with gold",
            "accuracy (all)",
            "coverage",
            "stated",
            "accuracy (stated)",
            "gold never written",
        ],
        rows=[
            [
                s.field,
                s.with_gold,
                s.accuracy_all,
                s.coverage,
                s.stated,
                s.accuracy_stated,
                s.gold_not_written,
            ]
            for s in scores.fields
        ]
        + [
            [
                "**macro**",
                None,
                scores.macro_accuracy_all,
                None,
                None,
                scores.macro_accuracy_stated,
                None,
            ]
        ],
    )
    return [fields, *(_confusion(scores, axis) for axis in scores.confusion)]


def _confusion(scores: ExtractionScores, axis: str) -> Table:
    """The T or N confusion: gold rows, predicted columns, 'none' for an empty answer."""
    table = scores.confusion[axis]
    columns = [*sorted({c for row in table.values() for c in row} - {"none"}), "none"]
    return Table(
        title=f"{axis} confusion (rows gold, columns predicted)",
        header=[f"gold {axis}", *columns],
        rows=[[gold, *(row.get(c, 0) for c in columns)] for gold, row in table.items()],
    )


def extraction_figure(scores: ExtractionScores) -> Figure:
    return Figure(
        name="fields",
        kind="bar",
        title="Extraction accuracy per field",
        x_label="field",
        y_label="accuracy",
        y_range=(0.0, 1.0),
        series=[
            Series(
                name="all records with gold",
                x=[s.field for s in scores.fields],
                y=[s.accuracy_all for s in scores.fields],
            ),
            Series(
                name="records that state the field",
                x=[s.field for s in scores.fields],
                y=[s.accuracy_stated for s in scores.fields],
            ),
        ],
    )


class FieldAgreement(BaseModel):
    """How far one report's synoptic fields agree with another's, field by field."""

    field: str
    in_reference: int = Field(description="Pairs whose reference states the field")
    agree: int = Field(description="…of which the generated report gives the same value")
    missing: int = Field(description="…of which the generated report gives no value")
    unsupported: int = Field(
        description="Pairs whose generated report states a value the reference does not"
    )
    agreement: float | None


def field_outcomes(reference: Fields, generated: Fields) -> dict[str, tuple[Any, Any, str]]:
    """Each field either report states: (reference value, generated value, outcome), the
    outcome being ``agree``, ``differ``, ``missing`` (only the reference states it) or
    ``unsupported`` (only the generated report does). Values are compared after the same
    normalisation as the gold comparison (groups, case, G codes)."""
    outcomes = {}
    for check in CHECKS:
        expected, given = check.predicted(reference), check.predicted(generated)
        if expected is None and given is None:
            continue
        if expected is None:
            outcome = "unsupported"
        elif given is None:
            outcome = "missing"
        else:
            outcome = "agree" if check.same(given, expected) else "differ"
        outcomes[check.name] = (expected, given, outcome)
    return outcomes


def field_agreement(pairs: Iterable[tuple[Fields, Fields]]) -> list[FieldAgreement]:
    """Agreement of (reference fields, generated fields) pairs, both read by one extractor.

    This is the clinically aware half of report scoring: a fluent report with the wrong T
    category scores high on BLEU and low here.
    """
    tallies = {check.name: Counter() for check in CHECKS}
    for reference, generated in pairs:
        for name, (_, _, outcome) in field_outcomes(reference, generated).items():
            tallies[name][outcome] += 1
    scores = []
    for name, t in tallies.items():
        stated = t["agree"] + t["differ"] + t["missing"]
        if stated or t["unsupported"]:
            scores.append(
                FieldAgreement(
                    field=name,
                    in_reference=stated,
                    agree=t["agree"],
                    missing=t["missing"],
                    unsupported=t["unsupported"],
                    agreement=t["agree"] / stated if stated else None,
                )
            )
    return scores


def extract_texts(
    texts: dict[str, str],
    extractor: Extractor,
    *,
    workers: int = 1,
    on_done: Callable[[], None] | None = None,
) -> tuple[dict[str, Fields], dict[str, str]]:
    """The fields of each text by id, and why each text that could not be read failed;
    ``workers`` requests in flight at once (for model servers; rules need one)."""

    def extracted(item: tuple[str, str]) -> tuple[str, Fields | str]:
        try:
            return item[0], extractor(item[1])[1]
        except Exception as error:  # noqa: BLE001 (see outputs.failure)
            return item[0], failure(error)

    fields, failures = {}, {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, result in pool.map(extracted, texts.items()):
            if isinstance(result, str):
                failures[key] = result
            else:
                fields[key] = result
            if on_done:
                on_done()
    return fields, failures


def evaluate_extraction(
    data: Path,
    extractor: Extractor,
    *,
    models: list[ModelRecord],
    options: dict[str, Any],
    workers: int = 1,
    on_done: Callable[[], None] | None = None,
) -> Evaluation:
    """Per-field accuracy of ``extractor`` on the gold records of ``data``."""
    clock = Stopwatch()
    records = read_gold(data)
    predictions, failures = extract_texts(
        {record.report_id: record.text for record in records},
        extractor,
        workers=workers,
        on_done=on_done,
    )
    scores = score(records, predictions)
    return Evaluation(
        task="extraction",
        scores=scores.model_dump(mode="json"),
        notes=[
            "accuracy (all): correct / records with a gold value; accuracy (stated): the same "
            "over records whose text states the field",
            *(f"{key} could not be read: {reason}" for key, reason in failures.items()),
        ],
        tables=extraction_tables(scores),
        figures=[extraction_figure(scores)],
        items=[
            {
                "report_id": record.report_id,
                "project": record.tcga_project,
                "error": failures.get(record.report_id),
                "fields": {
                    name: field.get("value")
                    for name, field in predictions.get(record.report_id, {}).items()
                },
            }
            for record in records
        ],
        card=run_card(
            "extraction",
            clock,
            data=[data],
            records=len(records),
            options=options,
            models=models,
        ),
    )
