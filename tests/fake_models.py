"""Chat models that answer from a script, for testing the graph's routing and state.

``ScriptedChatModel`` tells the agents apart by their system prompt (each agent's prompt file
starts differently) and answers each with the next reply of that agent's script, or with what a
function of the request returns. It records every request, so a test can check what an agent
was told (a directive reaching navigation, say).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

AGENTS = {
    "navigation agent": "navigate",
    "description agent": "describe",
    "diagnostic agent": "diagnose",
    "report writer": "report",
    "synoptic checklist": "synoptic",
    "histopilot, a pathology assistant": "chat",
    "extract structured fields": "extract",
}

Reply = str | dict | AIMessage | Callable[[list[BaseMessage]], Any]


def agent_of(messages: list[BaseMessage]) -> str:
    system = next((m.text for m in messages if isinstance(m, SystemMessage)), "")
    for marker, agent in AGENTS.items():
        if marker in system:
            return agent
    return "unknown"


class ScriptedChatModel(BaseChatModel):
    """Answers each agent from ``scripts[agent]``: a list consumed in order (the last reply
    repeats), or one reply. Dicts are sent as JSON text; callables get the messages."""

    scripts: dict[str, Any]
    _requests: list[tuple[str, list[BaseMessage]]] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def requests(self) -> list[tuple[str, list[BaseMessage]]]:
        return self._requests

    def asked(self, agent: str) -> list[list[BaseMessage]]:
        return [messages for name, messages in self._requests if name == agent]

    def bind_tools(self, tools, **kwargs):  # the chat agent binds tools; the script decides
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        agent = agent_of(messages)
        self._requests.append((agent, list(messages)))
        script = self.scripts.get(agent)
        if isinstance(script, list):
            calls = len(self.asked(agent))
            reply: Reply = script[min(calls, len(script)) - 1]
        else:
            reply = script
        if callable(reply):
            reply = reply(messages)
        if isinstance(reply, dict):
            reply = json.dumps(reply)
        message = reply if isinstance(reply, AIMessage) else AIMessage(str(reply))
        return ChatResult(generations=[ChatGeneration(message=message)])
