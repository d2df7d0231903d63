"""The ``offline`` backend: no model at all, and a marker that says so.

Offline roles are not chat models. Each agent has a deterministic strategy built on measured
image features, retrieval and the knowledge base, and branches on :class:`OfflineModel`. What
truly needs free text (open chat) calls :meth:`OfflineModel.require`, which explains how to
configure a model instead of producing text nobody wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from histopilot.errors import ModelRequiredError


@dataclass(frozen=True)
class OfflineModel:
    """Stands in for the chat model of a role configured ``backend = "offline"``."""

    role: str

    def require(self, task: str) -> NoReturn:
        """Raise a :class:`ModelRequiredError` explaining that ``task`` needs a model."""
        raise ModelRequiredError(
            f"{task} needs a language model, and role '{self.role}' is offline. "
            f"Set [roles.{self.role}] backend = 'openai' with model and base_url (a vLLM or other "
            "OpenAI-compatible server; `histopilot serve-llm` starts one) or backend = "
            "'transformers' with model = a hub id or local folder, in histopilot.toml; "
            "or pass --profile gpu."
        )
