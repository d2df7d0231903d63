"""Who owns which thread and analysis, and how each analysis stands: SQLite or Postgres.

The conversation itself lives in the graph's checkpointer; this registry only says whose it
is, so one user's token can never list, read or delete another user's work. Writes are
committed as they happen, so a server killed at any moment restarts knowing every thread it had.

One server keeps the registry in a SQLite file in its data folder. Replicas behind a load
balancer share it in the Postgres database that holds their checkpoints (tables prefixed
``histopilot_``), so a thread started on one replica continues on any other. Two things then
need care: a thread runs one turn at a time across all replicas (a lease in the thread's row,
taken and released atomically), and a replica that starts marks as interrupted only the
analyses it ran itself (each analysis records its replica).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from histopilot.errors import ConfigError

AnalysisState = Literal["queued", "running", "done", "failed", "interrupted"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "interrupted"})
#: How long a chat turn holds its thread at most; a replica that dies mid-turn frees it then.
TURN_LEASE_S = 15 * 60
#: Connections to a shared database per replica: chat turns, analyses and requests at once.
POOL_SIZE = 16

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {threads} (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, slide_id TEXT NOT NULL, slide_name TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, title TEXT NOT NULL DEFAULT ''
)""",
    """CREATE TABLE IF NOT EXISTS {analyses} (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, slide_id TEXT NOT NULL, slide_name TEXT NOT NULL,
    question TEXT, status TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    finished DOUBLE PRECISION, error TEXT, progress TEXT NOT NULL DEFAULT '[]', summary TEXT
)""",
    "CREATE INDEX IF NOT EXISTS {threads}_by_owner ON {threads}(owner, created)",
    "CREATE INDEX IF NOT EXISTS {analyses}_by_owner ON {analyses}(owner, created)",
)
#: Columns added after the first release; older SQLite files gain them on open.
_ADDED_COLUMNS = (
    ("threads", "busy_until", "DOUBLE PRECISION"),
    ("threads", "busy_by", "TEXT"),
    ("analyses", "replica", "TEXT"),
)


@dataclass(frozen=True)
class _Dialect:
    threads: str
    analyses: str
    placeholder: str
    append_progress: str  # SQL that appends one line to an analysis's JSON list of progress

    def sql(self, statement: str) -> str:
        """``statement`` with its tables named and its ``?`` placeholders in this dialect."""
        named = statement.format(threads=self.threads, analyses=self.analyses)
        return named.replace("?", self.placeholder)


_SQLITE = _Dialect(
    threads="threads",
    analyses="analyses",
    placeholder="?",
    append_progress="UPDATE {analyses} SET progress = json_insert(progress, '$[#]', ?) "
    "WHERE id = ?",
)
_POSTGRES = _Dialect(
    threads="histopilot_threads",
    analyses="histopilot_analyses",
    placeholder="%s",
    append_progress="UPDATE {analyses} SET progress = (progress::jsonb || to_jsonb(?::text))::text "
    "WHERE id = ?",
)


def is_postgres(location: str | Path | None) -> bool:
    return isinstance(location, str) and location.startswith(("postgres://", "postgresql://"))


class ThreadRecord(BaseModel):
    id: str
    slide_id: str
    slide_name: str
    created: float
    title: str


class AnalysisRecord(BaseModel):
    id: str
    slide_id: str
    slide_name: str
    question: str | None
    status: AnalysisState
    created: float
    finished: float | None
    error: str | None
    progress: list[str]
    summary: dict[str, Any] | None


