"""Clinical-safety guardrails: what the agents may claim, on what evidence.

One layer that every path producing text for a person passes through (the analysis's report
node, the chat's answers, the API and the CLI, which only show what those produce):

* **Modality** (:mod:`.material`, :mod:`.claims`): a claim needs evidence of its kind. No
  immunostain result from H&E, no molecular status from any image, no size in mm without the
  slide's µm per pixel, no mitotic count from a coarse scan or a read with no high-power field,
  and a model-generated (virtual) image is never evidence.
* **Grounding** (:mod:`.policy`): a report's statements cite examined regions; one citing a
  region nobody examined, or (in a report) none at all, is withheld. Knowledge-base passages,
  findings and report text reach models as data in fenced blocks, never as instructions, and
  whatever a model then writes still passes these checks.
* **Uncertainty and notice**: the report gives the differential's probabilities, how far the
  trajectories agreed and how much tissue was examined, says "indeterminate — review" below the
  configured confidence, and every output carries :data:`DRAFT_NOTICE` in its text.

Every withheld statement is a :class:`GuardAction`, kept in the report and the audit record.
"""

from histopilot.agents.guardrails.claims import Claim, claims_in
from histopilot.agents.guardrails.material import Material, material_of, parse_stain
from histopilot.agents.guardrails.policy import (
    Guard,
    GuardAction,
    SentenceGate,
    generated_notice,
    question_refusals,
)
from histopilot.tools.report.document import DRAFT_NOTICE

__all__ = [
    "DRAFT_NOTICE",
    "Claim",
    "Guard",
    "GuardAction",
    "Material",
    "SentenceGate",
    "claims_in",
    "generated_notice",
    "material_of",
    "parse_stain",
    "question_refusals",
]
