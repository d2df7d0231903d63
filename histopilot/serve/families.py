"""What each model family needs to be served and prompted: tool parser, chat template, options.

One table serves both callers: `histopilot serve-llm` turns an entry into ``vllm serve`` flags,
and the in-process backends use the same chat template and template options, so a model behaves
the same behind vLLM and inside the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

_TEMPLATES = resources.files("histopilot.serve") / "templates"


@dataclass(frozen=True)
class ModelFamily:
    """Serving facts for the models of one family."""

    name: str
    model_types: tuple[str, ...]
    """``model_type`` values in a checkpoint's ``config.json``."""
    id_patterns: tuple[str, ...]
    """Lower-case fragments of hub ids, for models named without a local config."""
    tool_call_parser: str | None = None
    """vLLM ``--tool-call-parser``; None when the family has no tool-calling format."""
    tools_chat_template: str | None = None
    """A packaged chat template to use because the family's own one cannot render tools."""
    vision: bool = False
    qwen_vl_processor: bool = False
    """Accepts ``max_pixels`` through ``--mm-processor-kwargs`` (caps image tokens)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options every request passes to the chat template."""

    def tools_template_path(self) -> Path | None:
        if self.tools_chat_template is None:
            return None
        return Path(str(_TEMPLATES / self.tools_chat_template))

    def tools_template_text(self) -> str | None:
        path = self.tools_template_path()
        return None if path is None else path.read_text(encoding="utf-8")


# More specific entries first: "qwen3-vl" must match before "qwen3".
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        id_patterns=("qwen2.5-vl", "qwen2_5_vl"),
        tool_call_parser="hermes",
        tools_chat_template="qwen_vl_tools.jinja",
        vision=True,
        qwen_vl_processor=True,
    ),
    ModelFamily(
        "qwen2-vl",
        model_types=("qwen2_vl",),
        id_patterns=("qwen2-vl", "qwen2_vl"),
        tool_call_parser="hermes",
        tools_chat_template="qwen_vl_tools.jinja",
        vision=True,
        qwen_vl_processor=True,
    ),
    ModelFamily(
        "qwen3-vl",
        model_types=("qwen3_vl", "qwen3_vl_moe"),
        id_patterns=("qwen3-vl", "qwen3_vl"),
        tool_call_parser="hermes",
        vision=True,
        qwen_vl_processor=True,
    ),
    # Qwen3 text models think before answering by default; ChatOpenAI drops the reasoning
    # field, so histopilot turns thinking off unless a role's extra_body says otherwise.
    ModelFamily(
        "qwen3",
        model_types=("qwen3", "qwen3_moe"),
        id_patterns=("qwen3",),
        tool_call_parser="hermes",
        chat_template_kwargs={"enable_thinking": False},
    ),
    ModelFamily(
        "qwen2.5",
        model_types=("qwen2",),
        id_patterns=("qwen2.5", "qwen2"),
        tool_call_parser="hermes",
    ),
    ModelFamily(
        "llama3",
        model_types=("llama",),
        id_patterns=("llama-3", "llama3"),
        tool_call_parser="llama3_json",
    ),
    ModelFamily(
        "mistral", model_types=("mistral",), id_patterns=("mistral",), tool_call_parser="mistral"
    ),
)

UNKNOWN_FAMILY = ModelFamily("unknown", model_types=(), id_patterns=())


def family_of(model: str, model_type: str | None = None) -> ModelFamily:
    """The family of a model, from its ``model_type`` when known, else from its id or path.

    A local folder's ``config.json`` is read for its ``model_type``, so a fine-tuned model in
    ``/models/my-describer`` is recognised as what it is.
    """
    if model_type is None:
        model_type = _local_model_type(model)
    if model_type:
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    lowered = model.lower()
    for family in FAMILIES:
        if any(pattern in lowered for pattern in family.id_patterns):
            return family
    return UNKNOWN_FAMILY


def _local_model_type(model: str) -> str | None:
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