class Registry:
    def __init__(self, location: Path | str, *, replica: str = "local") -> None:
        """The registry in the SQLite file ``location``, or in the Postgres database at the
        URL ``location``; ``replica`` names this server among those sharing it."""
        self.replica = replica
        self._lock = threading.Lock()
        self._pool = self._db = None
        if is_postgres(location):
            self._dialect, self._pool = _POSTGRES, _postgres_pool(str(location))
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dialect = _SQLITE
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
        self._create_tables()

    def _run(self, sql: str, *args: Any) -> list[Mapping[str, Any]]:
        sql = self._dialect.sql(sql)
        if self._pool is not None:  # a connection per statement, checked and replaced if broken
            with self._pool.connection() as connection:
                cursor = connection.execute(sql, args)
                return cursor.fetchall() if cursor.description else []
        with self._lock:
            cursor = self._db.execute(sql, args)
            return cursor.fetchall() if cursor.description else []

    def _create_tables(self) -> None:
        """The tables, and the columns later releases added. Replicas starting together on an
        empty Postgres database take turns (``IF NOT EXISTS`` alone races there)."""
        if self._pool is None:
            for statement in _SCHEMA:
                self._run(statement)
            for table, column, kind in _ADDED_COLUMNS:
                name = getattr(self._dialect, table)
                if column not in {row["name"] for row in self._run(f"PRAGMA table_info({name})")}:
                    self._run(f"ALTER TABLE {name} ADD COLUMN {column} {kind}")
            return
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(hashtext('histopilot registry'))")
            for statement in _SCHEMA:
                connection.execute(self._dialect.sql(statement))
            for table, column, kind in _ADDED_COLUMNS:
                name = getattr(self._dialect, table)
                connection.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column} {kind}")

    # -- threads ------------------------------------------------------------------------------
    def thread(self, owner: str, thread_id: str) -> ThreadRecord | None:
        rows = self._run("SELECT * FROM {threads} WHERE id = ? AND owner = ?", thread_id, owner)
        return _thread(rows[0]) if rows else None

    def add_thread(
        self, owner: str, thread_id: str, slide_id: str, slide_name: str, title: str
    ) -> ThreadRecord:
        self._run(
            "INSERT INTO {threads} (id, owner, slide_id, slide_name, created, title) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            thread_id,
            owner,
            slide_id,
            slide_name,
            time.time(),
            title[:200],
        )
        record = self.thread(owner, thread_id)
        assert record is not None
        return record

    def threads(self, owner: str) -> list[ThreadRecord]:
        rows = self._run("SELECT * FROM {threads} WHERE owner = ? ORDER BY created DESC", owner)
        return [_thread(row) for row in rows]

    def delete_thread(self, owner: str, thread_id: str) -> None:
        self._run("DELETE FROM {threads} WHERE id = ? AND owner = ?", thread_id, owner)

    def claim_thread(self, thread_id: str, holder: str) -> bool:
        """Take the thread for one turn, unless a turn holds it (on any replica)."""
        now = time.time()
        rows = self._run(
            "UPDATE {threads} SET busy_until = ?, busy_by = ? "
            "WHERE id = ? AND (busy_until IS NULL OR busy_until < ?) RETURNING id",
            now + TURN_LEASE_S,
            holder,
            thread_id,
            now,
        )
        return bool(rows)

    def release_thread(self, thread_id: str, holder: str) -> None:
        self._run(
            "UPDATE {threads} SET busy_until = NULL, busy_by = NULL WHERE id = ? AND busy_by = ?",
            thread_id,
            holder,
        )

    def release_turns_of_this_replica(self) -> int:
        """Free the threads whose turns this replica held when it stopped (leases are named
        ``<replica>:<turn>``); returns how many."""
        prefix = f"{self.replica}:"
        rows = self._run(
            "UPDATE {threads} SET busy_until = NULL, busy_by = NULL "
            "WHERE substr(busy_by, 1, ?) = ? RETURNING id",
            len(prefix),
            prefix,
        )
        return len(rows)

    # -- analyses -----------------------------------------------------------------------------
    def add_analysis(
        self, owner: str, analysis_id: str, slide_id: str, slide_name: str, question: str | None
    ) -> AnalysisRecord:
        self._run(
            "INSERT INTO {analyses} "
            "(id, owner, slide_id, slide_name, question, status, created, replica) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
            analysis_id,
            owner,
            slide_id,
            slide_name,
            question,
            time.time(),
            self.replica,
        )
        record = self.analysis(owner, analysis_id)
        assert record is not None
        return record

    def analysis(self, owner: str, analysis_id: str) -> AnalysisRecord | None:
        rows = self._run("SELECT * FROM {analyses} WHERE id = ? AND owner = ?", analysis_id, owner)
        return _analysis(rows[0]) if rows else None

    def analyses(self, owner: str) -> list[AnalysisRecord]:
        rows = self._run("SELECT * FROM {analyses} WHERE owner = ? ORDER BY created DESC", owner)
        return [_analysis(row) for row in rows]

    def set_status(
        self,
        analysis_id: str,
        status: AnalysisState,
        *,
        error: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        finished = time.time() if status in FINISHED else None
        self._run(
            "UPDATE {analyses} SET status = ?, error = ?, summary = ?, finished = ? WHERE id = ?",
            status,
            error,
            json.dumps(summary) if summary is not None else None,
            finished,
            analysis_id,
        )

    def add_progress(self, analysis_id: str, line: str) -> None:
        self._run(self._dialect.append_progress, line, analysis_id)

    def interrupt_unfinished(self) -> int:
        """Mark analyses left running by the last shutdown as interrupted; returns how many.

        A SQLite registry belongs to one server, so every unfinished analysis was its own. In a
        shared database only this replica's are (and those from before replicas were named).
        """
        shared = self._pool is not None
        rows = self._run(
            "UPDATE {analyses} SET status = 'interrupted', finished = ?, "
            "error = 'the server stopped while this analysis ran; start it again' "
            "WHERE status IN ('queued', 'running') "
            + ("AND (replica = ? OR replica IS NULL) " if shared else "")
            + "RETURNING id",
            time.time(),
            *((self.replica,) if shared else ()),
        )
        return len(rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            return
        with self._lock:
            self._db.close()


def _postgres_pool(url: str):
    try:
        from psycopg import OperationalError
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout
    except ImportError as error:
        raise ConfigError(
            "a Postgres database needs the postgres extra: pip install 'histopilot[postgres]'"
        ) from error
    # Autocommit: each statement stands alone, as in the SQLite file. No prepared statements,
    # so the connections work behind a transaction-mode pooler such as PgBouncer.
    kwargs = {"autocommit": True, "row_factory": dict_row, "prepare_threshold": None}
    pool = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=POOL_SIZE,
        open=False,
        timeout=30,
        check=ConnectionPool.check_connection,
    )
    try:
        pool.open(wait=True, timeout=30)  # a wrong address or password is reported here
    except (OperationalError, PoolTimeout) as error:
        pool.close()
        raise ConfigError(
            f"cannot reach the server's Postgres database named in agents.checkpoints: {error}"
        ) from error
    return pool


def _thread(row: Mapping[str, Any]) -> ThreadRecord:
    return ThreadRecord(**{key: row[key] for key in ThreadRecord.model_fields})


def _analysis(row: Mapping[str, Any]) -> AnalysisRecord:
    values = {key: row[key] for key in AnalysisRecord.model_fields}
    values["progress"] = json.loads(values["progress"])
    values["summary"] = json.loads(values["summary"]) if values["summary"] else None
    return AnalysisRecord(**values)
