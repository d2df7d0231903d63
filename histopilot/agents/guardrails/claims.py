"""What a sentence claims that needs a particular kind of evidence.

Four kinds of statement cannot be read off every slide: an immunostain result (it needs that
immunostain), a molecular status (it needs a molecular test), a measurement in physical units
(it needs the slide's µm per pixel) and a grade element counted at high power (mitoses, nuclear
pleomorphism: they need a scan at 20× or finer and a high-power look). :func:`claims_in` finds
them by vocabulary, sentence by sentence. A sentence that says a thing *cannot* be assessed, or
recommends the test that would assess it, states a limitation, not a result, and claims nothing.

The vocabulary errs towards finding a claim: a false alarm removes a sentence a pathologist can
still see in the audit record, a miss lets a statement through that the material cannot support.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

ClaimKind = Literal["immunostain", "molecular", "measurement", "high_power"]

#: Markers written in capitals are matched case-sensitively ("ER", not "er" in "other").
_CASED_MARKERS = (
    r"ER|PR|PgR|AR|HER-?2(?:/neu)?|ERBB2|CK\s?\d+(?:/\d+)?|CDX-?2|TTF-?1|GATA-?3|PAX-?8|WT-?1|"
    r"SOX-?10|S-?100|HMB-?45|CD\s?\d+[a-z]?|PD-?L1|MLH-?1|MSH-?2|MSH-?6|PMS-?2|AMACR|ERG|PSA|"
    r"NKX3\.1|SMA|DOG-?1|ALK-?1|p\d{2}|MIB-?1|Ki-?67|MMR"
)
_NAMED_MARKERS = (
    r"o?estrogen receptors?|progesterone receptors?|androgen receptors?|hormone receptors?|"
    r"ki-?67|synaptophysin|chromogranin|desmin|e-cadherin|melan-?a|"
    r"mismatch repair(?: proteins?)?|calretinin|cytokeratins?|vimentin|myogenin"
)
MARKER = re.compile(rf"(?<![\w-])(?:{_CASED_MARKERS})(?![\w])|(?i:\b(?:{_NAMED_MARKERS})\b)")
#: A result written onto the marker: "ER+", "HER2 3+", "CK20-", "PR (+)".
_SUFFIX_RESULT = re.compile(r"\s?(?:[0-3]?\+{1,3}|-(?![\w])|\((?:[0-3]\+|[+-])\))")
#: Receptor results named as a class: they state ER, PR and HER2 at once.
_RECEPTOR_CLASS = re.compile(r"(?i:\b(?:triple[- ]negative|luminal[- ]?(?:a|b)\b))")
#: Words that turn a marker's mention into a result.
_STAIN_RESULT = re.compile(
    r"(?<![\w])(?:[0-3]\s?\+|\+|-)(?!\w)|\b\d+(?:\.\d+)?\s?%|"
    r"(?i:\b(?:positiv\w*|negativ\w*|pos|neg|express\w*|stain\w*|immunoreactiv\w*|reactiv\w*|"
    r"retain\w*|intact|loss|lost|deficient|proficient|allred|h-?score|score[sd]?|status|"
    r"overexpress\w*|equivocal|low|high|found|detected|identified|present|absent)\b)"
)
MOLECULAR = re.compile(
    r"(?<![\w-])(?:KRAS|NRAS|BRAF|EGFR|ALK|ROS-?1|RET|MET|NTRK\d?|IDH-?[12]?|BRCA-?[12]?|"
    r"PIK3CA|KIT|PDGFRA|MGMT|TP53|POLE|MSI(?:-[HL])?|MSS|TMB|HRD|1p/19q|FISH|ISH|NGS|PCR)"
    r"(?![\w])|(?i:\b(?:microsatellite (?:instab\w*|stab\w*)|tumou?r mutational burden|"
    r"mutat\w*|wild[- ]type|amplif\w*|gene fusion|fusion gene|gene rearrange\w*|"
    r"methylat\w*|in situ hybridi[sz]ation|copy number)\b)"
)
MEASUREMENT = re.compile(
    r"\b\d+(?:[.,]\d+)?\s?(?:mm|cm|µm|μm|um|microns?|millimet(?:er|re)s?|centimet(?:er|re)s?)"
    r"(?:²|2|\^2)?(?![\w]|/px)|(?:per|/)\s?(?:mm|µm|μm)(?:²|2|\^2)|"
    r"(?i:\d+(?:[.,]\d+)?\s?(?:per|/)\s?(?:10\s?)?(?:HPFs?|high[- ]power fields?))"
)
HIGH_POWER = re.compile(
    r"(?i:\b(?:mitos[ie]s|mitotic\w*|mitotic figures?|nuclear (?:pleomorphism )?(?:grade|score)|"
    r"pleomorphism score|nottingham|elston|bloom[- ]richardson)\b)"
)
#: A sentence stating that something cannot be judged, or naming the test that would judge it
#: (recommended, pending, to follow): it reports no result.
LIMITATION = re.compile(
    r"(?i:\b(?:cannot|can ?not|can't|could not|unable to|not (?:be )?(?:assess|determin|evaluat|"
    r"judg|measur|count|possible|available)\w*|not assessable|would (?:need|require)|"
    r"recommend\w*|suggest(?:ed|s)? (?:an? )?(?:immuno|IHC|molecular|test)|"
    r"consider\w* (?:an? )?(?:immuno|IHC|molecular|ancillary)|pending|to follow|"
    r"will be (?:performed|reported|done|sent)|not (?:been )?(?:requested|performed|done)|"
    r"reported separately)\b)"
)


class Claim(BaseModel):
    """One thing a sentence asserts that needs evidence of a given kind."""

    model_config = ConfigDict(frozen=True)

    kind: ClaimKind
    subject: str


def claims_in(sentence: str) -> list[Claim]:
    """The claims ``sentence`` makes, in the order of :data:`ClaimKind`, without duplicates.

    A marker counts with a result word anywhere in the sentence, or a result written onto it
    ("ER+"). What a clause states as a limitation ("ER cannot be assessed", "KRAS testing is
    recommended") is exempt, and only that: "ER is positive; recommend correlation" still
    claims ER.
    """
    exempt = _limited(sentence)
    if exempt is None:
        return []
    result = _STAIN_RESULT.search(sentence) is not None
    found: list[Claim] = []
    for match in MARKER.finditer(sentence):
        if result or _SUFFIX_RESULT.match(sentence, match.end()):
            found.append(Claim(kind="immunostain", subject=canonical_marker(match.group(0))))
    if _RECEPTOR_CLASS.search(sentence):
        found += [Claim(kind="immunostain", subject=marker) for marker in ("ER", "PR", "HER2")]
    if subject := molecular_subject(sentence):
        found.append(Claim(kind="molecular", subject=subject))
    found += [Claim(kind="measurement", subject=m.group(0)) for m in MEASUREMENT.finditer(sentence)]
    found += [Claim(kind="high_power", subject=m.group(0)) for m in HIGH_POWER.finditer(sentence)]
    return [claim for claim in dict.fromkeys(found) if claim.subject not in exempt]


def molecular_subject(text: str) -> str | None:
    """What a molecular claim in ``text`` is about: its gene when it names one (one claim per
    sentence: "KRAS mutated" is one statement, not two)."""
    words = [m.group(0) for m in MOLECULAR.finditer(text)]
    genes = [word for word in words if word.isupper()]
    return (genes or words or [None])[0]


_CLAUSE = re.compile(r"[;:]|,(?!\s*(?:and|or)\b)|\b(?:but|whereas|while)\b")
_LIST_ONLY = re.compile(rf"^\s*(?:(?:{MARKER.pattern})\s*(?:/|and|or)?\s*)+$")


def _limited(sentence: str) -> set[str] | None:
    """The subjects that a limitation clause of ``sentence`` speaks of (they are exempt), or
    ``None`` when every clause is a limitation. A clause that only lists markers ("ER, PR and
    HER2 cannot be assessed") belongs to the clause after it."""
    clauses: list[str] = []
    pending = ""
    for clause in _CLAUSE.split(sentence):
        if _LIST_ONLY.match(clause):
            pending += f"{clause} "
            continue
        clauses.append(pending + clause)
        pending = ""
    if pending:
        clauses.append(pending)
    limited = [clause for clause in clauses if LIMITATION.search(clause)]
    if len(limited) == len(clauses):
        return None
    exempt: set[str] = set()
    for clause in limited:
        exempt |= {canonical_marker(m.group(0)) for m in MARKER.finditer(clause)}
        exempt |= {m.group(0) for m in MEASUREMENT.finditer(clause)}
        exempt |= {m.group(0) for m in HIGH_POWER.finditer(clause)}
        if subject := molecular_subject(clause):
            exempt.add(subject)
    return exempt


def markers_named(text: str) -> list[str]:
    """The immunostain markers ``text`` names, canonical and deduplicated (for questions,
    which ask for a result rather than state one)."""
    return list(dict.fromkeys(canonical_marker(m.group(0)) for m in MARKER.finditer(text)))


#: Spellings of one marker, keyed by the lower-case name without spaces, hyphens or plural.
_SYNONYMS = {
    "estrogenreceptor": "ER",
    "oestrogenreceptor": "ER",
    "progesteronereceptor": "PR",
    "pgr": "PR",
    "androgenreceptor": "AR",
    "her2": "HER2",
    "her2/neu": "HER2",
    "erbb2": "HER2",
    "ki67": "Ki-67",
    "mib1": "Ki-67",
    "mismatchrepair": "MMR",
    "mismatchrepairprotein": "MMR",
}


def canonical_marker(name: str) -> str:
    """One spelling per marker: 'oestrogen receptor', 'Estrogen receptors' and 'ER' are 'ER'."""
    words = name.split()
    key = "".join(words).lower().replace("-", "")
    if len(words) > 1:
        key = key.removesuffix("s")
    return _SYNONYMS.get(key, " ".join(words))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9*_-])|\n+")


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences and lines, each keeping its own trailing whitespace, so
    joining them gives ``text`` back. Decimals ("p 0.62") and region ids ("T1.03") do not end
    a sentence: a stop ends one only when whitespace follows."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces
