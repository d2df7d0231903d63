"""Turn the field's training-data layouts into histopilot's conversation dataset and back.

Sources: LLaVA conversation JSON (LLaVA-Instruct, Quilt-Instruct, LLaVA-Med), VQA tables
(image, question, answer: PathVQA), caption tables (image, caption: Quilt, PathCap), and
histopilot's own analyses, whose region findings become region crops with their text so a
lab can train on the analyses its pathologists reviewed. Tables may be CSV, TSV, JSON Lines or
Parquet; an image cell is a path or, as Hugging Face datasets store images, a
``{"bytes": …, "path": …}`` record, whose bytes are written into the dataset's ``images``
folder. Source images are referred to, not copied; a path that leaves the image folder is
skipped, so a dataset cannot pull in files from elsewhere on the machine. Tables and image
cells are read by :mod:`histopilot.finetune.tables`, analyses by
:mod:`histopilot.finetune.analyses`.

``export_dataset`` writes a conversation dataset back out as LLaVA JSON, a VQA table or a
caption table, for other tools and for checking that a conversion kept everything.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from histopilot.errors import TrainingDataError
from histopilot.finetune.conversations import (
    ContentPart,
    Conversation,
    ConversionReport,
    single_turn,
    validated,
    write_conversations,
)
from histopilot.finetune.tables import ImageCells, json_items, table_rows
from histopilot.storage import atomic_file

SourceFormat = Literal["llava", "vqa", "captions", "analyses"]
ExportFormat = Literal["llava", "vqa", "captions"]
IMAGE_TOKEN = "<image>"
DESCRIBE_PROMPT = "Describe this histopathology image."
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_ROLES_LLAVA = {role: name for name, role in _LLAVA_ROLES.items()}


def convert(
    source: str | Path,
    out: str | Path,
    fmt: SourceFormat,
    *,
    image_root: str | Path | None = None,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    caption_column: str = "caption",
    prompt: str = DESCRIBE_PROMPT,
    include_drafts: bool = False,
    slide_root: str | Path | None = None,
) -> ConversionReport:
    """Convert ``source`` into a conversation dataset in ``out``; returns what was skipped.

    Image paths are relative to ``image_root`` (default: the source file's folder).
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise TrainingDataError(f"no {fmt} source at {source}")
    out.mkdir(parents=True, exist_ok=True)
    images = ImageCells(Path(image_root) if image_root else source.parent, out)
    report = ConversionReport(source=str(source), format=fmt)
    if fmt == "llava":
        records = _from_llava(source, images, report)
    elif fmt == "vqa":
        records = _from_table(
            source, images, report, image_column=image_column, answer_column=answer_column,
            question_column=question_column, kind="vqa",
        )  # fmt: skip
    elif fmt == "captions":
        records = _from_table(
            source, images, report, image_column=image_column, answer_column=caption_column,
            prompt=prompt, kind="caption",
        )  # fmt: skip
    else:
        from histopilot.finetune.analyses import from_analyses  # the agents' models, on demand

        records = from_analyses(source, out, report, include_drafts, slide_root)
    kept = _unique(records, report)
    report.kept = len(kept)
    if not kept:
        raise TrainingDataError(f"nothing usable in {source}: {report.summary()}")
    write_conversations(out, kept)
    report.write(out)
    return report


def _unique(records: Iterator[Conversation], report: ConversionReport) -> list[Conversation]:
    kept, ids = [], set()
    for record in records:
        if record.id in ids:
            report.skip(record.id, f"duplicate id: {record.id}")
            continue
        ids.add(record.id)
        kept.append(record)
    return kept


# -- LLaVA ------------------------------------------------------------------------------------
def _from_llava(
    source: Path, images: ImageCells, report: ConversionReport
) -> Iterator[Conversation]:
    for number, item in json_items(source, report):
        report.read += 1
        record = item.get("id", number) if isinstance(item, dict) else number
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not turns:
            report.skip(record, "invalid record: no 'conversations' list")
            continue
        named = item.get("image")
        cells = named if isinstance(named, list) else ([] if named is None else [named])
        paths = []
        for cell in cells:
            path, problem = images.path(cell)
            if problem:
                report.skip(record, problem)
                break
            paths.append(path)
        else:
            messages = _llava_messages(turns, len(paths))
            if isinstance(messages, str):
                report.skip(record, f"invalid record: {messages}")
                continue
            conversation = validated(
                report, record, id=str(record), images=paths, messages=messages
            )
            if conversation:
                yield conversation


def _llava_messages(turns: list, image_count: int) -> list[dict] | str:
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES:
            return "a turn without 'from' of human, gpt or system"
        value = turn.get("value")
        if not isinstance(value, str):
            return "a turn without a text 'value'"
        messages.append({"role": _LLAVA_ROLES[turn["from"]], "content": _parts(value)})
    placed = sum(part["type"] == "image" for m in messages for part in m["content"])
    if placed == 0 and image_count:
        # LLaVA data sometimes leaves the token out; the image then leads the first question.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            return "an image but no user turn to show it in"
        first_user["content"][:0] = [{"type": "image"}] * image_count
    return messages


def _parts(value: str) -> list[dict]:
    """``"<image>\\nWhat is this?"`` → an image part then a text part (one newline dropped)."""
    parts: list[dict] = []
    for index, piece in enumerate(value.split(IMAGE_TOKEN)):
        if index:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if index < value.count(IMAGE_TOKEN):
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts or [{"type": "text", "text": ""}]


def _from_table(
    source: Path,
    images: ImageCells,
    report: ConversionReport,
    *,
    image_column: str,
    answer_column: str,
    question_column: str | None = None,
    prompt: str = DESCRIBE_PROMPT,
    kind: str,
) -> Iterator[Conversation]:
    """One single-turn conversation per row: the row's question (VQA), or ``prompt`` for a
    caption table, answered by the answer or caption column."""
    columns = (image_column, *filter(None, [question_column]), answer_column)
    for number, row in table_rows(source, report, columns):
        path, problem = images.path(row.get(image_column))
        if problem:
            report.skip(number, problem)
            continue
        question = str(row.get(question_column) or "").strip() if question_column else prompt
        if not question:
            report.skip(number, "empty question")
            continue
        conversation = validated(
            report,
            number,
            id=str(row.get("id") or f"{kind}-{number}"),
            images=[path],
            messages=single_turn(question, str(row.get(answer_column) or "").strip()),
        )
        if conversation:
            yield conversation


# -- export -----------------------------------------------------------------------------------
def export_dataset(
    conversations: list[Conversation], root: Path, fmt: ExportFormat, target: str | Path
) -> int:
    """Write ``conversations`` (images relative to ``root``) as ``fmt``; returns rows written."""
    target = Path(target)
    base = target.parent.resolve()

    def relative(image: str) -> str:
        return os.path.relpath((root / image).resolve(), base)

    if fmt == "llava":
        items = [_to_llava(c, relative) for c in conversations]
        with atomic_file(target) as tmp:
            tmp.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n")
        return len(items)
    rows = []
    for conversation in conversations:
        if len(conversation.images) != 1:
            continue
        image = relative(conversation.images[0])
        for prompt, answer, _ in conversation.examples():
            if fmt == "captions":
                rows.append({"image": image, "caption": answer.text()})
                break
            rows.append({"image": image, "question": prompt[-1].text(), "answer": answer.text()})
    with atomic_file(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["image"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _to_llava(conversation: Conversation, relative) -> dict:
    item: dict[str, Any] = {"id": conversation.id}
    if conversation.images:
        paths = [relative(image) for image in conversation.images]
        item["image"] = paths[0] if len(paths) == 1 else paths
    item["conversations"] = [
        {"from": _ROLES_LLAVA[m.role], "value": _llava_value(m.content)}
        for m in conversation.messages
    ]
    return item


def _llava_value(parts: list[ContentPart]) -> str:
    return "\n".join(IMAGE_TOKEN if part.type == "image" else part.text or "" for part in parts)
