"""Turn the field's training-data layouts into histopilot's conversation dataset and back.

Sources: LLaVA conversation JSON (LLaVA-Instruct, Quilt-Instruct, LLaVA-Med), VQA tables
(image, question, answer: PathVQA), caption tables (image, caption: Quilt, PathCap), and
histopilot's own analyses, whose region findings become region crops with their text so a
lab can train on the analyses its pathologists reviewed. Tables may be CSV, TSV, JSON Lines or
Parquet; an image cell is a path or, as Hugging Face datasets store images, a
``{"bytes": …, "path": …}`` record, whose bytes are written into the dataset's ``images``
folder. Source images are referred to, not copied; a path that leaves the image folder is
skipped, so a dataset cannot pull in files from elsewhere on the machine.

``export_dataset`` writes a conversation dataset back out as LLaVA JSON, a VQA table or a
caption table, for other tools and for checking that a conversion kept everything.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from histopilot.agents.state import Finding, Region, SlideRef
from histopilot.errors import HistopilotError, TrainingDataError
from histopilot.finetune.conversations import (
    ContentPart,
    Conversation,
    ConversionReport,
    check_image,
    write_conversations,
)
from histopilot.slide.render import save_png
from histopilot.storage import atomic_file

SourceFormat = Literal["llava", "vqa", "captions", "analyses"]
ExportFormat = Literal["llava", "vqa", "captions"]
IMAGE_TOKEN = "<image>"
DESCRIBE_PROMPT = "Describe this histopathology image."
REGION_PROMPT = "Describe the histology in this {power}-power field of an H&E slide."
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_ROLES_LLAVA = {role: name for name, role in _LLAVA_ROLES.items()}


class ImageCells:
    """Resolves a record's image cell (a path, or embedded bytes) to a usable image file.

    Paths are taken relative to ``root`` and must stay inside it; embedded bytes are written
    once, under their hash, to ``out/images``.
    """

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out = root.resolve(), out.resolve()

    def resolve(self, cell: Any) -> tuple[Path | None, str | None]:
        """(absolute image path, None) or (None, why the image cannot be used)."""
        if isinstance(cell, dict) and cell.get("bytes"):
            if not isinstance(cell["bytes"], bytes):
                return None, "unreadable image: embedded 'bytes' are not bytes"
            return self._write_bytes(cell["bytes"])
        if isinstance(cell, dict):
            cell = cell.get("path")
        if not isinstance(cell, str) or not cell.strip():
            return None, "missing image: no image named"
        candidate = (self.root / cell.strip()).resolve()
        if not candidate.is_relative_to(self.root):
            return None, f"image outside the image folder: {cell.strip()}"
        problem = check_image(candidate)
        return (None, problem) if problem else (candidate, None)

    def path(self, cell: Any) -> tuple[str | None, str | None]:
        """Like :meth:`resolve`, relative to ``out`` (where the dataset file is written)."""
        found, problem = self.resolve(cell)
        return (os.path.relpath(found, self.out) if found else None), problem

    def _write_bytes(self, data: bytes) -> tuple[Path | None, str | None]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                suffix = "." + (image.format or "png").lower()
        except Image.DecompressionBombError:
            return None, "image too large: embedded bytes"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
            return None, f"unreadable image: embedded bytes ({error})"
        target = self.out / "images" / f"{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
        if not target.exists():
            with atomic_file(target) as tmp:
                tmp.write_bytes(data)
        return target, None


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
        records = _from_analyses(source, out, report, include_drafts, slide_root)
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


def _conversation(report: ConversionReport, record: object, **fields: Any) -> Conversation | None:
    try:
        return Conversation.model_validate(fields)
    except ValueError as error:
        message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
        report.skip(record, f"invalid record: {message.removeprefix('Value error, ')}")
        return None


# -- LLaVA ------------------------------------------------------------------------------------
def _from_llava(
    source: Path, images: ImageCells, report: ConversionReport
) -> Iterator[Conversation]:
    for number, item in _json_items(source, report):
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
            conversation = _conversation(
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


def _json_items(source: Path, report: ConversionReport) -> Iterator[tuple[int, Any]]:
    """Items of a JSON list, or lines of a JSON Lines file (a broken line is reported)."""
    text = source.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise TrainingDataError(f"{source} is not valid JSON: {error}") from error
        yield from enumerate(items, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            report.read += 1
            report.skip(number, "broken JSON")


# -- tables -----------------------------------------------------------------------------------
def read_table(
    source: Path, report: ConversionReport | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of a CSV, TSV, JSON Lines or Parquet table; broken JSON lines are
    added to ``report``."""
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with source.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            yield from enumerate(reader, start=2)
    elif suffix == ".parquet":
        import pyarrow.parquet as parquet

        try:
            table = parquet.read_table(source)
        except Exception as error:
            raise TrainingDataError(f"{source} is not a readable Parquet file: {error}") from error
        for number, batch_row in enumerate(table.to_pylist(), start=1):
            yield number, batch_row
    elif suffix in (".jsonl", ".json"):
        report = report or ConversionReport(source=str(source), format="table")
        for number, item in _json_items(source, report):
            yield number, item if isinstance(item, dict) else {}
    else:
        raise TrainingDataError(
            f"{source}: tables are read from .csv, .tsv, .jsonl, .json or .parquet files"
        )


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
        conversation = _conversation(
            report,
            number,
            id=str(row.get("id") or f"{kind}-{number}"),
            images=[path],
            messages=_single_turn(question, str(row.get(answer_column) or "").strip()),
        )
        if conversation:
            yield conversation


