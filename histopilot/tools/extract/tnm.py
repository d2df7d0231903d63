"""TNM categories as reports write them, OCR noise included.

A T category is taken only where the text marks it as one: a prefix (``pT2``, ``ypT1c``,
``pT 1c``), a T N M run (``T1N0``, ``T2 N0 MX``), or a staging label (``Primary tumor (pT):``).
A bare "T4" elsewhere (a vertebra, a sentence quoting instructions) is not staging.

When a report names several categories, the one it repeats wins, and among equals the highest:
AJCC stages multiple primaries by the most advanced, and revised stages are usually the repeated
ones (the synoptic summary restates the final answer).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from histopilot.tools.extract.text import DIGIT, Mention, ocr_digit
from histopilot.tools.report.schemas import category_group

_PREFIX = r"(?P<prefix>y\s?p|r\s?p|p|P|c|yc)"
_T_CORE = (
    rf"(?P<T>T)\s?(?P<t>is\b|Is\b|IS\b|[Xx](?![a-z])|{DIGIT})"
    rf"(?P<tsub>mi|[a-dA-D](?:{DIGIT}(?![0-9]))?)?(?P<tm>\s?\(\s?m\s?\))?"
)
_N_CORE = rf"(?P<N>N)\s?(?P<n>[Xx](?![a-z])|{DIGIT})(?P<nsub>mi|[a-cA-C])?"
_M_CORE = rf"(?P<M>M)\s?(?P<m>[Xx](?![a-z])|{DIGIT})(?P<msub>[a-dA-D])?"

#: ``pT2a``, ``ypT1c``, ``pT 1c``; with or without N and M after it.
PREFIXED = re.compile(
    rf"(?<![A-Za-z0-9]){_PREFIX}\s?(?:{_T_CORE}|{_N_CORE}(?![A-Za-z]{{2}})|{_M_CORE}(?![A-Za-z]{{2}}))"
)
"""One prefixed category of any letter (``pT2a``, ``ypN1``, ``cM0``): one pass finds all three."""
#: ``T2N0M0``, ``T1 N0 MX``, ``pT2 NO``: a T followed by an N is staging whatever the prefix.
T_N_RUN = re.compile(
    rf"(?<![A-Za-z0-9])(?:{_PREFIX}\s?)?{_T_CORE}\s?,?\s?(?:p\s?)?{_N_CORE}(?:\s?,?\s?(?:p\s?)?{_M_CORE})?",
)
#: ``Primary tumor (pT): T2``, ``T stage: 3``, ``T category: T1b``.
LABELLED_T = re.compile(
    r"(?:(?i:primary\s+tumou?r)(?:\s*\([pP]?T\))?|\b[pP]?T\s*(?i:stage|category|classification)"
    r"(?:,\s*(?i:pathologic))?)"
    rf"\s*[:\-]?\s*(?:{_PREFIX}\s?)?(?P<T>T)?\s?(?P<t>(?i:is)\b|[Xx](?![a-z])|[0-4])"
    r"(?P<tsub>[a-dA-D](?:[1-3])?)?(?![0-9A-Za-z]|\s?[.,]\d|\s?(?i:cm|mm))",
)
LABELLED_N = re.compile(
    r"(?:(?i:regional\s+lymph\s+nodes?)(?:\s*\([pP]?N\))?|\b[pP]?N\s*(?i:stage|category)"
    r"(?:,\s*(?i:pathologic))?)"
    rf"\s*[:\-]?\s*(?:{_PREFIX}\s?)?(?P<N>N)\s?(?P<n>[Xx](?![a-z])|{DIGIT})(?P<nsub>[a-cA-C])?(?![A-Za-z])",
)
"""Staging given under a label, in any letter case: ``Primary tumor (pT): T2``, ``T STAGE: 3``."""

#: Wording that marks a mention as a definition or a template heading, not this patient's stage.
_NOT_THIS_CASE = re.compile(r"\b(?:and|or)\s*p?[TN]\d|tumou?rs\)|^\s*\)", re.IGNORECASE)
#: A stage stated for a case that is not this one: "if it were …, the stage would be T3".
_HYPOTHETICAL = re.compile(r"would\s+be|\bif\s+(?:this|the|it)\b|could\s+be", re.IGNORECASE)


def _category(letter: str, digit: str, sub: str | None, prefix: str | None) -> str:
    digit = "is" if digit.lower() == "is" else ocr_digit(digit).upper()
    sub = (sub or "").lower().replace("l", "1").replace("i", "1").replace("o", "0")
    if sub and sub != "mi" and not re.fullmatch(r"[a-d][1-3]?", sub):
        sub = ""
    if letter == "M" and digit == "0":
        sub = ""  # "pM0" is not a pathologic category; AJCC writes cM0
    head = re.sub(r"\s", "", prefix or "").lower()
    return f"{head}{letter}{digit}{sub}"


def _mentions(
    text: str, letter: str, other_sites: re.Pattern | None, scanned: dict[re.Pattern, list]
) -> list[Mention]:
    key, sub = letter.lower(), f"{letter.lower()}sub"
    found: dict[int, Mention] = {}
    patterns: list[tuple[re.Pattern, float]] = [(T_N_RUN, 2.0), (PREFIXED, 1.0)]
    if letter == "T":
        patterns.append((LABELLED_T, 1.5))
    elif letter == "N":
        patterns.append((LABELLED_N, 1.5))
    for pattern, weight in patterns:
        matches = scanned[pattern] if pattern in scanned else pattern.finditer(text)
        for match in matches:
            if match.groupdict().get(key) is None:
                continue
            start, end = match.span(key)
            prefix = match.groupdict().get("prefix")
            if prefix and (letter == "T" or pattern is PREFIXED):
                start = match.start("prefix")
            elif match.groupdict().get(letter):
                start = match.start(letter)
                if start and text[start - 1] in "pc":  # "pN0" inside a run: keep its prefix
                    start -= 1
            value = _category(letter, match.group(key), match.groupdict().get(sub), prefix)
            if letter == "T" and match.groupdict().get("tm"):
                value += "(m)"
            tail = text[match.end() : match.end() + 20]
            head = text[max(0, start - 80) : start]
            weight_here = weight
            if _NOT_THIS_CASE.search(tail) or _HYPOTHETICAL.search(head[-40:]):
                weight_here *= 0.25
            if other_sites is not None and other_sites.search(head):
                weight_here *= 0.2  # e.g. an incidental prostate cancer in a cystectomy
            end = match.end(sub) if match.groupdict().get(sub) else end
            if start not in found or found[start].weight < weight_here:
                found[start] = Mention(start, end, value, weight_here)
    return sorted(found.values())


def tnm_mentions(text: str, other_sites: re.Pattern | None = None) -> dict[str, list[Mention]]:
    """T, N and M categories in ``text`` (keyed by letter); those just after words naming
    ``other_sites`` (organs other than the report's own) weigh less."""
    scanned = {pattern: list(pattern.finditer(text)) for pattern in (T_N_RUN, PREFIXED)}
    return {letter: _mentions(text, letter, other_sites, scanned) for letter in "TNM"}


def _rank(category: str) -> tuple[int, str]:
    """Order of advance: X < is < 0 < 1 < … with subcategories after their parent."""
    core = re.sub(r"^[a-z]*[TNM]", "", category)
    head = {"X": -2, "is": -1}.get(core[:2] if core.startswith("is") else core[:1])
    return (head if head is not None else int(core[0]), core)


def choose(mentions: Iterable[Mention]) -> Mention | None:
    """The category the report means: most weight (repetitions add up), then the most advanced;
    a known category beats X whenever one is written."""
    mentions = list(mentions)
    if not mentions:
        return None
    known = [m for m in mentions if "X" not in str(m.value)] or mentions
    weights: Counter[str] = Counter()
    for mention in known:
        weights[str(mention.value)] += mention.weight
    coarse: Counter[str] = Counter()
    for value, weight in weights.items():
        coarse[category_group(value)] += weight
    best_group = max(coarse, key=lambda g: (coarse[g], _rank(g)))
    in_group = [m for m in known if category_group(str(m.value)) == best_group]
    return max(in_group, key=lambda m: (weights[str(m.value)], len(str(m.value)), m.start))
