"""Structured extraction: free-text pathology reports in, synoptic fields with spans out.

``extract_fields`` is the one entry point: the rule-based extractor when no model is given (the
offline default), else the ``extractor`` model with every value checked against its quote, and
the rules filling what the model left out when ``combined``.
"""

from __future__ import annotations

from typing import Any

from histopilot.tools.extract.rules import SCHEMA_CHOICES, extract_with_rules, flat_fields

__all__ = ["SCHEMA_CHOICES", "extract_fields"]


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
