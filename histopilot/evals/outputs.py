"""What an evaluation produces, and how it is written: scores, tables, figures, a run card.

Runners return an :class:`Evaluation` (data only). :func:`write_evaluation` renders it into a
folder — ``scores.json`` (everything, machine-readable), ``report.md`` (the tables, ready to
paste into docs), one PNG per figure, ``items.jsonl`` (one row per scored item, to find the
failures) and ``run.json`` (the run card) — so every runner's output looks the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from histopilot.errors import HistopilotError
from histopilot.evals.card import RunCard
from histopilot.runcard import RUN_CARD
from histopilot.storage import atomic_file, check_new_output_folder

SCORES_FILE = "scores.json"
REPORT_FILE = "report.md"
ITEMS_FILE = "items.jsonl"


class Table(BaseModel):
    title: str
    header: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """A Markdown table; numbers right-aligned, floats to three decimals, None as '–'."""
        numeric = [
            all(isinstance(row[i], int | float) or row[i] is None for row in self.rows)
            for i in range(len(self.header))
        ]
        lines = [
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join(" ---: " if right else " --- " for right in numeric) + "|",
        ]
        lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in self.rows]
        return "\n".join(lines)


class Series(BaseModel):
    name: str
    x: list[float | str]
    y: list[float | None]


class Figure(BaseModel):
    """A plot described as data: rendered to PNG by :func:`render_figure`."""

    name: str = Field(description="File stem of the PNG")
    kind: Literal["bar", "line"]
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    y_range: tuple[float, float] | None = None


class Evaluation(BaseModel):
    """One runner's result: headline scores, tables, figures, per-item rows and the run card."""

    task: str
    scores: dict[str, Any]
    notes: list[str] = Field(default_factory=list, description="What a reader must know")
    tables: list[Table] = Field(default_factory=list)
    figures: list[Figure] = Field(default_factory=list)
    items: list[dict[str, Any]] = Field(default_factory=list)
    card: RunCard

    def markdown(self) -> str:
        parts = [f"# histopilot eval {self.task}", ""]
        parts += [f"- {note}" for note in self.notes]
        for table in self.tables:
            parts += ["", f"## {table.title}", "", table.markdown()]
        card = self.card
        parts += [
            "",
            f"{card.records} items in {card.seconds} s; data sha256 {card.data_sha256[:16]}… "
            f"over {card.data_files} file(s); models: "
            + "; ".join(f"{m.role}: {m.model or m.backend}" for m in card.models),
        ]
        return "\n".join(parts) + "\n"

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item rows: what ``--json`` prints."""
        return finite(self.model_dump(mode="json", exclude={"items"}))


def check_output_folder(out: Path) -> None:
    """Refuse, before any work, a folder that holds something other than an evaluation."""
    check_new_output_folder(out, what="evaluation", replaceable_marker=SCORES_FILE)


def write_evaluation(evaluation: Evaluation, out: Path) -> list[Path]:
    """Write the evaluation's files into ``out`` (an earlier evaluation there is replaced)."""
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write(out / SCORES_FILE, json.dumps(evaluation.summary(), indent=2, allow_nan=False)),
        _write(out / REPORT_FILE, evaluation.markdown()),
        _write(
            out / ITEMS_FILE,
            "".join(
                json.dumps(finite(item), ensure_ascii=False, allow_nan=False) + "\n"
                for item in evaluation.items
            ),
        ),
    ]
    written += [render_figure(figure, out / f"{figure.name}.png") for figure in evaluation.figures]
    written.append(_write(out / RUN_CARD, evaluation.card.model_dump_json(indent=2) + "\n"))
    return written


def render_figure(figure: Figure, path: Path) -> Path:
    """The figure as a PNG (matplotlib's Agg backend: no display needed)."""
    from matplotlib.figure import Figure as Canvas

    canvas = Canvas(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    axes = canvas.subplots()
    if figure.kind == "bar":
        width = 0.8 / max(1, len(figure.series))
        for offset, series in enumerate(figure.series):
            positions = [i + offset * width for i in range(len(series.x))]
            heights = [math.nan if y is None else y for y in series.y]
            axes.bar(positions, heights, width=width, label=series.name)
        axes.set_xticks(
            [i + width * (len(figure.series) - 1) / 2 for i in range(len(figure.series[0].x))],
            [str(x) for x in figure.series[0].x],
            rotation=30 if len(figure.series[0].x) > 4 else 0,
            ha="right" if len(figure.series[0].x) > 4 else "center",
        )
    else:
        for series in figure.series:
            points = [(x, y) for x, y in zip(series.x, series.y, strict=True) if y is not None]
            axes.plot(*zip(*points, strict=True), marker="o", label=series.name)
        ticks = {x for series in figure.series for x in series.x}
        if all(isinstance(x, int | float) for x in ticks) and len(ticks) <= 12:
            axes.set_xticks(sorted(ticks))
    if figure.y_range:
        axes.set_ylim(*figure.y_range)
    axes.set(title=figure.title, xlabel=figure.x_label, ylabel=figure.y_label)
    axes.grid(alpha=0.3)
    if len(figure.series) > 1:
        axes.legend()
    with atomic_file(path) as tmp:
        canvas.savefig(tmp, format="png")
    return path


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, which JSON can hold (an NRMSE
    against an all-black reference is infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def failure(error: Exception) -> str:
    """One item's failure as the notes and items record it. A runner scores hundreds of
    items against a model server for hours, so any exception one item raises (a server error,
    a CUDA out-of-memory, a bug) is recorded against that item and the run goes on."""
    if isinstance(error, HistopilotError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that exist; None when none do."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _write(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
