"""The rule-based extractor: free text in, a filled synoptic schema out, with no model at all.

It detects the organ, picks the schema, runs each field's finder, and, where the report never
writes pT or pN, derives them from size, extent and node counts by the organ's AJCC rules. It is
the offline default, and it checks what a model extractor returns (see ``model.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from histopilot.tools.extract import biomarkers, gleason, histology, nodes, staging, tnm, tumour
from histopilot.tools.extract.sites import detect_organ, other_sites, schema_for
from histopilot.tools.extract.text import Mention
from histopilot.tools.report.schemas import SCHEMAS, Reported, SynopticBase, schema_named

SCHEMA_CHOICES = ("auto", *SCHEMAS)


def find_mentions(text: str, schema_name: str, organ: str | None) -> dict[str, Mention]:
    """Every field a finder can read from ``text``, keyed by schema field name."""
    found: dict[str, Mention | None] = {}
    categories = tnm.tnm_mentions(text, other_sites(organ))
    found["pT"] = tnm.choose(categories["T"])
    found["pN"] = tnm.choose(categories["N"])
    found["pM"] = tnm.choose(categories["M"])
    examined, positive = nodes.node_counts(text)
    found["lymph_nodes_examined"], found["lymph_nodes_positive"] = examined, positive
    size = tumour.tumour_size_mm(text)
    found["tumor_size_mm"] = size
    kind, code = histology.histologic_type(text, organ)
    found["histologic_type"], found["histologic_type_icdo3"] = kind, code
    found["grade"] = tumour.grade(text, schema_name)
    found["margin_status"] = tumour.margin_status(text)
    found["margin_distance_mm"] = tumour.margin_distance_mm(text)
    found["residual_tumor"] = tumour.residual_tumour(text)
    for field in ("lymphovascular_invasion", "perineural_invasion"):
        found[field] = tumour.invasion(text, field)
    if schema_name.startswith("breast"):
        for which in ("er", "pr"):
            result = biomarkers.receptor(text, which)
            for part, mention in result.items():
                found[f"{which}_{part}"] = mention
        her2 = biomarkers.her2(text)
        found["her2_status"] = her2.get("status")
        found["her2_ihc_score"] = her2.get("score")
        found["her2_ihc_status"] = her2.get("ihc_status")
        found["her2_ish_status"] = her2.get("ish")
        found["ki67_percent"] = biomarkers.ki67(text)
    if schema_name.startswith("prostate") or "gleason" in text.lower():
        resection = schema_name != "prostate_biopsy"
        for part, mention in gleason.gleason(text, resection=resection).items():
            found[f"gleason_{part}" if part != "grade_group" else part] = mention
    if found["pT"] is None or "X" in str(found["pT"].value):
        found["pT"] = staging.derive_t(organ, text, size) or found["pT"]
    if found["pN"] is None or "X" in str(found["pN"].value):
        found["pN"] = staging.derive_n(organ, text, examined, positive) or found["pN"]
    return {name: mention for name, mention in found.items() if mention is not None}


def reported(mention: Mention) -> dict[str, Any]:
    """A finder's result as a ``Reported`` payload."""
    payload = {"value": mention.value, "span": mention.span}
    if mention.basis:
        payload["basis"] = mention.basis
    return payload


def extract_with_rules(
    text: str, schema: str = "auto", *, organ: str | None = None
) -> tuple[SynopticBase, list[str]]:
    """The filled schema for one report, and warnings about values that did not fit it.
    ``organ`` is detected from the text unless a caller that already did passes it."""
    organ = organ or detect_organ(text)
    name = (
        schema_for(organ, text)
        if schema == "auto"
        else schema_named(schema).model_fields["schema_name"].default
    )
    model = SCHEMAS[name]
    values = {
        field: reported(mention)
        for field, mention in find_mentions(text, name, organ).items()
        if field in model.model_fields
    }
    return fitted(model, values)


def fitted(model: type[SynopticBase], values: dict[str, Any]) -> tuple[SynopticBase, list[str]]:
    """``model`` filled with ``values``; a value that does not fit its field is left out, with
    a warning naming it, rather than failing the whole report."""
    warnings: list[str] = []
    while True:
        try:
            return model.model_validate(values), warnings
        except ValidationError as error:
            misfits = {str(problem["loc"][0]): problem["msg"] for problem in error.errors()}
            if not misfits.keys() & values.keys():
                raise  # not a value's fault: a bug, not a bad report
            for field, message in misfits.items():
                value = values.pop(field, {}).get("value")
                warnings.append(f"{field}: {value!r} does not fit {model.__name__} ({message})")


def flat_fields(filled: SynopticBase) -> dict[str, dict[str, Any]]:
    """``{field: {"value", "span"[, "basis"]}}`` for every field of the schema (``None`` values
    are "not stated"): the shape of an extraction record."""
    out: dict[str, dict[str, Any]] = {}
    for name in type(filled).model_fields:
        if name == "schema_name":
            continue
        value: Reported = getattr(filled, name)
        entry: dict[str, Any] = {
            "value": value.value,
            "span": list(value.span) if value.span else None,
        }
        if value.basis:
            entry["basis"] = value.basis
        out[name] = entry
    return out
