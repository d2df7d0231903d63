"""The audit trail: what each analysis and each chat turn ran, kept beside its checkpoints.

A draft a pathologist reads must be traceable to what produced it: which models (and which
revision of each, and which adapter), which prompts (by content hash), which configuration (by
hash), which tools with which inputs and outputs (ids and hashes, never images or report text),
which regions, how long each step took, and what the guardrails withheld. One
:class:`AuditRecord` per analysis and per chat turn holds that; :class:`AuditLog` keeps the
records in the database of the thread's checkpoints (a table in the same SQLite file or Postgres
database; beside an in-memory saver in tests), so a thread and its audit travel and are deleted
together. ``histopilot audit`` and ``GET …/audit`` read them back as JSON.

Model calls and chat tool calls are heard through a LangChain callback (:class:`AuditRecorder`),
which LangGraph hands down to every node and subgraph of a run. The analysis graph's own steps
(triage, navigation, description, knowledge retrieval) are read from its final state, which
records each of them by id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel, ConfigDict, Field

from histopilot import __version__
from histopilot.agents.guardrails import GuardAction, Material
from histopilot.agents.guardrails.policy import REGION_ID
from histopilot.privacy import first_time

log = logging.getLogger(__name__)
#: Strings longer than this in tool inputs are kept as a hash: a tool input may quote text.
MAX_INPUT_CHARS = 80
#: What a tool's output names: regions, knowledge passages, reference patches.
_IDS = re.compile(rf"{REGION_ID.pattern}|\bkb:[\w.:-]+|\breference:[\w.#:-]+")
_TABLE = "histopilot_audit"


class ModelUse(BaseModel):
    """One agent role's model as configured for the run."""

    role: str
    backend: str
    model: str | None = None
    adapter: str | None = None
    revision: str | None = Field(
        None, description="Hub commit or local content hash (in-process models)"
    )
    endpoint: str | None = Field(None, description="Where requests go (openai backend)")


class ModelCall(BaseModel):
    """One call to a chat model, as the callback heard it."""

    node: str | None = Field(None, description="The graph node that made it")
    model: str | None = Field(None, description="The model the request named")
    served: str | None = Field(None, description="The model the server says answered")
    fingerprint: str | None = Field(None, description="The server's system fingerprint")
    seconds: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None


class ToolCall(BaseModel):
    """One tool or agent step: its inputs and the ids of what it produced."""

    name: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list, description="Ids, paths and hashes")
    seconds: float | None = None
    error: str | None = None


class Provenance(BaseModel):
    """What a context runs with, the same for every record it writes."""

    histopilot: str = __version__
    config_hash: str = Field(description="SHA-256 of the resolved configuration (secrets masked)")
    settings: dict[str, Any]
    models: list[ModelUse]
    encoder: str = Field(description="Patch encoder and its fingerprint")
    prompts: dict[str, str] = Field(description="Prompt name → SHA-256 of its text (12 hex)")
    remote: list[str] = Field(
        default_factory=list, description="Where data leaves this machine, if anywhere"
    )


class AuditRecord(BaseModel):
    """What one analysis or one chat turn ran."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Literal["analysis", "chat_turn"]
    thread_id: str
    started: datetime
    seconds: float
    slide_id: str | None = None
    material: Material | None = None
    input_sha256: str | None = Field(
        None, description="Hash of the question or message (the text stays in the thread)"
    )
    provenance: Provenance
    model_calls: list[ModelCall] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    guardrails: list[GuardAction] = Field(default_factory=list)
    analyses: list[str] = Field(default_factory=list, description="Analysis threads this turn ran")
    outputs: list[str] = Field(default_factory=list, description="Report ids and files written")


class AuditTrail(BaseModel):
    """The records of a thread or an analysis, oldest first (what ``audit`` exports)."""

    records: list[AuditRecord]


# -- provenance -------------------------------------------------------------------------------
def prompt_versions() -> dict[str, str]:
    """Every agent prompt by name, with the hash of its text: the prompt's version."""
    folder = resources.files("histopilot.agents") / "prompts"
    return {
        item.name.removesuffix(".md"): text_hash(item.read_text(encoding="utf-8"))
        for item in sorted(folder.iterdir(), key=lambda item: item.name)
        if item.name.endswith(".md")
    }


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def config_hash(config: Any) -> str:
    """The configuration's hash: what it selects, not where it was read from."""
    dumped = config.model_dump(mode="json", exclude={"sources"})
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def model_revision(role: Any) -> str | None:
    """The revision of an in-process model: the hub commit it resolved to, or a hash of a local
    folder's configuration and weight files (names and sizes). Served models report theirs in
    each call (``ModelCall.served`` / ``fingerprint``)."""
    if role.backend != "transformers" or not role.model:
        return None
    folder = Path(role.model).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(folder.iterdir()):
            if path.name == "config.json":
                digest.update(path.read_bytes())
            elif path.suffix in (".safetensors", ".bin", ".json", ".model"):
                digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return f"local:{digest.hexdigest()[:12]}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(role.model, "config.json")
    except (ValueError, OSError):  # a name that is no hub id: the revision stays unknown
        return None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return cached.split("/snapshots/")[1].split("/")[0]
    return None


