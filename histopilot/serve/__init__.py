"""Model backends and serving.

``chat_model(role, config)`` returns each agent role's chat model: an OpenAI-compatible server
(vLLM first), an in-process Hugging Face model, or the offline marker. ``histopilot serve-llm``
starts the vLLM servers a configuration names. The FastAPI app and web viewer live here too.

The names below load on first use: the backends pull in LangChain, PyTorch and PEFT, which a
command such as ``histopilot slide info`` should not pay for.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "chat_model": "histopilot.serve.factory",
    "require_chat_model": "histopilot.serve.factory",
    "image_part": "histopilot.serve.messages",
    "OfflineModel": "histopilot.serve.offline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'histopilot.serve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
