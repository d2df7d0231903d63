"""Which organ a report is about, and so which schema and which AJCC rules apply.

Cues are weighted by how specific they are (a procedure names its organ; "cervical" may be a
neck node) and counted over the whole text; the final diagnosis is not told apart, because OCR
loses the section headings in many reports.
"""

from __future__ import annotations

import re

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
    "prostate": ("prostate_resection", ((r"prostat", 3), (r"gleason", 3), (r"seminal vesicle", 1))),
    "lung": (
        "lung",
        ((r"\blung|pulmonary|lobectomy|pneumonectomy", 3), (r"bronch", 1), (r"pleura", 1)),
    ),
    "kidney": (
        "kidney",
        ((r"kidney|renal cell|nephrectomy", 4), (r"renal", 1), (r"fuhrman|perinephric", 2)),
    ),
    "thyroid": ("thyroid", ((r"thyroid", 4), (r"papillary carcinoma", 1))),
    "melanoma": ("melanoma", ((r"melanoma", 3), (r"breslow|clark", 4))),
    "stomach": ("generic", ((r"stomach|gastric|gastrectomy", 3),)),
    "esophagus": ("generic", ((r"o?esophag", 4),)),
    "liver": ("generic", ((r"hepatocellular|hepatectomy|liver", 3), (r"cirrho", 1))),
    "bile_duct": ("generic", ((r"cholangiocarcinoma|bile duct", 4),)),
    "pancreas": ("generic", ((r"pancrea|whipple", 4),)),
    "bladder": ("generic", ((r"bladder|cystectomy|cystoprostatectomy", 3), (r"urothelial", 3))),
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
    "adrenal": ("generic", ((r"adrenal", 4),)),
    "testis": ("generic", ((r"testis|testicular|orchiectomy|seminoma", 4),)),
    "eye": ("generic", ((r"enucleation|choroid|uveal|ciliary body|globe", 4),)),
    "pleura": ("generic", ((r"mesothelioma", 5),)),
}


def detect_organ(text: str) -> str | None:
    """The organ whose cues weigh most, or ``None`` when nothing names one."""
    lowered = text.lower()
    scores = {
        organ: sum(weight * len(re.findall(pattern, lowered)) for pattern, weight in cues)
        for organ, (_, cues) in ORGANS.items()
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
