"""How agent nodes talk to models: one structured call, prompts from files, offline checks.

Every model decision (next region, description, differential, report) is a Pydantic object.
Servers with a JSON-schema decoder (vLLM, OpenAI) constrain the answer; other chat models get
the schema in the prompt and a bounded re-ask (:mod:`histopilot.serve.structured`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, TypeVar

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from histopilot.errors import ModelRequestError, StructuredOutputError
from histopilot.serve.offline import OfflineModel
from histopilot.serve.structured import with_schema_prompting

Schema = TypeVar("Schema", bound=BaseModel)
#: Re-asks when a model's answer does not match the schema (in-process and fake models).
STRUCTURED_RETRIES = 1
#: A model answer these errors end is replaced by the node's measured strategy, and the run's
#: warnings say so; an unreachable server is an error the user must see instead.
_FALLBACK_ERRORS = (StructuredOutputError, ModelRequestError)


def is_offline(model: Any) -> bool:
    return model is None or isinstance(model, OfflineModel)


def model_name(model: Any) -> str:
    for attribute in ("model_name", "model", "model_id"):
        value = getattr(model, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def structured_call(
    model: BaseChatModel, schema: type[Schema], messages: list[BaseMessage]
) -> Schema:
    """Ask ``model`` for an instance of ``schema``; raises ``StructuredOutputError`` when the
    answer never matches, which callers turn into their offline fallback."""
    if type(model).with_structured_output is BaseChatModel.with_structured_output:
        # The base class would bind the schema as a tool, which plain chat models lack.
        runnable = with_schema_prompting(model, schema, retries=STRUCTURED_RETRIES)
    else:
        runnable = model.with_structured_output(schema)
    answer = runnable.invoke(messages)
    return answer if isinstance(answer, schema) else schema.model_validate(answer)


def ask(
    model: BaseChatModel, schema: type[Schema], messages: list[BaseMessage]
) -> tuple[Schema | None, str]:
    """The model's answer, or ``None`` and why it cannot be used, for the node to fall back on
    its measured strategy. Errors a fallback cannot cure (an unreachable server) propagate."""
    try:
        return structured_call(model, schema, messages), ""
    except _FALLBACK_ERRORS as error:
        return None, str(error)


@cache
def prompt(name: str) -> str:
    """The system prompt ``name`` from ``histopilot/agents/prompts/<name>.md``."""
    return (resources.files("histopilot.agents") / "prompts" / f"{name}.md").read_text(
        encoding="utf-8"
    )