def provenance_of(context: Any) -> Provenance:
    """The provenance of an :class:`~histopilot.agents.context.AgentContext`: from its
    configuration when it was built from one (with the run's own settings, so overrides such as
    ``--budget`` or ``--stain`` change the hash), else from its models as they are.

    An audit record is shown to the thread's owner, so it carries no credentials (URLs lose
    their user, password and query) and no server folders (paths keep their last part).
    """
    from histopilot.agents.models import model_name
    from histopilot.privacy import remote_destinations, safe_url

    config = context.config
    if config is not None:
        config = config.model_copy(update={"agents": context.settings})
        models = []
        for role in sorted(context.models):
            settings = config.roles[role]
            served = settings.backend == "openai" and settings.base_url
            models.append(
                ModelUse(
                    role=role,
                    backend=settings.backend,
                    model=settings.model,
                    adapter=settings.adapter,
                    revision=model_revision(settings),
                    endpoint=safe_url(settings.base_url) if served else None,
                )
            )
    else:
        models = [
            ModelUse(role=role, backend=type(model).__name__, model=model_name(model))
            for role, model in sorted(context.models.items())
        ]
    return Provenance(
        config_hash=config_hash(config if config is not None else context.settings),
        settings={
            key: _shareable(value)
            for key, value in context.settings.model_dump(mode="json").items()
        },
        models=models,
        encoder=f"{context.encoder.name} ({context.encoder.fingerprint})",
        prompts=prompt_versions(),
        remote=remote_destinations(config) if config is not None else [],
    )


def _shareable(value: Any) -> Any:
    """A setting as an audit record may show it: URLs without credentials, paths by name."""
    from histopilot.privacy import safe_url

    if not isinstance(value, str):
        return value
    if "://" in value:
        return safe_url(value)
    if "/" in value or "\\" in value:
        return Path(value).name
    return value


