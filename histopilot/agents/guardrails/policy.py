"""The rules: which claims the material supports, and which statements are grounded.

:class:`Guard` holds what one output may rest on (the slide's :class:`Material` and the regions
that were examined) and checks text sentence by sentence. A sentence that claims what the
material cannot show, or cites a region nobody examined, is withheld; in a report, a sentence
that cites no examined region at all is withheld too (a report's findings must point at the
slide). Every decision is a :class:`GuardAction`, kept for the report's limitations and the
audit record, so nothing is removed silently.

Streams go through :class:`SentenceGate`, which releases each sentence once it is complete and
checked: what a person sees while the answer streams is what the final answer says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from histopilot.agents.guardrails.claims import (
    LIMITATION,
    Claim,
    claims_in,
    markers_named,
    molecular_subject,
    sentences,
)
from histopilot.agents.guardrails.material import HIGH_POWER_MPP, Material

Rule = Literal[
    "immunostain",
    "molecular",
    "measurement",
    "high_power",
    "generated",
    "unknown_region",
    "ungrounded",
    "indeterminate",
]
#: Region ids as the agents write them: T<trajectory>.<step> from an analysis, C<n> from chat.
REGION_ID = re.compile(r"(?<![\w.])(?:T\d+\.\d+|C\d+)(?![\w]|\.\d)")
KNOWLEDGE_ID = re.compile(r"\bkb:[\w.:-]+")
_SIZE_QUESTION = re.compile(r"\b(?:how (?:big|large|wide|long)|size|measure\w*|dimension)", re.I)
_HIGH_POWER_QUESTION = re.compile(r"\b(?:mitos[ie]s|mitotic\w*|nuclear grade|pleomorphism)", re.I)


class GuardAction(BaseModel):
    """One statement the guardrails withheld, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: Rule
    where: str
    reason: str
    text: str = ""


@dataclass
class Guard:
    """What one output may rest on."""

    material: Material
    regions: Collection[str] = ()
    high_power_seen: bool = True
    known: Callable[[], Collection[str]] | None = None
    """Re-reads the examined regions (a chat turn's tools add some while it streams)."""

    def refusal(self, claim: Claim) -> str | None:
        """Why the material cannot support ``claim``; ``None`` when it can."""
        m, subject = self.material, claim.subject
        if claim.kind == "immunostain":
            if m.generated:
                return (
                    f"{subject} cannot be assessed on this material: the image was made by a "
                    "model, and a generated (virtual) stain is never evidence of a stain"
                )
            if m.stain == "H&E":
                return (
                    f"{subject} status cannot be assessed on this material: the slide is H&E; "
                    f"it needs {subject} immunohistochemistry"
                )
            if subject not in m.markers:
                declared = ", ".join(m.markers) or "not declared (give it with --stain, e.g. ER)"
                return (
                    f"{subject} status cannot be assessed on this material: the slide's "
                    f"immunostain is {declared}"
                )
            return None
        if claim.kind == "molecular":
            return (
                f"molecular status ({subject}) cannot be assessed on a slide image: it needs a "
                "molecular test"
            )
        if claim.kind == "measurement":
            if m.mpp is None:
                return (
                    f"a measurement in physical units ({subject}) cannot be given: the slide "
                    "declares no µm per pixel (supply it with --slide-mpp)"
                )
            return None
        if not m.resolves_high_power:
            scan = "of unknown resolution" if m.mpp is None else f"at {m.mpp:g} µm/px"
            return (
                f"{subject} cannot be assessed on this material: the scan is {scan}, and "
                f"counting needs {HIGH_POWER_MPP:g} µm/px (20×) or finer"
            )
        if not self.high_power_seen:
            return f"{subject} cannot be assessed from this read: no high-power field was examined"
        return None

    def check(
        self, sentence: str, where: str, *, cite: bool = False
    ) -> tuple[bool, list[GuardAction]]:
        """Whether ``sentence`` may stand, and the actions taken if it may not.

        ``cite`` demands that it cite an examined region (or a knowledge passage), unless it
        states a limitation.
        """
        text = sentence.strip()
        if not text:
            return True, []
        actions = [
            GuardAction(rule=claim.kind, where=where, reason=reason, text=text)
            for claim in claims_in(text)
            if (reason := self.refusal(claim))
        ]
        cited = REGION_ID.findall(text)
        unknown = [r for r in cited if r not in self._examined(r)]
        if unknown:
            actions.append(
                GuardAction(
                    rule="unknown_region",
                    where=where,
                    reason=f"cites region(s) {', '.join(unknown)}, which were not examined",
                    text=text,
                )
            )
        elif (
            cite
            and not cited
            and not KNOWLEDGE_ID.search(text)
            and not LIMITATION.search(text)
            and not text.lower().startswith("indeterminate")
            and re.search(r"[A-Za-z]{3}", text)
        ):
            actions.append(
                GuardAction(
                    rule="ungrounded",
                    where=where,
                    reason="a statement that cites no examined region",
                    text=text,
                )
            )
        return not actions, actions

    def screen(
        self, text: str, where: str, *, cite: bool = False, marker: bool = False
    ) -> tuple[str, list[GuardAction]]:
        """``text`` without the sentences that may not stand (with ``marker``, each is replaced
        by a bracketed note saying why, for a reader who should know something was withheld)."""
        kept: list[str] = []
        actions: list[GuardAction] = []
        for sentence in sentences(text):
            ok, problems = self.check(sentence, where, cite=cite)
            actions += problems
            if ok:
                kept.append(sentence)
                continue
            tail = sentence[len(sentence.rstrip()) :]
            if marker:
                kept.append(f"[Withheld: {problems[0].reason}.]{tail}")
            elif "\n" in tail:
                kept.append("\n")
        return "".join(kept).strip() if not marker else "".join(kept), actions

    def _examined(self, region: str) -> Collection[str]:
        if region in self.regions or self.known is None:
            return self.regions
        self.regions = set(self.known())
        return self.regions


