"""The LangGraph agent graph: state, triage, navigation, description, diagnosis, report, chat.

It will own the compiled graphs, their typed state and the run-scoped context.
"""
