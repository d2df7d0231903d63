"""``chat_model(role, config)``: the one place agents get their language models from.

The same graph runs against a vLLM cluster, one local GPU or CPU, or no model at all; only the
configuration changes. See :mod:`histopilot.config` for how a role is configured.
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from histopilot.config import HistopilotConfig, load_config
from histopilot.privacy import announce_remote, announce_tracing
from histopilot.serve.offline import OfflineModel


def chat_model(role: str, config: HistopilotConfig | None = None) -> BaseChatModel | OfflineModel:
    """The chat model for ``role``, or an :class:`OfflineModel` marker for offline roles.

    Building a model is cheap: nothing is loaded or contacted until the first call, so a graph
    can ask for every role up front. A role served by another machine, and LangSmith tracing,
    are announced the first time: that is where prompts, report text and slide regions go.
    """
    config = config or load_config()
    settings = config.roles[role]
    announce_tracing()
    # Each backend is imported when a role first uses it: PyTorch only for in-process models.
    if settings.backend == "openai":
        from histopilot.serve.openai_backend import openai_chat_model

        announce_remote(role, settings.base_url or "")
        return openai_chat_model(role, settings)
    if settings.backend == "transformers":
        from histopilot.serve.transformers_backend import TransformersChatModel

        return TransformersChatModel(role=role, settings=settings)
    return OfflineModel(role=role)


def require_chat_model(
    role: str, task: str, config: HistopilotConfig | None = None
) -> BaseChatModel:
    """Like :func:`chat_model`, for tasks that cannot run offline (open chat, free text)."""
    model = chat_model(role, config)
    if isinstance(model, OfflineModel):
        model.require(task)
    return model
