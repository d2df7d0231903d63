"""Progress events: one line per agent step, streamed as LangGraph ``custom`` events."""

from __future__ import annotations

from langgraph.config import get_stream_writer


def progress(message: str, **fields: object) -> None:
    """Emit ``{"progress": message, ...}`` to whoever streams the run in ``custom`` mode; a
    node called outside a graph run (a unit test, a direct call) has no writer and no-ops."""
    try:
        writer = get_stream_writer()
    except RuntimeError:
        return
    writer({"progress": message, **fields})
