"""The run card every evaluation writes: what was measured, on which data, with which models.

A figure is only worth quoting if someone else can rerun it and get it again, so the card
records the data's SHA-256, the runner's options, each model's id and revision, the seed, the
library versions and the wall time. Two cards that differ explain why two figures differ.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from histopilot.config import HistopilotConfig
from histopilot.runcard import file_digest, versions

#: Files up to this size are hashed whole; larger ones are fingerprinted (see RunCard).
WHOLE_FILE_BYTES = 64 << 20
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
    data_sha256: str = Field(
        description="SHA-256 over every input file in order: its bytes, or for a file over "
        "64 MiB (a whole slide) its size, first and last MiB"
    )
    data_files: int = Field(description="How many files that hash covers")
    data_unreadable: list[str] = Field(
        default_factory=list, description="Inputs that could not be read for the hash"
    )
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
    digest, unreadable = hashlib.sha256(), []
    files = [path for path in dict.fromkeys(data) if path.is_file()]
    for path in files:
        try:
            _fingerprint(path, digest)
        except OSError:
            unreadable.append(str(path))
    return RunCard(
        task=task,
        started=clock.started,
        seconds=clock.seconds,
        data_sha256=digest.hexdigest(),
        data_files=len(files) - len(unreadable),
        data_unreadable=unreadable,
        records=records,
        options={key: _plain(value) for key, value in options.items()},
        models=models,
        seed=seed,
        versions=versions(),
    )


def _fingerprint(path: Path, digest: Any) -> None:
    """Add ``path`` to ``digest``: whole when small; for a large file (a whole slide, often
    gigabytes), its size and first and last MiB, which change with any rescan or edit."""
    size = path.stat().st_size
    if size <= WHOLE_FILE_BYTES:
        file_digest([path], digest)
        return
    with path.open("rb") as handle:
        digest.update(str(size).encode())
        digest.update(handle.read(1 << 20))
        handle.seek(-(1 << 20), 2)
        digest.update(handle.read(1 << 20))


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
    """The commit of a hub snapshot (a path inside the cache, or a hub id cached locally), or
    a digest of a local model folder's config files."""
    if not model:
        return None
    found = _SNAPSHOT.search(model)
    if found:
        return found.group(1)
    folder = Path(model).expanduser()
    if folder.is_dir():
        configs = sorted(folder.glob("*.json"))
        return f"sha256:{file_digest(configs)}" if configs else None
    return _cached_commit(model)


def _cached_commit(repo_id: str) -> str | None:
    """The commit of a hub model's ``main`` in the local Hugging Face cache, if it is there."""
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _plain(value: Any) -> Any:
    """Options as JSON holds them: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value