# -- hearing a run ----------------------------------------------------------------------------
class AuditRecorder(BaseCallbackHandler):
    """Collects the model and tool calls of one run (thread-safe: branches run in parallel)."""

    def __init__(self) -> None:
        self.model_calls: list[ModelCall] = []
        self.tool_calls: list[ToolCall] = []
        self._open: dict[UUID, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def on_chat_model_start(self, serialized, messages, *, run_id, metadata=None, **kwargs):
        params = kwargs.get("invocation_params") or {}
        model = (
            params.get("model") or params.get("model_name") or (metadata or {}).get("ls_model_name")
        )
        self._start(run_id, {"node": (metadata or {}).get("langgraph_node"), "model": model})

    def on_llm_end(self, response: LLMResult, *, run_id, **kwargs):
        started, details = self._finish(run_id)
        if started is None:
            return
        output = response.llm_output or {}
        usage = output.get("token_usage") or {}
        message = (
            getattr(response.generations[0][0], "message", None) if response.generations else None
        )
        metadata = getattr(message, "response_metadata", {}) or {}
        usage_metadata = getattr(message, "usage_metadata", None) or {}
        call = ModelCall(
            **details,
            served=output.get("model_name") or metadata.get("model_name"),
            fingerprint=output.get("system_fingerprint") or metadata.get("system_fingerprint"),
            seconds=round(time.perf_counter() - started, 4),
            input_tokens=usage.get("prompt_tokens") or usage_metadata.get("input_tokens"),
            output_tokens=usage.get("completion_tokens") or usage_metadata.get("output_tokens"),
        )
        with self._lock:
            self.model_calls.append(call)

    def on_llm_error(self, error, *, run_id, **kwargs):
        started, details = self._finish(run_id)
        if started is not None:
            with self._lock:
                self.model_calls.append(
                    ModelCall(
                        **details,
                        seconds=round(time.perf_counter() - started, 4),
                        error=type(error).__name__,
                    )
                )

    def on_tool_start(self, serialized, input_str, *, run_id, inputs=None, **kwargs):
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        self._start(run_id, {"name": name, "inputs": safe_inputs(inputs or {})})

    def on_tool_end(self, output, *, run_id, **kwargs):
        started, details = self._finish(run_id)
        if started is None:
            return
        text = getattr(output, "content", output)
        with self._lock:
            self.tool_calls.append(
                ToolCall(
                    **details,
                    outputs=output_ids(str(text)),
                    seconds=round(time.perf_counter() - started, 4),
                )
            )

    def on_tool_error(self, error, *, run_id, **kwargs):
        started, details = self._finish(run_id)
        if started is not None:
            with self._lock:
                self.tool_calls.append(
                    ToolCall(
                        **details,
                        seconds=round(time.perf_counter() - started, 4),
                        error=type(error).__name__,
                    )
                )

    def _start(self, run_id: UUID, details: dict[str, Any]) -> None:
        with self._lock:
            self._open[run_id] = (time.perf_counter(), details)

    def _finish(self, run_id: UUID) -> tuple[float | None, dict[str, Any]]:
        with self._lock:
            return self._open.pop(run_id, (None, {}))


def safe_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Tool inputs as the audit keeps them: ids, numbers and short strings; anything longer
    (it may quote report text) as its hash; injected state never."""
    kept: dict[str, Any] = {}
    for key, value in inputs.items():
        if key in ("state", "tool_call_id") or value is None:
            continue
        if isinstance(value, bool | int | float) or (
            isinstance(value, str) and len(value) <= MAX_INPUT_CHARS
        ):
            kept[key] = value
        else:
            kept[key] = f"sha256:{text_hash(json.dumps(value, default=str, sort_keys=True))}"
    return kept


def output_ids(text: str) -> list[str]:
    """What a tool's output names (regions, passages, reference patches) and its hash."""
    return [*dict.fromkeys(_IDS.findall(text)), f"sha256:{text_hash(text)}"]


# -- records --------------------------------------------------------------------------------
def analysis_steps(state: dict[str, Any]) -> list[ToolCall]:
    """The analysis graph's steps, read back from its final state by id."""
    steps = []
    triage = state.get("triage")
    slide = state.get("slide")
    if triage is not None and slide is not None:
        steps.append(
            ToolCall(
                name="triage",
                inputs={"slide": slide.slide_id, "method": triage.method},
                outputs=[f"tiles:{triage.tiles}", f"risk:{triage.risk}", f"budget:{triage.budget}"],
            )
        )
    evidence = state.get("evidence", {})
    findings = state.get("findings", {})
    for region in sorted(state.get("regions", {}).values(), key=lambda r: (r.trajectory, r.step)):
        steps.append(
            ToolCall(
                name="navigate",
                inputs={"trajectory": region.trajectory, "step": region.step},
                outputs=[region.id],
            )
        )
        finding = findings.get(region.id)
        if finding is not None:
            cited = sorted(e.source for e in evidence.values() if e.region_id == region.id)
            steps.append(
                ToolCall(
                    name="describe",
                    inputs={"region": region.id, "magnification": region.magnification},
                    outputs=[finding.source, f"sha256:{text_hash(finding.text)}", *cited],
                )
            )
    for item in evidence.values():
        if item.kind == "knowledge":
            steps.append(
                ToolCall(
                    name="knowledge_search", inputs={"query": item.label}, outputs=[item.source]
                )
            )
    return steps


def analysis_audit(
    thread_id: str,
    state: dict[str, Any],
    provenance: Provenance,
    recorder: AuditRecorder,
    *,
    record_id: str,
    started: datetime,
    seconds: float,
    outputs: list[str] = (),
) -> AuditRecord:
    report = state.get("report")
    question = state.get("question")
    return AuditRecord(
        id=record_id,
        kind="analysis",
        thread_id=thread_id,
        started=started,
        seconds=round(seconds, 3),
        slide_id=state["slide"].slide_id if state.get("slide") else None,
        material=state.get("material"),
        input_sha256=text_hash(question) if question else None,
        provenance=provenance,
        model_calls=recorder.model_calls,
        tool_calls=[*analysis_steps(state), *recorder.tool_calls],
        regions=sorted(state.get("regions", {})),
        timings={k: round(v, 4) for k, v in state.get("timings", {}).items()},
        guardrails=report.guardrails if report is not None else [],
        outputs=[
            *([f"report:{report.synoptic.id}"] if report and report.synoptic else []),
            *outputs,
        ],
    )


def now() -> datetime:
    return datetime.now(UTC)


# -- storage --------------------------------------------------------------------------------
#: Records beside in-memory savers (tests), dropped with their saver.
_MEMORY: weakref.WeakKeyDictionary[BaseCheckpointSaver, dict[str, AuditRecord]] = (
    weakref.WeakKeyDictionary()
)
#: Checkpointers whose database this process has made sure holds the table.
_READY: weakref.WeakSet[BaseCheckpointSaver] = weakref.WeakSet()
_READY_LOCK = threading.Lock()
#: Key of the advisory lock replicas take to create the table one at a time.
_DDL_LOCK = 0x68697374_61756474
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE} (id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, "
    "kind TEXT NOT NULL, started TEXT NOT NULL, record TEXT NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_by_thread ON {_TABLE}(thread_id)",
)


