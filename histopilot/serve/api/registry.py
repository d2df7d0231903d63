"""Who owns which thread and analysis, and how each analysis stands, in one SQLite file.

The conversation itself lives in the graph's checkpointer; this file only says whose it is, so
one user's token can never list, read or delete another user's work. Writes are committed as
they happen, so a server killed at any moment restarts knowing every thread it had.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

AnalysisState = Literal["queued", "running", "done", "failed", "interrupted"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "interrupted"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, slide_id TEXT NOT NULL, slide_name TEXT NOT NULL,
    created REAL NOT NULL, title TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS analyses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, slide_id TEXT NOT NULL, slide_name TEXT NOT NULL,
    question TEXT, status TEXT NOT NULL, created REAL NOT NULL, finished REAL,
    error TEXT, progress TEXT NOT NULL DEFAULT '[]', summary TEXT
);
CREATE INDEX IF NOT EXISTS threads_by_owner ON threads(owner, created);
CREATE INDEX IF NOT EXISTS analyses_by_owner ON analyses(owner, created);
"""


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
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _run(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- threads ------------------------------------------------------------------------------
    def thread(self, owner: str, thread_id: str) -> ThreadRecord | None:
        rows = self._run("SELECT * FROM threads WHERE id = ? AND owner = ?", thread_id, owner)
        return _thread(rows[0]) if rows else None

    def add_thread(
        self, owner: str, thread_id: str, slide_id: str, slide_name: str, title: str
    ) -> ThreadRecord:
        self._run(
            "INSERT INTO threads (id, owner, slide_id, slide_name, created, title) "
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
        rows = self._run("SELECT * FROM threads WHERE owner = ? ORDER BY created DESC", owner)
        return [_thread(row) for row in rows]

    def delete_thread(self, owner: str, thread_id: str) -> None:
        self._run("DELETE FROM threads WHERE id = ? AND owner = ?", thread_id, owner)

    # -- analyses -----------------------------------------------------------------------------
    def add_analysis(
        self, owner: str, analysis_id: str, slide_id: str, slide_name: str, question: str | None
    ) -> AnalysisRecord:
        self._run(
            "INSERT INTO analyses (id, owner, slide_id, slide_name, question, status, created) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
            analysis_id,
            owner,
            slide_id,
            slide_name,
            question,
            time.time(),
        )
        record = self.analysis(owner, analysis_id)
        assert record is not None
        return record

    def analysis(self, owner: str, analysis_id: str) -> AnalysisRecord | None:
        rows = self._run("SELECT * FROM analyses WHERE id = ? AND owner = ?", analysis_id, owner)
        return _analysis(rows[0]) if rows else None

    def analyses(self, owner: str) -> list[AnalysisRecord]:
        rows = self._run("SELECT * FROM analyses WHERE owner = ? ORDER BY created DESC", owner)
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
            "UPDATE analyses SET status = ?, error = ?, summary = ?, finished = ? WHERE id = ?",
            status,
            error,
            json.dumps(summary) if summary is not None else None,
            finished,
            analysis_id,
        )

    def add_progress(self, analysis_id: str, line: str) -> None:
        self._run(
            "UPDATE analyses SET progress = json_insert(progress, '$[#]', ?) WHERE id = ?",
            line,
            analysis_id,
        )

    def interrupt_unfinished(self) -> int:
        """Mark analyses a previous server left running as interrupted; returns how many."""
        rows = self._run(
            "UPDATE analyses SET status = 'interrupted', finished = ?, "
            "error = 'the server stopped while this analysis ran; start it again' "
            "WHERE status IN ('queued', 'running') RETURNING id",
            time.time(),
        )
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _thread(row: sqlite3.Row) -> ThreadRecord:
    return ThreadRecord(**{key: row[key] for key in ThreadRecord.model_fields})


def _analysis(row: sqlite3.Row) -> AnalysisRecord:
    values = dict(row)
    values["progress"] = json.loads(values["progress"])
    values["summary"] = json.loads(values["summary"]) if values["summary"] else None
    values.pop("owner")
    return AnalysisRecord(**values)
