"""The guardrails over a drafted report, run before it is rendered for anyone.

Every part a person reads is checked: the findings, the assessment, the differential's names,
the narrative (which must cite examined regions sentence by sentence) and the synoptic
elements (an ER status on an H&E slide is left not stated, whoever filled it in). An image a
model generated is never evidence: its report is indeterminate. An indeterminate report states
no histologic type or grade. What was withheld, and why, joins the report's limitations.
"""

from __future__ import annotations

from histopilot.agents.guardrails.claims import Claim
from histopilot.agents.guardrails.policy import (
    Guard,
    GuardAction,
    generated_notice,
    question_refusals,
)
from histopilot.agents.state import ReportDraft
from histopilot.tools.report.schemas import Reported, SynopticBase

#: Synoptic elements that are claims of a kind some material cannot support.
ELEMENT_CLAIMS: dict[str, Claim] = {
    **{
        name: Claim(kind="immunostain", subject=subject)
        for subject, names in {
            "ER": ("er_status", "er_percent", "er_intensity"),
            "PR": ("pr_status", "pr_percent", "pr_intensity"),
            "HER2": ("her2_status", "her2_ihc_score", "her2_ihc_status"),
            "Ki-67": ("ki67_percent",),
            "MMR": ("mismatch_repair",),
        }.items()
        for name in names
    },
    "her2_ish_status": Claim(kind="molecular", subject="HER2 in situ hybridisation"),
    "tumor_size_mm": Claim(kind="measurement", subject="tumour size in mm"),
    "margin_distance_mm": Claim(kind="measurement", subject="margin distance in mm"),
    "breslow_thickness_mm": Claim(kind="measurement", subject="Breslow thickness in mm"),
    "mitotic_rate_per_mm2": Claim(kind="high_power", subject="mitotic rate"),
    "mitotic_score": Claim(kind="high_power", subject="mitotic score"),
    "nuclear_score": Claim(kind="high_power", subject="nuclear pleomorphism score"),
}
#: Elements that state a diagnosis, which an indeterminate report does not make.
DIAGNOSTIC_ELEMENTS = (
    "histologic_type",
    "histologic_type_icdo3",
    "histologic_variant",
    "grade",
    "grade_group",
    "gleason_primary",
    "gleason_secondary",
    "gleason_tertiary",
    "gleason_score",
    "predominant_pattern",
    "architectural_patterns",
)


def guard_report(
    draft: ReportDraft,
    guard: Guard,
    *,
    question: str | None,
    indeterminate: bool,
    narrative_by_model: bool,
) -> ReportDraft:
    """``draft`` with what its material and its examined regions cannot support withheld.

    A model's narrative must cite an examined region in every sentence; the measured
    narrative is made of the cited statements, so only what it claims is checked.
    """
    actions: list[GuardAction] = []
    material = guard.material
    diagnosis, findings, differential = draft.diagnosis, [], []
    narrative = draft.narrative
    if material.generated:
        diagnosis = f"Indeterminate — review: {generated_notice(material)}"
        withheld = [draft.diagnosis, *(s.text for s in draft.findings), draft.narrative]
        actions += [
            GuardAction(
                rule="generated",
                where="report",
                reason="the image is model-generated, so nothing read from it is a finding",
                text=text,
            )
            for text in withheld
            if text
        ]
        narrative, indeterminate = "", True
    else:
        ok, problems = guard.check(diagnosis, "assessment")
        if not ok:
            actions += problems
            diagnosis = (
                f"Indeterminate — review: the leading assessment was withheld "
                f"({problems[0].reason})."
            )
            indeterminate = True
        for statement in draft.findings:
            ok, problems = guard.check(statement.text, "finding")
            actions += problems
            if ok:
                findings.append(statement)
        for hypothesis in draft.differential:
            ok, problems = guard.check(hypothesis.name, "differential")
            actions += problems
            if ok:
                differential.append(hypothesis)
        narrative, problems = guard.screen(narrative, "narrative", cite=narrative_by_model)
        actions += problems
    notes = []
    for note in draft.limitations:  # a model's rationale is among them
        ok, problems = guard.check(note, "limitations")
        actions += problems
        if ok:
            notes.append(note)
    synoptic = draft.synoptic
    if synoptic is not None:
        elements, problems = _guard_elements(synoptic.elements, guard, indeterminate)
        actions += problems
    refusals = question_refusals(question, material)
    withheld = sorted({f"Withheld: {action.reason}." for action in actions})
    limitations = [f"Material: {material.description}.", *refusals, *notes, *withheld]
    if synoptic is not None:
        synoptic = synoptic.model_copy(
            update={
                "elements": elements,
                "diagnosis": diagnosis,
                "narrative": narrative,
                "limitations": limitations,
            }
        )
    certainty = draft.certainty and draft.certainty.model_copy(
        update={"indeterminate": draft.certainty.indeterminate or indeterminate}
    )
    return draft.model_copy(
        update={
            "diagnosis": diagnosis,
            "findings": findings,
            "differential": differential,
            "narrative": narrative,
            "limitations": limitations,
            "synoptic": synoptic,
            "certainty": certainty,
            "material": material,
            "guardrails": actions,
        }
    )


def _guard_elements(
    elements: SynopticBase, guard: Guard, indeterminate: bool
) -> tuple[SynopticBase, list[GuardAction]]:
    """The elements with every value the material cannot support left not stated."""
    actions = []
    cleared: dict[str, dict] = {}
    for name in type(elements).model_fields:
        reported = getattr(elements, name)
        if not isinstance(reported, Reported) or not reported.stated:
            continue
        where = f"synoptic {name}"
        if guard.material.generated or (indeterminate and name in DIAGNOSTIC_ELEMENTS):
            reason = (
                "a generated image supports no element"
                if guard.material.generated
                else "an indeterminate assessment states no diagnosis"
            )
            rule = "generated" if guard.material.generated else "indeterminate"
            actions.append(
                GuardAction(rule=rule, where=where, reason=reason, text=str(reported.value))
            )
            cleared[name] = Reported().model_dump()
            continue
        claim = ELEMENT_CLAIMS.get(name)
        if claim is None and name == "grade" and elements.schema_name == "breast_invasive":
            claim = Claim(kind="high_power", subject="Nottingham grade")
        reason = guard.refusal(claim) if claim is not None else None
        if reason:
            actions.append(
                GuardAction(rule=claim.kind, where=where, reason=reason, text=str(reported.value))
            )
            cleared[name] = Reported().model_dump()
            continue
        # A value in words ("carcinoma, ER+") is a statement like any other.
        ok, problems = guard.check(str(reported.value), where)
        if not ok:
            actions += problems
            cleared[name] = Reported().model_dump()
    if not cleared:
        return elements, []
    return type(elements).model_validate(elements.model_dump() | cleared), actions
