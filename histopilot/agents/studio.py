"""The graph entry for ``langgraph dev`` and LangGraph Studio (see ``langgraph.json``).

LangGraph's server persists threads itself and refuses a graph compiled with its own
checkpointer, so this entry is compiled without one. Runs started there pass only the input
(``{"slide_path": …, "question": …}``); the nodes then load their context from the histopilot
configuration (``histopilot.toml``, ``HISTOPILOT_…`` variables).
"""

from histopilot.agents.graph import build_analysis_graph

graph = build_analysis_graph().compile(name="histopilot-analysis")
