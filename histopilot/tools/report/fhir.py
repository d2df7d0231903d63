"""FHIR R4 export: a synoptic report as a Bundle of one DiagnosticReport and its Observations.

Every resource is built and validated with ``fhir.resources.R4B``. The package's top level is
FHIR R5, which R4 servers reject; R4B changed only the medication-definition, evidence and
subscription modules, so Bundle, DiagnosticReport and Observation validate exactly as in R4.

- The DiagnosticReport is LOINC 60568-3 "Pathology Synoptic report" in the v2-0074 category
  SP (surgical pathology), ``preliminary`` while the report is a draft and ``final`` once
  reviewed. Its conclusion is the narrative followed by the notice, so a system that shows
  only the conclusion still says the text is a draft from an AI system.
- histopilot knows slides, not patients: the slide is the report's (and each observation's)
  specimen, referenced by identifier; the laboratory system adds the subject when it files it.
- Each stated element is one Observation coded with the histopilot code for the field and, where
  one is well established, its LOINC code. The evidence is a note for people and an extension
  for programs (region ids, the source span, the basis).
- Ids are uuid5 of the report id, so the same report always exports the same bundle.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from histopilot.errors import ReportInputError
from histopilot.tools.report.document import SynopticReport, label, unit_of, value_type
from histopilot.tools.report.schemas import Reported

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ICD_O_3 = "http://terminology.hl7.org/CodeSystem/icd-o-3"
SYNOPTIC_CODES = "https://histopilot.dev/fhir/CodeSystem/synoptic"
REPORT_IDS = "https://histopilot.dev/fhir/report-id"
SLIDE_IDS = "https://histopilot.dev/fhir/slide-id"
EVIDENCE_EXTENSION = "https://histopilot.dev/fhir/StructureDefinition/synoptic-evidence"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://histopilot.dev/fhir")

SYNOPTIC_REPORT = {"system": LOINC, "code": "60568-3", "display": "Pathology Synoptic report"}
SURGICAL_PATHOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "SP",
    "display": "Surgical Pathology",
}
LABORATORY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "laboratory",
    "display": "Laboratory",
}
#: LOINC codes for the elements that have a well-established one (code, display).
LOINC_CODES: dict[str, tuple[str, str]] = {
    "pT": ("21899-0", "Primary tumor.pathology Cancer"),
    "pN": ("21900-6", "Regional lymph nodes.pathology [Class] Cancer"),
    "pM": ("21901-4", "Distant metastases.pathology [Class] Cancer"),
    "stage_group": ("21902-2", "Stage group.pathology Cancer"),
    "grade": ("33732-9", "Histology grade [Identifier] in Cancer specimen"),
    "histologic_type_icdo3": ("59847-4", "Histology and Behavior ICD-O-3 Cancer"),
    "tumor_size_mm": ("33728-7", "Size.maximum dimension in Tumor"),
    "lymph_nodes_examined": ("21894-1", "Regional lymph nodes examined [#] Specimen"),
    "lymph_nodes_positive": ("21893-3", "Regional lymph nodes positive [#] Specimen"),
    "er_status": ("16112-5", "Estrogen receptor [Interpretation] in Tissue"),
    "pr_status": ("16113-3", "Progesterone receptor [Interpretation] in Tissue"),
    "her2_status": ("48676-1", "HER2 [Interpretation] in Tissue"),
}
#: A T, N or M category written with a clinical prefix (cM0, ycN1) has the clinical code.
CLINICAL_LOINC_CODES: dict[str, tuple[str, str]] = {
    "pT": ("21905-5", "Primary tumor.clinical [Class] Cancer"),
    "pN": ("21906-3", "Regional lymph nodes.clinical [Class] Cancer"),
    "pM": ("21907-1", "Distant metastases.clinical [Class] Cancer"),
}


def to_fhir(report: SynopticReport) -> dict[str, Any]:
    """The report as a FHIR R4 ``collection`` Bundle (JSON-ready dict), validated."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    try:
        observations = [
            (_full_url(report, name), Observation.model_validate(_observation(report, name, value)))
            for name, value in report.stated().items()
        ]
        diagnostic = DiagnosticReport.model_validate(
            _diagnostic_report(report, [url for url, _ in observations])
        )
        bundle = Bundle.model_validate(
            {
                "resourceType": "Bundle",
                "id": _uuid(report, "Bundle"),
                "type": "collection",
                **_issued(report, "timestamp"),
                "entry": [
                    {"fullUrl": _full_url(report, "DiagnosticReport"), "resource": diagnostic},
                    *({"fullUrl": url, "resource": resource} for url, resource in observations),
                ],
            }
        )
    except ValidationError as error:  # FHIR forbids what a schema allows, e.g. empty strings
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ReportInputError(
            f"report {report.id} cannot be written as FHIR: {where}: {problem['msg']}."
        ) from None
    return bundle.model_dump(mode="json", by_alias=True, exclude_none=True)


