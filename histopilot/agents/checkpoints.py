"""Where threads persist: SQLite by default, in memory for tests, Postgres for many replicas.

Checkpoints are deserialised with an allow-list: the state's own Pydantic models and
LangChain's messages, nothing else, so a tampered checkpoint file cannot make the loader build
arbitrary objects.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from histopilot.agents.state import STATE_MODELS
from histopilot.errors import ConfigError


def serializer() -> JsonPlusSerializer:
    return JsonPlusSerializer(allowed_msgpack_modules=STATE_MODELS)


@contextmanager
def open_checkpointer(
    spec: str | None, default_path: Path | None = None
) -> Iterator[BaseCheckpointSaver]:
    """A checkpointer from ``agents.checkpoints``: ``None`` means a SQLite file at
    ``default_path``; ``"memory"``; a ``postgresql://`` URL; or a SQLite file path."""
    if spec == "memory":
        yield InMemorySaver(serde=serializer())
        return
    if spec and spec.startswith(("postgres://", "postgresql://")):
        with _postgres(spec) as saver:
            yield saver
        return
    if not spec and default_path is None:
        raise ConfigError("no checkpoint store: give a SQLite path, 'memory' or a Postgres URL.")
    path = Path(spec).expanduser() if spec else default_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"cannot open the checkpoint database {path}: {error}") from error
    from langgraph.checkpoint.sqlite import SqliteSaver

    try:
        yield SqliteSaver(connection, serde=serializer())
    finally:
        connection.close()


@contextmanager
def _postgres(url: str) -> Iterator[BaseCheckpointSaver]:
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg import OperationalError
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout
    except ImportError as error:
        raise ConfigError(
            "agents.checkpoints names a Postgres database, which needs the postgres extra: "
            "pip install 'histopilot[postgres]'"
        ) from error
    # autocommit and dict rows are what the saver expects; prepare_threshold=None keeps it
    # working behind a transaction-mode pooler such as PgBouncer.
    kwargs = {"autocommit": True, "row_factory": dict_row, "prepare_threshold": None}
    try:
        pool = ConnectionPool(url, kwargs=kwargs, open=True, timeout=30)
        saver = PostgresSaver(pool, serde=serializer())
        saver.setup()
    except (OperationalError, PoolTimeout) as error:
        raise ConfigError(
            f"cannot use the Postgres checkpoint database in agents.checkpoints: {error}"
        ) from error
    with pool:
        yield saver