class AuditLog:
    """Audit records in the database of a checkpointer (SQLite, Postgres or memory).

    A checkpointer of another kind keeps no audit trail: the run goes on, and the log says so
    once (an audit that cannot be written must not stop a pathologist's work).
    """

    def __init__(self, checkpointer: BaseCheckpointSaver) -> None:
        self.checkpointer = checkpointer
        self._kind = self._dialect(checkpointer)
        if self._kind == "memory":
            _MEMORY.setdefault(checkpointer, {})
        elif self._kind != "none":
            self._create_table()

    @staticmethod
    def _dialect(checkpointer: BaseCheckpointSaver) -> str:
        if isinstance(checkpointer, InMemorySaver):
            return "memory"
        if isinstance(getattr(checkpointer, "conn", None), sqlite3.Connection):
            return "sqlite"
        if type(checkpointer).__module__.startswith("langgraph.checkpoint.postgres"):
            return "postgres"
        if first_time(f"audit beside {type(checkpointer).__name__}"):
            log.warning(
                "no audit trail beside a %s checkpointer: use SQLite, Postgres or memory",
                type(checkpointer).__name__,
            )
        return "none"

    def _create_table(self) -> None:
        """Make sure of the table once per database and process; on Postgres under an
        advisory lock, since replicas starting together would race on the catalogue."""
        with _READY_LOCK:
            if self.checkpointer in _READY:
                return
            with self._connection() as connection:
                if self._kind == "postgres":
                    with connection.transaction():
                        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
                        for statement in _SCHEMA:
                            connection.execute(statement)
                else:
                    for statement in _SCHEMA:
                        connection.execute(statement)
                    connection.commit()
            _READY.add(self.checkpointer)

    def add(self, record: AuditRecord) -> None:
        if self._kind == "none":
            return
        if self._kind == "memory":
            _MEMORY[self.checkpointer][record.id] = record
            return
        self._run(
            f"INSERT INTO {_TABLE} (id, thread_id, kind, started, record) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            record.id,
            record.thread_id,
            record.kind,
            record.started.isoformat(),
            record.model_dump_json(),
        )

    def records(self, thread_id: str) -> list[AuditRecord]:
        """The thread's records and those of the analyses its turns ran, oldest first."""
        if self._kind == "none":
            return []
        prefix = f"{thread_id}:analysis:"
        if self._kind == "memory":
            found = [
                r
                for r in _MEMORY[self.checkpointer].values()
                if r.thread_id == thread_id or r.thread_id.startswith(prefix)
            ]
            return sorted(found, key=lambda r: r.started)
        rows = self._run(
            f"SELECT record FROM {_TABLE} WHERE thread_id = ? OR substr(thread_id, 1, ?) = ? "
            "ORDER BY started",
            thread_id,
            len(prefix),
            prefix,
        )
        return [AuditRecord.model_validate_json(row[0]) for row in rows]

    def count(self, thread_id: str, kind: str) -> int:
        """How many records of ``kind`` the thread itself has (not its analyses')."""
        if self._kind == "none":
            return 0
        if self._kind == "memory":
            stored = _MEMORY[self.checkpointer].values()
            return sum(r.thread_id == thread_id and r.kind == kind for r in stored)
        rows = self._run(
            f"SELECT count(*) FROM {_TABLE} WHERE thread_id = ? AND kind = ?", thread_id, kind
        )
        return int(rows[0][0])

    def delete(self, thread_id: str) -> None:
        if self._kind == "none":
            return
        if self._kind == "memory":
            store = _MEMORY[self.checkpointer]
            for record in self.records(thread_id):
                store.pop(record.id, None)
            return
        prefix = f"{thread_id}:analysis:"
        self._run(
            f"DELETE FROM {_TABLE} WHERE thread_id = ? OR substr(thread_id, 1, ?) = ?",
            thread_id,
            len(prefix),
            prefix,
        )

    def _run(self, sql: str, *args: Any) -> list[tuple]:
        with self._connection() as connection:
            if self._kind == "postgres":
                sql = sql.replace("?", "%s")
            cursor = connection.execute(sql, args)
            rows = cursor.fetchall() if cursor.description else []
            if self._kind == "sqlite":
                connection.commit()
        return [tuple(row.values()) if isinstance(row, dict) else tuple(row) for row in rows]

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = self.checkpointer.conn
        if self._kind == "sqlite":
            with self.checkpointer.lock:
                yield conn
        elif hasattr(conn, "connection"):  # a pool
            with conn.connection() as connection:
                yield connection
        else:
            with self.checkpointer.lock:
                yield conn
