"""The run card every evaluation writes: what was measured, on which data, with which models.

A figure is only worth quoting if someone else can rerun it and get it again, so the card
records the data's SHA-256, the runner's options, each model's id and revision, the seed, the
library versions and the wall time. Two cards that differ explain why two figures differ.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from histopilot.config import HistopilotConfig
from histopilot.runcard import file_digest, versions

#: A Hugging Face cache snapshot folder names the commit it holds.
_SNAPSHOT = re.compile(r"snapshots/([0-9a-f]{40})(?:/|$)")


class ModelRecord(BaseModel):
    """One model an evaluation used, as precisely as it can be named."""

    role: str = Field(description="What it did: describer, extractor, patch encoder, …")
    backend: str
    model: str | None = None
    adapter: str | None = None
    revision: str | None = Field(
        None,
        description="Hub commit of a cached snapshot, or the SHA-256 of a local folder's "
        "config files; None for a served model (ask its server) or a rule-based one",
    )


class RunCard(BaseModel):
    task: str
    started: str = Field(description="UTC time the run began (ISO 8601)")
    seconds: float
    data_sha256: str = Field(description="SHA-256 over the bytes of every input file, in order")
    data_files: int = Field(description="How many files that hash covers")
    records: int = Field(description="Items the runner scored")
    options: dict[str, Any]
    models: list[ModelRecord]
    seed: int | None
    versions: dict[str, str]


class Stopwatch:
    """When a run began, for its card: wall-clock start and elapsed seconds."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self._clock = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self._clock, 2)


def run_card(
    task: str,
    clock: Stopwatch,
    *,
    data: Iterable[Path],
    records: int,
    options: dict[str, Any],
    models: list[ModelRecord],
    seed: int | None = None,
) -> RunCard:
    files = [path for path in dict.fromkeys(data) if path.is_file()]
    return RunCard(
        task=task,
        started=clock.started,
        seconds=clock.seconds,
        data_sha256=file_digest(files),
        data_files=len(files),
        records=records,
        options={key: _plain(value) for key, value in options.items()},
        models=models,
        seed=seed,
        versions=versions(),
    )


def role_record(config: HistopilotConfig, role: str) -> ModelRecord:
    """The model behind a configured role (``describer``, ``extractor``, …)."""
    settings = config.roles[role]
    adapter = settings.adapter or settings.adapter_path
    return ModelRecord(
        role=role,
        backend=settings.backend,
        model=settings.model if settings.backend != "offline" else "rules (no model)",
        adapter=adapter,
        revision=model_revision(settings.model) if settings.backend == "transformers" else None,
    )


def encoder_record(name: str, role: str = "patch encoder") -> ModelRecord:
    """A patch encoder named as the configuration names it (``offline``, ``open_clip:…``)."""
    location = name.split(":", 2)[-1] if ":" in name else name
    return ModelRecord(role=role, backend="encoder", model=name, revision=model_revision(location))


def model_revision(model: str | None) -> str | None:
    """The commit of a hub snapshot, or a digest of a local model folder's config files."""
    if not model:
        return None
    found = _SNAPSHOT.search(model)
    if found:
        return found.group(1)
    folder = Path(model).expanduser()
    configs = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return f"sha256:{file_digest(configs)}" if configs else None


def _plain(value: Any) -> Any:
    """Options as JSON holds them: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value
