"""The conversation dataset every VLM recipe trains on, and the report of what was skipped.

A dataset is a folder holding ``conversations.jsonl``: one JSON object per line, in the message
layout chat templates and TRL take, with image files named relative to the folder::

    {"id": "crc-0007", "images": ["images/TUM-0007.png"],
     "messages": [
       {"role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What tissue is this?"}]},
       {"role": "assistant", "content": [{"type": "text", "text": "Tumour epithelium"}]}]}

Every converter writes this layout and every reader validates it again, because a dataset is
often edited by hand between the two. A record that cannot be used (broken JSON, an image
that is missing or unreadable, an empty answer) is skipped and listed in a
:class:`ConversionReport`; it never stops the run and never passes silently.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError, model_validator

from histopilot.errors import TrainingDataError
from histopilot.storage import atomic_file

CONVERSATIONS_FILE = "conversations.jsonl"
REPORT_FILE = "skipped.json"


class ContentPart(BaseModel):
    type: Literal["text", "image"]
    text: str | None = None

    @model_validator(mode="after")
    def _text_only_on_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image" and self.text is not None:
            raise ValueError("an image part carries no text")
        return self


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart] = Field(min_length=1)

    def text(self) -> str:
        return "\n".join(part.text or "" for part in self.content if part.type == "text")

    def image_count(self) -> int:
        return sum(part.type == "image" for part in self.content)


class Conversation(BaseModel):
    id: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list, description="Paths relative to the dataset")
    messages: list[Message] = Field(min_length=2)

    @model_validator(mode="after")
    def _usable(self) -> Conversation:
        placeholders = sum(message.image_count() for message in self.messages)
        if placeholders != len(self.images):
            raise ValueError(
                f"{placeholders} image placeholder(s) in the messages but {len(self.images)} "
                "image file(s)"
            )
        answers = [m for m in self.messages if m.role == "assistant"]
        if not answers:
            raise ValueError("no assistant turn: nothing to learn from")
        if any(not m.text().strip() for m in answers):
            raise ValueError("an assistant turn is empty")
        if any(m.role == "assistant" and m.image_count() for m in self.messages):
            raise ValueError("an assistant turn holds an image")
        if any(
            m.role == "assistant" and (i == 0 or self.messages[i - 1].role != "user")
            for i, m in enumerate(self.messages)
        ):
            raise ValueError("an assistant turn does not answer a user turn")
        return self

    def examples(self) -> Iterator[tuple[list[Message], Message, int]]:
        """Each answer with everything before it: (prompt, completion, images the prompt shows).

        Training on one (prompt, completion) pair per answer keeps the loss on the answers alone
        in multi-turn conversations, which TRL cannot mask for vision models otherwise.
        """
        seen_images = 0
        for index, message in enumerate(self.messages):
            if message.role == "assistant":
                yield self.messages[:index], message, seen_images
            seen_images += message.image_count()


class Skipped(BaseModel):
    record: str = Field(description="Line number, row number or id of the record")
    reason: str


class ConversionReport(BaseModel):
    """What happened to every record read: kept, or skipped with the reason."""

    source: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: list[Skipped] = Field(default_factory=list)

    def skip(self, record: object, reason: str) -> None:
        self.skipped.append(Skipped(record=str(record), reason=reason))

    @property
    def by_reason(self) -> dict[str, int]:
        kinds = Counter(item.reason.split(":", 1)[0] for item in self.skipped)
        return dict(kinds.most_common())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} of {self.read} records kept"
        reasons = "; ".join(f"{count} × {kind}" for kind, count in self.by_reason.items())
        return f"{self.kept} of {self.read} records kept; skipped: {reasons}"

    def write(self, folder: Path) -> Path:
        payload = self.model_dump(mode="json") | {"by_reason": self.by_reason}
        path = folder / REPORT_FILE
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        return path


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be trained on, or ``None`` when it is a readable image."""
    if not path.is_file():
        return "missing image: " + path.name
    try:
        with Image.open(path) as image:
            image.load()  # decoded whole: a truncated file must fail here, not mid-training
    except Image.DecompressionBombError:
        return f"image too large: {path.name}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        return f"unreadable image: {path.name} ({error})"
    return None


def validated(report: ConversionReport, record: object, **fields: Any) -> Conversation | None:
    """The conversation ``fields`` describe, or ``None`` with the reason added to ``report``."""
    try:
        return Conversation.model_validate(fields)
    except ValueError as error:
        message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
        report.skip(record, f"invalid record: {message.removeprefix('Value error, ')}")
        return None


def single_turn(question: str, answer: str) -> list[dict]:
    """The messages of one image, one question and its answer."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


# -- histopilot analyses ----------------------------------------------------------------------
def write_conversations(folder: Path, conversations: list[Conversation]) -> Path:
    """Write ``conversations.jsonl`` in ``folder`` in one piece."""
    path = folder / CONVERSATIONS_FILE
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(conversation.model_dump_json(exclude_none=True) + "\n")
    return path


def read_conversations(source: str | Path) -> tuple[list[Conversation], ConversionReport, Path]:
    """Valid conversations of a dataset (folder or ``.jsonl`` file), the report of the rest,
    and the folder image paths are relative to."""
    path = Path(source)
    if path.is_dir():
        path = path / CONVERSATIONS_FILE
    if not path.is_file():
        raise TrainingDataError(
            f"no conversation dataset at {source}; make one with `histopilot finetune convert`"
        )
    root = path.parent
    report = ConversionReport(source=str(path), format="conversations")
    kept: list[Conversation] = []
    ids: set[str] = set()
    checked: dict[str, str | None] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            report.read += 1
            conversation = _parse(line, number, report)
            if conversation is None:
                continue
            if conversation.id in ids:
                report.skip(number, f"duplicate id: {conversation.id}")
                continue
            for image in conversation.images:
                if image not in checked:  # many conversations may show one image
                    checked[image] = check_image(root / image)
            problem = next((checked[i] for i in conversation.images if checked[i]), None)
            if problem:
                report.skip(conversation.id, problem)
                continue
            ids.add(conversation.id)
            kept.append(conversation)
    report.kept = len(kept)
    return kept, report, root


def _parse(line: str, number: int, report: ConversionReport) -> Conversation | None:
    try:
        return Conversation.model_validate_json(line)
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            report.skip(number, "broken JSON")
        else:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            report.skip(number, f"invalid record: {where + ': ' if where else ''}{first['msg']}")
        return None
