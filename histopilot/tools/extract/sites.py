"""Which organ a report is about, and so which schema and which AJCC rules apply.

Cues are weighted by how specific they are (a procedure names its organ; "cervical" may be a
neck node) and counted over the whole text; the final diagnosis is not told apart, because OCR
loses the section headings in many reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: organ → (schema, cue patterns with weights).
ORGANS: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "breast": (
        "breast_invasive",
        (
            (r"breast", 2),
            (r"mastectomy|lumpectomy", 4),
            (r"axilla", 1),
            (r"nottingham|ductal carcinoma|lobular carcinoma", 3),
        ),
    ),
    "colorectal": (
        "colorectal",
        (
            (r"colon|colectomy|cecum|caecum|sigmoid", 3),
            (
                r"rect(?:um|al)\b|"
                r"low anterior resection|abdominoperineal",
                3,
            ),
            (r"colorectal", 3),
        ),
    ),
    "prostate": (
        "prostate_resection",
        ((r"(?<!cysto)prostat", 3), (r"gleason", 3), (r"seminal vesicle", 1)),
    ),
    "lung": (
        "lung",
        ((r"\blung|pulmonary|lobectomy|pneumonectomy", 3), (r"bronch", 1), (r"pleura", 1)),
    ),
    "kidney": (
        "kidney",
        ((r"kidney|renal cell|nephrectomy", 4), (r"\brenal", 1), (r"fuhrman|perinephric", 2)),
    ),
    "thyroid": ("thyroid", ((r"thyroid", 4), (r"papillary carcinoma", 1))),
    "melanoma": ("melanoma", ((r"melanoma", 3), (r"breslow|clark", 4))),
    "stomach": ("generic", ((r"stomach|gastric|gastrectomy", 3),)),
    "esophagus": ("generic", ((r"o?esophag", 4),)),
    "liver": ("generic", ((r"hepatocellular|hepatectomy|\bliver", 3), (r"cirrho", 1))),
    "bile_duct": ("generic", ((r"cholangiocarcinoma|bile duct", 4),)),
    "pancreas": ("generic", ((r"pancrea|whipple", 4),)),
    "bladder": (
        "generic",
        (
            (r"\bbladder", 3),
            (r"cystectomy|cystoprostatectomy", 6),
            (r"urothelial|transitional cell carcinoma", 8),
        ),
    ),
    "head_neck": (
        "generic",
        (
            (
                r"tongue|larynx|laryngectomy|pharyn|tonsil|oral cavity|floor of mouth|"
                r"mandible|glottic|buccal",
                3,
            ),
            (r"neck dissection", 2),
        ),
    ),
    "cervix": (
        "generic",
        ((r"cervix|uterine cervix|radical hysterectomy", 4), (r"hysterectomy", 1)),
    ),
    "adrenal": ("generic", ((r"adrenal", 4), (r"adrenal cortical|adrenocortical", 8))),
    "testis": ("generic", ((r"testis|testicular|orchiectomy|seminoma", 4),)),
    "eye": ("generic", ((r"enucleation|choroid|uveal|ciliary body|globe", 4),)),
    "pleura": ("generic", ((r"mesothelioma", 8),)),
}


_PLAIN_WORDS = re.compile(r"[\w ]+(?:\|[\w ]+)*")


def _counter(pattern: str) -> Callable[[str], int]:
    """How to count a cue. Plain words, or alternatives of plain words none of which holds
    another, are counted with ``str.count``, several times faster than a regex; the rest by
    their regex (cues that other words contain, "bladder" in "gallbladder", carry ``\\b``)."""
    words = pattern.split("|")
    if _PLAIN_WORDS.fullmatch(pattern) and not any(a != b and a in b for a in words for b in words):
        return lambda lowered: sum(lowered.count(word) for word in words)
    compiled = re.compile(pattern)
    return lambda lowered: len(compiled.findall(lowered))


_CUES = {
    organ: [(_counter(pattern), weight) for pattern, weight in cues]
    for organ, (_, cues) in ORGANS.items()
}


def detect_organ(text: str) -> str | None:
    """The organ whose cues weigh most, or ``None`` when nothing names one."""
    lowered = text.lower()
    scores = {
        organ: sum(weight * count(lowered) for count, weight in cues)
        for organ, cues in _CUES.items()
    }
    organ = max(scores, key=scores.get)
    if scores[organ] == 0:
        return None
    if organ == "melanoma" and re.search(r"choroid|uveal|ciliary body|enucleation", lowered):
        return "eye"
    return organ


def schema_for(organ: str | None, text: str) -> str:
    """The schema name for an organ; breast without invasion is DCIS, a prostate biopsy is not
    a resection."""
    if organ is None:
        return "generic"
    schema = ORGANS[organ][0]
    lowered = text.lower()
    if (
        schema == "breast_invasive"
        and "in situ" in lowered
        and not re.search(r"invasive|infiltrating|microinvasi", lowered)
    ):
        return "breast_dcis"
    if schema == "prostate_resection" and not re.search(r"prostatectomy|seminal vesicle", lowered):
        return "prostate_biopsy"
    return schema


def other_sites(organ: str | None) -> re.Pattern | None:
    """Words naming a cancer of another organ than ``organ`` ("prostatic adenocarcinoma" in
    a cystectomy report): staging right after them is about that other tumour."""
    if organ is None:
        return None
    names = [name for other, name in _TUMOUR_NAMES.items() if other != organ]
    return re.compile(rf"\b(?:{'|'.join(names)})\b[^.]{{0,40}}$", re.IGNORECASE)


#: How reports name a primary cancer of each organ, for telling a second primary apart.
_TUMOUR_NAMES = {
    "prostate": r"prostat\w*\s+(?:adeno)?carcinoma|prostat\w*\s+cancer",
    "bladder": r"urothelial\s+carcinoma",
    "kidney": r"renal\s+cell\s+carcinoma",
    "thyroid": r"(?:papillary|follicular)\s+(?:thyroid\s+)?carcinoma",
    "colorectal": r"(?:colonic|colon|rectal)\s+adenocarcinoma",
    "melanoma": r"melanoma",
}
