"""Structured extraction: free-text pathology reports in, synoptic fields with spans out.

``extract_fields`` is the one entry point: the rule-based extractor when no model is given (the
offline default), else the ``extractor`` model with every value checked against its quote, and
the rules filling what the model left out when ``combined``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from histopilot.errors import HistopilotError
from histopilot.tools.extract.rules import SCHEMA_CHOICES, extract_with_rules, flat_fields
from histopilot.tools.report.schemas import SCHEMA_ALIASES

if TYPE_CHECKING:
    from histopilot.config import HistopilotConfig

__all__ = ["SCHEMA_CHOICES", "configured_extractor", "extract_fields"]
Extractor = Callable[[str], tuple[str, dict[str, dict[str, Any]], list[str]]]


def extract_fields(
    text: str, schema: str = "auto", *, model: Any = None, combined: bool = True
) -> tuple[str, dict[str, dict[str, Any]], list[str]]:
    """(schema name, ``{field: {"value", "span"}}``, warnings) for one report."""
    if model is None:
        filled, warnings = extract_with_rules(text, schema)
    else:
        from histopilot.tools.extract.model import extract_with_model

        filled, warnings = extract_with_model(text, model, schema, combined=combined)
    return filled.schema_name, flat_fields(filled), warnings


def configured_extractor(
    config: HistopilotConfig, schema: str = "auto", *, combined: bool = True
) -> Extractor:
    """text → (schema, fields, warnings) with the extractor role of ``config``; the model, if
    any, is built once here and shared by every call."""
    if schema not in SCHEMA_CHOICES and schema not in SCHEMA_ALIASES:
        raise HistopilotError(
            f"--schema {schema!r} is not a schema; choose one of "
            f"{', '.join([*SCHEMA_CHOICES, *SCHEMA_ALIASES])}"
        )
    if config.roles.extractor.backend == "offline":
        return lambda text: extract_fields(text, schema)
    from histopilot.serve.factory import chat_model

    model = chat_model("extractor", config)
    return lambda text: extract_fields(text, schema, model=model, combined=combined)
