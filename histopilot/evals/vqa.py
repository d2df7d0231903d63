"""Visual question answering: closed (yes/no, multiple choice) and open questions about images.

The set is a table of image, question and answer (optionally choices), the layout of
PathMMU, Quilt-VQA and PathVQA exports. Closed answers are scored by exact match after
normalisation; open answers by exact match, token F1 and the text metrics.

Image questions go to the configured describer model (any backend: a vLLM server,
transformers) or, offline, to a *reference-bank baseline* that names the tissue class of the
image's nearest labelled patches and answers from that. The baseline can only answer questions
about tissue class; it is the floor a model must clear, not a describer. Questions whose image
is a whole slide (SlideBench, WSI-VQA) go to the chat agent, which navigates the slide with its
tools as it does for a person, so they need an orchestrator model.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, Field

from histopilot.agents.chat import ChatSession
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.context import AgentContext
from histopilot.errors import HistopilotError, TrainingDataError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.metrics import exact_match, normalise_answer, text_scores, token_f1
from histopilot.evals.outputs import Evaluation, Figure, Series, Table, failure
from histopilot.evals.tables import positive_number, read_rows
from histopilot.finetune.conversations import ConversionReport
from histopilot.finetune.tables import ImageCells
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.reference import ReferenceBank, at_encoder_scale
from histopilot.retrieval.search import load_query_image
from histopilot.serve.messages import image_part
from histopilot.slide.readers import WHOLE_SLIDE_SUFFIXES

Kind = Literal["yes/no", "multiple choice", "open"]
COLUMNS = ("image", "question", "answer")
OPTIONAL = ("choices", "type", "mpp")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NO_DESCRIBER = (
    "the offline describer does not answer questions about images: pass --reference INDEX (a "
    "labelled patch index, for the nearest-patch baseline) or configure the describer's model "
    "(--backend openai|transformers, or --profile gpu)"
)
NO_CHAT = (
    "a question about a whole slide needs the chat agent: configure [roles.orchestrator] with "
    "a model (or --profile gpu)"
)
SYSTEM_PROMPT = (
    "You are a pathologist answering a question about one histology image. Answer from what "
    "the image shows. Be brief: for a yes/no question answer yes or no; for a multiple-choice "
    "question answer with the letter of one option; otherwise answer in a few words."
)
#: "A) adipose", "(b) mucus", "C. debris": the option letters benchmark tables put in front.
_LETTERED = re.compile(r"^\s*\(?([A-Za-z])[).:]\s+")
#: A reply that is a letter alone: "B", "(b)", "**D**", "C."
_LONE_LETTER = re.compile(r"[\s*_(\[]*([A-Za-z])[\s*_)\].:]*")
#: A letter after a word that announces it: "Answer: C", "the answer is (D)", "Option B".
_NAMED_LETTER = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*[*(\[]*([A-Za-z])(?![A-Za-z])", re.IGNORECASE
)


class Question(BaseModel):
    id: str
    image: Path
    slide: bool = Field(False, description="The image is a whole slide, for the chat agent")
    question: str
    answer: str
    choices: list[str] | None = None
    kind: Kind
    mpp: float | None = None

    def prompt(self) -> str:
        if self.kind == "multiple choice":
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices or []))
            return f"{self.question}\nOptions:\n{options}\nAnswer with one letter."
        if self.kind == "yes/no":
            return f"{self.question}\nAnswer yes or no."
        return self.question


class Answerer(Protocol):
    def answer(self, question: Question) -> str: ...


class ModelAnswerer:
    """Asks a chat model (the describer role) each question with the image attached."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def answer(self, question: Question) -> str:
        image = load_query_image(question.image)
        reply = self.model.invoke(
            [
                SystemMessage(SYSTEM_PROMPT),
                HumanMessage([{"type": "text", "text": question.prompt()}, image_part(image)]),
            ]
        )
        content = reply.content
        if isinstance(content, list):
            content = " ".join(
                p.get("text", "") if isinstance(p, dict) else str(p) for p in content
            )
        return str(content).strip()