def question_refusals(question: str | None, material: Material) -> list[str]:
    """What ``question`` asks for that this material cannot show, as sentences to answer with:
    a person asking for ER status on H&E should hear why not before anything else."""
    if not question:
        return []
    guard = Guard(material=material)
    asked = [Claim(kind="immunostain", subject=marker) for marker in markers_named(question)]
    if subject := molecular_subject(question):
        asked.append(Claim(kind="molecular", subject=subject))
    if _SIZE_QUESTION.search(question):
        asked.append(Claim(kind="measurement", subject="size"))
    if match := _HIGH_POWER_QUESTION.search(question):
        asked.append(Claim(kind="high_power", subject=match.group(0)))
    reasons = [guard.refusal(claim) for claim in dict.fromkeys(asked)]
    return [_sentence(reason) for reason in dict.fromkeys(r for r in reasons if r)]


def generated_notice(material: Material) -> str:
    """What is said first about an image a model made: it is not evidence of anything."""
    return (
        f"This image was made by a model ({material.generated}): it is not evidence, and "
        "nothing read from it is a finding."
    )


def _sentence(reason: str) -> str:
    return reason[0].upper() + reason[1:] + "."


@dataclass
class SentenceGate:
    """Releases streamed text a checked sentence at a time."""

    guard: Guard
    where: str
    actions: list[GuardAction] = field(default_factory=list)
    _pending: str = ""

    def feed(self, text: str) -> str:
        """Text that may be shown now: the complete sentences received so far, checked."""
        self._pending += text
        pieces = sentences(self._pending)
        if len(pieces) < 2:
            return ""
        self._pending = pieces[-1]
        return self._release("".join(pieces[:-1]))

    def flush(self) -> str:
        """The rest, at the end of the stream."""
        rest, self._pending = self._pending, ""
        return self._release(rest)

    def _release(self, text: str) -> str:
        shown, actions = self.guard.screen(text, self.where, marker=True)
        self.actions += actions
        return shown
