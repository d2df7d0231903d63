"""The LangGraph agent graph: triage, navigation, description, diagnosis, report, chat.

``run_analysis`` reads one slide end to end; ``ChatSession`` holds a conversation about one.
Both take an :class:`AgentContext` (models, encoder, reference bank, knowledge base, limits)
and a checkpointer (``open_checkpointer``), so any thread can be resumed later or elsewhere.
The graph itself is built in :mod:`histopilot.agents.graph`; its state in
:mod:`histopilot.agents.state`.
"""

from histopilot.agents.chat import ChatSession
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.context import AgentContext
from histopilot.agents.outputs import write_outputs
from histopilot.agents.run import AnalysisRun, run_analysis

__all__ = [
    "AgentContext",
    "AnalysisRun",
    "ChatSession",
    "open_checkpointer",
    "run_analysis",
    "write_outputs",
]
