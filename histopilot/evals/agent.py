"""The whole agent loop on labelled slides: accuracy against how much of the slide it read.

Each slide of a table (``slide``, ``label``, optional ``mpp``) goes through the same
:func:`~histopilot.agents.run.run_analysis` as ``histopilot analyze``, once per region budget.
The diagnosis's label (or its name) is mapped onto the set's labels (``--map
cellular-atypical=tumour``); an indeterminate diagnosis is scored as such, never as a guess.
Reported per budget: accuracy, balanced accuracy, top-3 accuracy of the differential, regions
examined, tissue tiles an exhaustive pass would read, and wall time, and the curve of accuracy
against regions examined that PathFinder and SlideSeek report for their agents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.context import AgentContext
from histopilot.agents.run import run_analysis
from histopilot.errors import TrainingDataError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.metrics import classification_scores
from histopilot.evals.outputs import Evaluation, Figure, Series, Table, failure, mean
from histopilot.evals.tables import positive_number, read_rows
from histopilot.finetune.conversations import ConversionReport

INDETERMINATE = "indeterminate"
FAILED = "failed"


class LabelledSlide(BaseModel):
    path: Path
    label: str
    mpp: float | None = None


def read_slides(table: Path) -> tuple[list[LabelledSlide], ConversionReport]:
    """The slides of a table with ``slide`` and ``label`` columns (paths relative to it) and
    an optional ``mpp``; rows naming no readable file or a bad mpp are skipped with the reason."""
    rows, report = read_rows(
        table, ("slide", "label"), optional=("mpp",), text_columns=("slide", "label")
    )
    slides = []
    for key, row in rows.items():
        path = table.parent / str(row["slide"]).strip()
        mpp = positive_number(row.get("mpp"))
        if not path.is_file():
            report.skip(key, f"no slide at {path}")
        elif mpp is None and str(row.get("mpp") or "").strip():
            report.skip(key, f"mpp {row['mpp']!r} is not a positive number")
        else:
            slides.append(LabelledSlide(path=path, label=str(row["label"]).strip(), mpp=mpp))
    report.kept = len(slides)
    if not slides:
        raise TrainingDataError(f"{table} names no usable slides ({report.summary()})")
    return slides, report


def set_label(label: str, name: str, mapping: dict[str, str], labels: Sequence[str]) -> str:
    """The set's label a diagnosis label stands for: mapped by ``mapping`` (from the label or
    its name), else the set label equal to either, ignoring case; else the label as it is."""
    for said in (label, name):
        if said in mapping:
            return mapping[said]
    by_case = {known.lower(): known for known in labels}
    for said in (label, name):
        if said.lower() in by_case:
            return by_case[said.lower()]
    return label


def evaluate_agent(
    table: Path,
    agents: Callable[[], AgentContext],
    *,
    budgets: Sequence[int] | None,
    mapping: dict[str, str],
    models: list[ModelRecord],
    options: dict[str, Any],
    on_done: Callable[[str], None] | None = None,
) -> Evaluation:
    """Run the slides of ``table`` through the agents ``agents()`` loads (after the table is
    read, so a mistake in it costs no model loading), once per budget (default: the
    configured one)."""
    clock = Stopwatch()
    slides, report = read_slides(table)
    labels = sorted({slide.label for slide in slides})
    context = agents()
    budgets = list(budgets or [context.settings.budget])
    items = []
    try:
        for slide in slides:  # one slide open at a time, shared by its budgets
            for budget in budgets:
                run_context = replace(context.with_settings(budget=budget), slide_mpp=slide.mpp)
                items.append(_analysed(slide, run_context, budget, mapping, labels))
                if on_done:
                    on_done(f"budget {budget}: {slide.path.name} → {items[-1]['predicted']}")
            context.release(slide.path)
    finally:
        context.close()
    options = options | {"budgets": budgets, "settings": context.settings.model_dump()}
    per_budget = [
        _budget_scores(budget, [i for i in items if i["budget"] == budget]) for budget in budgets
    ]
    return Evaluation(
        task="agent",
        scores={"slides": len(slides), "labels": labels, "budgets": per_budget},
        notes=[
            "each slide through `analyze` once per budget (regions per trajectory, at most); "
            "an indeterminate or failed analysis counts as wrong",
            "balanced accuracy: recall averaged over the set's labels; top-3: the label among "
            "the first three of the differential (DDxBench's second figure)",
            *sorted({f"{i['slide']}: {i['error']}" for i in items if i["error"]}),
            *([report.summary()] if report.skipped else []),
        ],
        tables=[
            Table(
                title="Per budget",
                header=[
                    "budget",
                    "slides",
                    "accuracy",
                    "balanced accuracy",
                    "top-3",
                    "indeterminate",
                    "regions examined",
                    "tissue tiles",
                    "seconds per slide",
                ],
                rows=[
                    [
                        s["budget"],
                        s["slides"],
                        s["accuracy"],
                        s["balanced_accuracy"],
                        s["top_3"],
                        s["indeterminate"],
                        s["regions"],
                        s["tissue_tiles"],
                        s["seconds"],
                    ]
                    for s in per_budget
                ],
            ),
            Table(
                title="Per slide",
                header=[
                    "budget",
                    "slide",
                    "label",
                    "predicted",
                    "diagnosis",
                    "confidence",
                    "regions",
                ],
                rows=[
                    [
                        i["budget"],
                        i["slide"],
                        i["label"],
                        i["predicted"],
                        i["diagnosis"],
                        i["confidence"],
                        i["regions"],
                    ]
                    for i in items
                ],
            ),
        ],
        figures=[
            Figure(
                name="accuracy-vs-regions",
                kind="line",
                title="Accuracy against regions examined",
                x_label="regions examined per slide (mean)",
                y_label="score",
                y_range=(0.0, 1.0),
                series=[
                    Series(
                        name=name,
                        x=[s["regions"] for s in per_budget],
                        y=[s[key] for s in per_budget],
                    )
                    for name, key in (
                        ("accuracy", "accuracy"),
                        ("balanced accuracy", "balanced_accuracy"),
                    )
                ],
            )
        ],
        items=items,
        card=run_card(
            "agent",
            clock,
            data=[table, *(slide.path for slide in slides)],
            records=len(items),
            options=options,
            models=models,
            seed=context.settings.seed,
        ),
    )


def _analysed(slide, context, budget, mapping, labels) -> dict[str, Any]:
    item = {"budget": budget, "slide": slide.path.name, "label": slide.label, "error": None}
    try:
        with open_checkpointer("memory", Path("unused")) as checkpointer:
            run = run_analysis(slide.path, context, checkpointer)
    except Exception as error:  # noqa: BLE001 (see outputs.failure)
        return item | {
            "predicted": FAILED,
            "diagnosis": None,
            "differential": [],
            "confidence": None,
            "regions": None,
            "tissue_tiles": None,
            "seconds": None,
            "error": failure(error),
        }
    diagnosis = run.state["diagnosis"]
    ranked = [
        set_label(h.label, h.name, mapping, labels) for h in run.state["differential"].hypotheses
    ]
    return item | {
        "predicted": INDETERMINATE
        if diagnosis.indeterminate
        else set_label(diagnosis.label, diagnosis.name, mapping, labels),
        "diagnosis": diagnosis.label,
        "differential": list(dict.fromkeys(ranked)),
        "confidence": round(diagnosis.confidence, 4),
        "regions": len(run.state.get("regions", {})),
        "tissue_tiles": run.state["triage"].tiles,
        "seconds": round(run.seconds, 2),
    }


def _budget_scores(budget: int, items: list[dict]) -> dict[str, Any]:
    scores = classification_scores([i["label"] for i in items], [i["predicted"] for i in items])
    return {
        "budget": budget,
        "slides": len(items),
        "accuracy": scores.accuracy,
        "balanced_accuracy": scores.balanced_accuracy,
        "top_3": sum(i["label"] in i["differential"][:3] for i in items) / len(items),
        "indeterminate": sum(i["predicted"] == INDETERMINATE for i in items),
        "regions": mean([i["regions"] for i in items]),
        "tissue_tiles": mean([i["tissue_tiles"] for i in items]),
        "seconds": mean([i["seconds"] for i in items]),
    }