class ReferenceAnswerer:
    """The offline baseline: the class its nearest labelled patches vote for, put into words.

    A yes/no question is answered yes when it names that class, no when it names another, and
    not at all when it names none; a multiple-choice question picks the option naming the
    class; an open question gets the class's name.
    """

    def __init__(self, bank: ReferenceBank, encoder: PatchEncoder) -> None:
        self.bank, self.encoder = bank, encoder

    def answer(self, question: Question) -> str:
        pixels = at_encoder_scale(load_query_image(question.image), question.mpp, self.encoder)
        shares = self.bank.votes(self.encoder.encode_images([pixels]))[0]
        predicted = self.bank.labels[int(np.argmax(shares))]
        if question.kind == "open":
            return self.bank.names[predicted]
        if question.kind == "yes/no":
            named = self.bank.label_for(question.question)
            return "" if named is None else ("yes" if named == predicted else "no")
        return next((c for c in question.choices or [] if self.bank.label_for(c) == predicted), "")


class SlideChatAnswerer:
    """Asks the chat agent about a whole slide, one fresh thread per question.

    The agents' context (models, encoder, resources) is loaded on the first slide question,
    so a set of image questions never pays for it, and a context that fails to load fails
    every slide question with the same error instead of being retried. One slide is open at a
    time: consecutive questions about it share its workspace, the next slide replaces it.
    """

    def __init__(self, context: Callable[[], AgentContext]) -> None:
        self._make = context
        self._context: AgentContext | None = None
        self._failure: HistopilotError | None = None
        self._open: tuple[Path, float | None] | None = None

    def answer(self, question: Question) -> str:
        context = self._loaded()
        if self._open not in (None, (question.image, question.mpp)):
            context.release(self._open[0])
        self._open = (question.image, question.mpp)
        with open_checkpointer("memory", Path("unused")) as checkpointer:
            session = ChatSession(
                replace(context, slide_mpp=question.mpp), question.image, checkpointer
            )
            return session.ask(question.prompt())

    def _loaded(self) -> AgentContext:
        if self._failure is not None:
            raise self._failure
        if self._context is None:
            try:
                self._context = self._make()
            except HistopilotError as error:
                self._failure = error
                raise
        return self._context

    def close(self) -> None:
        if self._context is not None:
            self._context.close()


def read_questions(
    data: Path, images: Path, columns: dict[str, str] | None = None
) -> tuple[list[Question], ConversionReport]:
    """The usable questions of ``data``; image cells are paths inside its folder or embedded
    bytes (written once to ``images``)."""
    rows, report = read_rows(
        data, COLUMNS, columns, optional=OPTIONAL, text_columns=("question", "answer")
    )
    cells = ImageCells(data.parent, images)
    questions = []
    for key, row in rows.items():
        slide = _names_slide(row["image"])
        path, problem = (
            _slide_file(data.parent, row["image"]) if slide else cells.resolve(row["image"])
        )
        choices = _choices(row.get("choices"))
        kind = _kind(row.get("type"), choices, str(row["answer"]))
        if path is None:
            report.skip(key, problem or "no image")
        elif kind is None:
            report.skip(key, f"unknown question type: {row.get('type')!r}")
        elif kind == "multiple choice" and len(choices or []) < 2:
            report.skip(key, "multiple choice: fewer than two choices")
        elif choices and not _gold_choice(str(row["answer"]), choices):
            report.skip(key, f"answer not among the choices: {row['answer']!r}")
        else:
            answer = _gold_choice(str(row["answer"]), choices) if choices else str(row["answer"])
            questions.append(
                Question(
                    id=key,
                    image=path,
                    slide=slide,
                    question=str(row["question"]),
                    answer=answer,
                    choices=choices,
                    kind=kind,
                    mpp=positive_number(row.get("mpp")),
                )
            )
    report.kept = len(questions)
    if not questions:
        raise TrainingDataError(f"{data} holds no usable questions ({report.summary()})")
    return questions, report


