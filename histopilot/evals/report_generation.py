"""Generated reports against reference reports: language overlap and synoptic agreement.

Overlap scores (BLEU, ROUGE-L, METEOR, CIDEr) reward wording; a fluent report with the wrong
T category still scores high on them. So both reports are also read by the same extractor and
their synoptic fields compared (:func:`~histopilot.evals.extraction.field_agreement`): the
clinically aware half of the score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from histopilot.errors import TrainingDataError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.extraction import (
    Extractor,
    extract_texts,
    field_agreement,
    field_outcomes,
)
from histopilot.evals.metrics import text_scores, token_f1
from histopilot.evals.outputs import Evaluation, Figure, Series, Table
from histopilot.evals.tables import read_rows

COLUMNS = ("reference", "generated")


def evaluate_report_generation(
    data: Path,
    extractor: Extractor,
    *,
    models: list[ModelRecord],
    options: dict[str, Any],
    columns: dict[str, str] | None = None,
    workers: int = 1,
    meteor: bool = True,
    on_done: Callable[[], None] | None = None,
) -> Evaluation:
    """Score each row's ``generated`` report against its ``reference`` report."""
    clock = Stopwatch()
    rows, read = read_rows(data, COLUMNS, columns, text_columns=COLUMNS)
    if not rows:
        raise TrainingDataError(f"{data} holds no pairs of reports to compare ({read.summary()})")
    texts = {f"{key}:{side}": row[side] for key, row in rows.items() for side in COLUMNS}
    fields, failures = extract_texts(texts, extractor, workers=workers, on_done=on_done)
    pairs = {
        key: (fields[f"{key}:reference"], fields[f"{key}:generated"])
        for key in rows
        if f"{key}:reference" in fields and f"{key}:generated" in fields
    }
    language = text_scores(
        [row["generated"] for row in rows.values()],
        [[row["reference"]] for row in rows.values()],
        meteor=meteor,
    )
    agreement = field_agreement(pairs.values())
    compared = sum(a.in_reference for a in agreement)
    overall = sum(a.agree for a in agreement) / compared if compared else None
    macro = [a.agreement for a in agreement if a.agreement is not None]
    notes = [
        "text metrics on lower-cased word tokens; CIDEr's weights come from this set's "
        "references, so it compares runs on the same set only",
        "field agreement: both reports read by the same extractor; agreement = the generated "
        "report gives the reference's value, over pairs whose reference states the field",
    ]
    if language.meteor_note:
        notes.append(language.meteor_note)
    notes += [f"{key} could not be read: {reason}" for key, reason in failures.items()]
    if read.skipped:
        notes.append(read.summary())
    return Evaluation(
        task="report-generation",
        scores={
            "pairs": len(rows),
            "text": language.model_dump(),
            "field_agreement": overall,
            "field_agreement_macro": sum(macro) / len(macro) if macro else None,
            "unsupported_fields": sum(a.unsupported for a in agreement),
            "fields": [a.model_dump() for a in agreement],
        },
        notes=notes,
        tables=[
            Table(
                title="Language overlap (corpus level)",
                header=["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr"],
                rows=[
                    [
                        language.bleu_1,
                        language.bleu_2,
                        language.bleu_3,
                        language.bleu_4,
                        language.rouge_l,
                        language.meteor,
                        language.cider,
                    ]
                ],
            ),
            Table(
                title="Synoptic field agreement",
                header=["field", "in reference", "agree", "missing", "unsupported", "agreement"],
                rows=[
                    [a.field, a.in_reference, a.agree, a.missing, a.unsupported, a.agreement]
                    for a in agreement
                ]
                + [["**all fields**", compared, None, None, None, overall]],
            ),
        ],
        figures=[
            Figure(
                name="field-agreement",
                kind="bar",
                title="Synoptic field agreement, generated vs reference",
                x_label="field",
                y_label="agreement",
                y_range=(0.0, 1.0),
                series=[
                    Series(
                        name="agreement",
                        x=[a.field for a in agreement],
                        y=[a.agreement for a in agreement],
                    )
                ],
            )
        ]
        if agreement
        else [],
        items=[
            {
                "id": key,
                "token_f1": round(token_f1(row["generated"], row["reference"]), 4),
                "disagreeing_fields": {
                    name: [expected, given]
                    for name, (expected, given, outcome) in field_outcomes(*pairs[key]).items()
                    if outcome != "agree"
                }
                if key in pairs
                else None,
            }
            for key, row in rows.items()
        ],
        card=run_card(
            "report-generation",
            clock,
            data=[data],
            records=len(rows),
            options=options,
            models=models,
        ),
    )