def table_rows(
    source: Path, report: ConversionReport, columns: tuple[str, ...]
) -> Iterator[tuple[int, dict]]:
    checked = False
    for number, row in read_table(source, report):
        if not checked:
            missing = [name for name in columns if name not in row]
            if missing:
                raise TrainingDataError(
                    f"{source} has no column(s) {', '.join(missing)} (it has "
                    f"{', '.join(map(str, row)) or 'none'}); name them with the column options"
                )
            checked = True
        report.read += 1
        yield number, row


def _single_turn(question: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


# -- histopilot analyses ----------------------------------------------------------------------
def _from_analyses(
    source: Path,
    out: Path,
    report: ConversionReport,
    include_drafts: bool,
    slide_root: str | Path | None,
) -> Iterator[Conversation]:
    files = [source] if source.is_file() else sorted(source.rglob("analysis.json"))
    for file in files:
        try:
            analysis = _Analysis.model_validate_json(file.read_bytes())
        except (OSError, ValueError) as error:
            report.read += 1
            report.skip(file, f"invalid record: not a histopilot analysis ({_first_line(error)})")
            continue
        report.read += len(analysis.findings)
        records = {region_id: f"{file}:{region_id}" for region_id in analysis.findings}
        if analysis.report.status != "reviewed" and not include_drafts:
            for record in records.values():
                report.skip(record, "not reviewed: the report is a draft")
            continue
        yield from _analysis_regions(analysis, records, out, report, slide_root)


def _analysis_regions(analysis, records, out, report, slide_root) -> Iterator[Conversation]:
    from histopilot.slide import open_slide

    try:
        slide = open_slide(_slide_path(analysis.slide.path, slide_root))
    except HistopilotError as error:
        for record in records.values():
            report.skip(record, f"slide not readable: {error}")
        return
    with slide:
        for region_id, finding in analysis.findings.items():
            region = analysis.regions.get(region_id)
            if region is None:
                report.skip(records[region_id], "invalid record: the finding's region is missing")
                continue
            try:
                crop = _region_crop(slide, region)
            except HistopilotError as error:
                report.skip(records[region_id], f"region not readable: {error}")
                continue
            # Named by where the pixels come from, so two analyses of one slide never share
            # (or overwrite) a crop unless they looked at the very same field.
            where = f"{analysis.slide.path}|{region.x},{region.y},{region.width},{region.height}"
            name = f"images/{hashlib.sha256(f'{where}|{region.mpp}'.encode()).hexdigest()[:24]}.png"
            save_png(crop, out / name)
            conversation = _conversation(
                report,
                records[region_id],
                id=f"{analysis.thread_id}/{analysis.slide.slide_id}/{region_id}",
                images=[name],
                messages=_single_turn(
                    REGION_PROMPT.format(power=region.magnification), finding.text.strip()
                ),
            )
            if conversation:
                yield conversation


class _Analysis(BaseModel):
    """The parts of ``analysis.json`` a training example is made of, validated."""

    thread_id: str = "analysis"
    slide: SlideRef
    regions: dict[str, Region]
    findings: dict[str, Finding]
    report: _ReportStatus


class _ReportStatus(BaseModel):
    status: str


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _slide_path(recorded: str, slide_root: str | Path | None) -> Path:
    if slide_root is None:
        return Path(recorded)
    return Path(slide_root) / Path(recorded).name


def _region_crop(slide, region: Region, longest: int = 448) -> np.ndarray:
    x, y, width, height = region.x, region.y, region.width, region.height
    downsample = max(1.0, max(width, height) / longest)
    if region.mpp and slide.mpp is not None:
        downsample = max(downsample, region.mpp / slide.mpp.mean)
    return slide.read_region_at(
        x,
        y,
        max(1, round(width / downsample)),
        max(1, round(height / downsample)),
        downsample=downsample,
    )


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