def interpret(reply: str, question: Question) -> str:
    """The answer a reply gives: the option it names, yes or no, or (open questions) the
    reply itself; empty when a closed question's reply gives no usable answer."""
    if question.kind == "multiple choice":
        return _replied_choice(reply, question.choices or [])
    if question.kind == "yes/no":
        words = normalise_answer(reply).split()
        return next((word for word in words if word in ("yes", "no")), "")
    return reply


def evaluate_vqa(
    data: Path,
    answerer: Answerer | None,
    *,
    slides: Answerer | None = None,
    images: Path,
    models: list[ModelRecord],
    options: dict[str, Any],
    columns: dict[str, str] | None = None,
    meteor: bool = True,
    on_done: Callable[[], None] | None = None,
) -> Evaluation:
    clock = Stopwatch()
    questions, report = read_questions(data, images, columns)
    missing = {
        NO_CHAT if question.slide else NO_DESCRIBER
        for question in questions
        if (slides if question.slide else answerer) is None
    }
    if len(missing) == len({question.slide for question in questions}):
        raise HistopilotError("; ".join(sorted(missing)))  # nothing could be answered
    items = []
    for question in questions:
        try:
            who = slides if question.slide else answerer
            if who is None:
                raise HistopilotError(NO_CHAT if question.slide else NO_DESCRIBER)
            reply = who.answer(question)
            error = None
        except Exception as problem:  # noqa: BLE001 (see outputs.failure)
            reply, error = "", failure(problem)
        given = interpret(reply, question)
        items.append(
            {
                "id": question.id,
                "kind": question.kind,
                "question": question.question,
                "answer": question.answer,
                "reply": reply,
                "given": given,
                "correct": bool(given) and exact_match(given, question.answer),
                "token_f1": round(token_f1(given, question.answer), 4),
                "error": error,
            }
        )
        if on_done:
            on_done()
    return _evaluation(
        items,
        report,
        meteor,
        run_card(
            "vqa",
            clock,
            data=[data, *(question.image for question in questions)],
            records=len(items),
            options=options,
            models=models,
        ),
    )


def _evaluation(items: list[dict], report: ConversionReport, meteor: bool, card) -> Evaluation:
    by_kind: dict[str, list[dict]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item)
    closed = [item for item in items if item["kind"] != "open"]
    opened = by_kind.get("open", [])
    language = (
        text_scores([i["given"] for i in opened], [[i["answer"]] for i in opened], meteor=meteor)
        if opened
        else None
    )
    rows = [
        [
            kind,
            len(group),
            _share(group, "correct"),
            sum(i["token_f1"] for i in group) / len(group),
            sum(not i["given"] for i in group),
        ]
        for kind, group in sorted(by_kind.items())
    ]
    notes = [
        "closed answers: exact match after lower-casing and dropping punctuation and articles "
        "(a reply that names no option, or neither yes nor no, is no usable answer); "
        "open answers: exact match and SQuAD token F1, plus the text metrics"
    ]
    if language and language.meteor_note:
        notes.append(language.meteor_note)
    if report.skipped:
        notes.append(report.summary())
    errors = Counter(i["error"] for i in items if i["error"])
    notes += [f"{count} × {error}" for error, count in errors.items()]
    return Evaluation(
        task="vqa",
        scores={
            "questions": len(items),
            "closed_accuracy": _share(closed, "correct") if closed else None,
            "by_kind": {
                row[0]: {"count": row[1], "accuracy": row[2], "token_f1": row[3]} for row in rows
            },
            "open_text": language.model_dump() if language else None,
            "unanswered": sum(not i["given"] for i in items),
        },
        notes=notes,
        tables=[
            Table(
                title="Accuracy by question type",
                header=["type", "questions", "exact match", "token F1", "no usable answer"],
                rows=rows,
            ),
            *(
                [
                    Table(
                        title="Open answers: text metrics",
                        header=["BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr"],
                        rows=[
                            [
                                language.bleu_1,
                                language.bleu_4,
                                language.rouge_l,
                                language.meteor,
                                language.cider,
                            ]
                        ],
                    )
                ]
                if language
                else []
            ),
        ],
        figures=[
            Figure(
                name="accuracy",
                kind="bar",
                title="VQA exact match by question type",
                x_label="question type",
                y_label="exact match",
                y_range=(0.0, 1.0),
                series=[Series(name="exact match", x=[r[0] for r in rows], y=[r[2] for r in rows])],
            )
        ],
        items=items,
        card=card,
    )


