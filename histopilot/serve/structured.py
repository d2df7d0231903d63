"""Structured output for models without a server-side JSON-schema decoder.

vLLM constrains decoding to a schema; an in-process ``generate`` does not. So the in-process
backend asks for JSON matching the schema, validates the answer with Pydantic, and on failure
shows the model its own answer with the validation error and asks again, a bounded number of
times. Callers get the same contract as ``ChatOpenAI.with_structured_output``: the parsed model,
or with ``include_raw=True`` a dict with ``raw``, ``parsed`` and ``parsing_error``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from pydantic import BaseModel, ValidationError

from histopilot.errors import StructuredOutputError

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def with_schema_prompting(
    model: BaseChatModel,
    schema: type[BaseModel],
    *,
    retries: int,
    include_raw: bool = False,
    request: dict[str, Any] | None = None,
) -> Runnable[LanguageModelInput, Any]:
    """A runnable that answers with an instance of ``schema`` (a Pydantic model class).

    ``request`` goes with every call to the model. When it makes the server enforce the schema
    (an OpenAI-compatible ``response_format``), the schema is not repeated in the prompt.
    """
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise TypeError(
            "in-process structured output needs a Pydantic model class as its schema, "
            f"not {type(schema).__name__}"
        )

    def answer(prompt: LanguageModelInput, config: RunnableConfig) -> Any:
        messages = model._convert_input(prompt).to_messages()
        if request is None:
            messages = with_schema_instruction(messages, schema)
        error: Exception | None = None
        reply = AIMessage(content="")
        for _ in range(retries + 1):
            reply = model.invoke(messages, config, **(request or {}))
            try:
                parsed = schema.model_validate(parse_json_object(reply.text))
            except (ValueError, ValidationError) as problem:
                error = problem
                messages = [
                    *messages,
                    reply,
                    HumanMessage(
                        f"That reply is not valid: {_short(problem)}. "
                        "Reply again with only the corrected JSON object."
                    ),
                ]
                continue
            return (
                {"raw": reply, "parsed": parsed, "parsing_error": None} if include_raw else parsed
            )
        if include_raw:
            return {"raw": reply, "parsed": None, "parsing_error": error}
        raise StructuredOutputError(
            f"the model's answer did not match {schema.__name__} after {retries + 1} attempts: "
            f"{_short(error)}"
        )

    return RunnableLambda(answer, name=f"structured_{schema.__name__}")


def parse_json_object(text: str) -> Any:
    """The first JSON object in ``text``, tolerating a code fence or words around it."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON ({error.msg} at character {error.pos})") from None
    return value


def with_schema_instruction(
    messages: list[BaseMessage], schema: type[BaseModel]
) -> list[BaseMessage]:
    """``messages`` with a system instruction to answer in JSON valid against ``schema``."""
    instruction = (
        "Reply with a single JSON object and nothing else: no prose, no code fence. "
        "It must validate against this JSON schema:\n"
        + json.dumps(schema.model_json_schema(), separators=(",", ":"))
    )
    if messages and isinstance(messages[0], SystemMessage):
        first = messages[0]
        return [SystemMessage(f"{first.text}\n\n{instruction}"), *messages[1:]]
    return [SystemMessage(instruction), *messages]


def _short(error: Exception | None, limit: int = 400) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "…"
