"""The LangGraph agent graph: triage, navigation, description, diagnosis, report, chat.

``run_analysis`` reads one slide end to end; ``ChatSession`` holds a conversation about one.
Both take an :class:`AgentContext` (models, encoder, reference bank, knowledge base, limits)
and a checkpointer (``open_checkpointer``), so any thread can be resumed later or elsewhere.
The graph itself is built in :mod:`histopilot.agents.graph`; its state in
:mod:`histopilot.agents.state`.

The names below load on first use, so ``histopilot analyze`` does not pay for the chat.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AgentContext": "histopilot.agents.context",
    "AnalysisRun": "histopilot.agents.run",
    "ChatSession": "histopilot.agents.chat",
    "open_checkpointer": "histopilot.agents.checkpoints",
    "run_analysis": "histopilot.agents.run",
    "write_outputs": "histopilot.agents.outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'histopilot.agents' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