def _share(items: Sequence[dict], key: str) -> float:
    return sum(bool(item[key]) for item in items) / len(items)


def _names_slide(cell: Any) -> bool:
    return isinstance(cell, str) and Path(cell.strip()).suffix.lower() in WHOLE_SLIDE_SUFFIXES


def _slide_file(root: Path, cell: str) -> tuple[Path | None, str | None]:
    """A slide named relative to the table's folder, kept inside it."""
    root = root.resolve()
    candidate = (root / cell.strip()).resolve()
    if not candidate.is_relative_to(root):
        return None, f"image outside the image folder: {cell.strip()}"
    if not candidate.is_file():
        return None, f"missing slide: {cell.strip()}"
    return candidate, None


def _choices(cell: Any) -> list[str] | None:
    """Options from a list, a dict (letter → text), JSON text, or text split by '|' or ';'.
    Letters in front ("A) adipose", "B. mucus") are dropped when every option carries its
    own, in order; otherwise the text is kept as written ("H. pylori gastritis")."""
    if cell is None or cell == "":
        return None
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            cell = re.split(r"\s*(?:\|\||\||;)\s*", cell.strip())
    if isinstance(cell, dict):
        cell = [cell[key] for key in sorted(cell)]
    if not isinstance(cell, list):
        return None
    options = [str(option).strip() for option in cell if str(option).strip()]
    prefixes = [_LETTERED.match(option) for option in options]
    if all(m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(prefixes)):
        return [option[m.end() :].strip() for option, m in zip(options, prefixes, strict=True)]
    return options


def _gold_choice(answer: str, choices: Sequence[str]) -> str:
    """The option a set's answer names: its letter, or its text (normalised); else empty."""
    letter = _LONE_LETTER.fullmatch(answer.strip())
    if letter:
        return _option(letter.group(1), choices)
    return next((c for c in choices if exact_match(c, answer)), "")


def _replied_choice(reply: str, choices: Sequence[str]) -> str:
    """The option a model's reply names, or empty when it names none or several.

    Letters are read alone ("B", "(b)", "**D**"), after "answer", "option" or "choice"
    ("The answer is (D)."), or in front of the option's text ("B. mucus"). Otherwise the
    reply must match one option's wording better than every other, with token F1 ≥ 0.5.
    """
    stripped = reply.strip()
    letter = (
        _LONE_LETTER.fullmatch(stripped)
        or _NAMED_LETTER.search(stripped)
        or _LETTERED.match(stripped)
    )
    if letter and _option(letter.group(1), choices):
        return _option(letter.group(1), choices)
    scored = sorted(((token_f1(reply, choice), choice) for choice in choices), reverse=True)
    if not scored or scored[0][0] < 0.5 or (len(scored) > 1 and scored[1][0] == scored[0][0]):
        return ""
    return scored[0][1]


def _option(letter: str, choices: Sequence[str]) -> str:
    index = LETTERS.index(letter.upper())
    return choices[index] if index < len(choices) else ""


def _kind(declared: Any, choices: list[str] | None, answer: str) -> Kind | None:
    if declared:
        return {
            "closed": "multiple choice" if choices else "yes/no",
            "yes/no": "yes/no",
            "yesno": "yes/no",
            "multiple choice": "multiple choice",
            "multiple-choice": "multiple choice",
            "mc": "multiple choice",
            "open": "open",
        }.get(str(declared).strip().lower())
    if choices:
        return "multiple choice"
    return "yes/no" if normalise_answer(answer) in ("yes", "no") else "open"