def _uuid(report: SynopticReport, part: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{report.id}/{part}"))


def _full_url(report: SynopticReport, part: str) -> str:
    return f"urn:uuid:{_uuid(report, part)}"


def _status(report: SynopticReport) -> str:
    return "final" if report.status == "reviewed" else "preliminary"


def _issued(report: SynopticReport, key: str) -> dict[str, str]:
    return {key: report.created.isoformat()} if report.created else {}


def _specimen(report: SynopticReport) -> dict[str, Any] | None:
    if report.slide_id is None:
        return None
    return {
        "type": "Specimen",
        "identifier": {"system": SLIDE_IDS, "value": report.slide_id},
        "display": f"Slide {report.slide_id}",
    }


def _diagnostic_report(report: SynopticReport, results: list[str]) -> dict[str, Any]:
    specimen = _specimen(report)
    conclusion = "\n\n".join(
        text for text in (report.narrative or report.diagnosis, report.notice) if text
    )
    # FHIR has no empty strings or lists: what is empty is left out.
    return {
        "resourceType": "DiagnosticReport",
        "id": _uuid(report, "DiagnosticReport"),
        "identifier": [{"system": REPORT_IDS, "value": report.id}],
        "status": _status(report),
        "category": [{"coding": [SURGICAL_PATHOLOGY]}],
        "code": {"coding": [SYNOPTIC_REPORT], **({"text": report.title} if report.title else {})},
        **({"specimen": [specimen]} if specimen else {}),
        **_issued(report, "issued"),
        **({"result": [{"reference": url} for url in results]} if results else {}),
        **({"conclusion": conclusion} if conclusion else {}),
    }


def _observation(report: SynopticReport, name: str, reported: Reported) -> dict[str, Any]:
    schema = type(report.elements)
    description = schema.model_fields[name].description or label(name)
    codings = [{"system": SYNOPTIC_CODES, "code": name, "display": description}]
    loinc = _loinc(name, reported.value)
    if loinc:
        codings.insert(0, {"system": LOINC, "code": loinc[0], "display": loinc[1]})
    specimen = _specimen(report)
    note = report.evidence(reported)
    evidence = _evidence_extension(reported)
    return {
        "resourceType": "Observation",
        "id": _uuid(report, name),
        "status": _status(report),
        "category": [{"coding": [LABORATORY]}],
        "code": {"coding": codings, "text": label(name)},
        **({"specimen": specimen} if specimen else {}),
        **_issued(report, "issued"),
        **_value(report, name, reported.value),
        **({"note": [{"text": note}]} if note else {}),
        **({"extension": [{"url": EVIDENCE_EXTENSION, "extension": evidence}]} if evidence else {}),
    }


def _loinc(name: str, value: Any) -> tuple[str, str] | None:
    clinical = isinstance(value, str) and value.removeprefix("y").startswith("c")
    if clinical and name in CLINICAL_LOINC_CODES:
        return CLINICAL_LOINC_CODES[name]
    return LOINC_CODES.get(name)


def _value(report: SynopticReport, name: str, value: Any) -> dict[str, Any]:
    schema = type(report.elements)
    if isinstance(value, int):
        return {"valueInteger": value}
    if isinstance(value, float):
        unit = unit_of(schema, name)
        units = {"unit": unit, "system": UCUM, "code": unit} if unit else {}
        return {"valueQuantity": {"value": value, **units}}
    if name == "histologic_type_icdo3":
        return {
            "valueCodeableConcept": {"coding": [{"system": ICD_O_3, "code": value}], "text": value}
        }
    if value_type(schema, name) is str:
        return {"valueString": value}
    return {"valueCodeableConcept": {"text": value}}  # an enumerated value or a TNM category


def _evidence_extension(reported: Reported) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"url": "region", "valueString": r} for r in reported.region_ids]
    if reported.span is not None:
        parts += [
            {"url": "spanStart", "valueInteger": reported.span[0]},
            {"url": "spanEnd", "valueInteger": reported.span[1]},
        ]
    if reported.basis:
        parts.append({"url": "basis", "valueString": reported.basis})
    return parts
