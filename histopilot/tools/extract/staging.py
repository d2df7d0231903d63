"""AJCC 8th edition T and N categories derived from what the report measures.

Many reports never write "pT" or "pN" but give the tumour's size, how deep it invades, and how
many nodes hold metastasis. These rules turn those into the category the site's AJCC chapter
assigns. Only the criteria a report states in words are used. Where a site's rule needs more than a
report gives (the number of liver tumours, a cervical tumour's extent), no category is derived;
lung N, which depends on the nodal station, is N2 when a mediastinal station is named positive
and N1 otherwise.
Derived values are marked with their basis, so nobody mistakes them for the pathologist's own.
"""

from __future__ import annotations

import re

from histopilot.tools.extract.text import Mention

#: Size cut-offs (mm, upper bounds inclusive) → T group, per organ staged by size.
SIZE_RULES: dict[str, tuple[tuple[float, str], ...]] = {
    "breast": ((20, "T1"), (50, "T2"), (float("inf"), "T3")),
    "lung": ((30, "T1"), (50, "T2"), (70, "T3"), (float("inf"), "T4")),
    "kidney": ((70, "T1"), (float("inf"), "T2")),
    "thyroid": ((20, "T1"), (40, "T2"), (float("inf"), "T3")),
    "head_neck": ((20, "T1"), (40, "T2"), (float("inf"), "T3")),
    "pancreas": ((20, "T1"), (40, "T2"), (float("inf"), "T3")),
    "adrenal": ((50, "T1"), (float("inf"), "T2")),
}

#: Depth of invasion → T group, for hollow organs, deepest first (first match wins).
DEPTH_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "hollow": (
        (
            r"(?:invad|involv|extend|infiltrat)\w*[^.;]{0,40}(?:adjacent\s+organ|abdominal\s+wall|pelvic\s+(?:side)?wall|"
            r"prostat|vagina|uterus)",
            "T4",
        ),
        (
            r"(?:penetrat|through|involv|invad|perforat)\w*[^.;]{0,30}(?:visceral\s+peritoneum|serosa(?:l\s+surface)?)"
            r"(?!\s*(?:is\s+)?(?:not|free|uninvolved|negative))",
            "T4",
        ),
        (
            r"(?:pericolonic|pericolorectal|perirectal|perivesic\w*|mesorect\w*|subserosa\w*|adventitia|"
            r"perigastric|peri-?esophageal|extramural|(?:serosal|mesenteric|adipose|fat(?:ty)?)\s+(?:soft\s+)?tissue|"
            r"beyond\s+(?:the\s+)?muscularis\s+propria|through\s+(?:the\s+)?muscularis\s+propria)",
            "T3",
        ),
        (
            r"muscularis\s+propria|muscle\s+wall|detrusor|muscularis\s+externa|muscular\s+layer",
            "T2",
        ),
        (r"submucosa|lamina\s+propria|muscularis\s+mucosae", "T1"),
    ),
    "prostate": (
        (
            r"seminal\s+vesicle\s+(?:invasion\s*[:\-]?\s*(?:present|identified|positive)|(?:is\s+)?(?:invaded|involved))"
            r"|(?:invad|involv|extend)\w*\s+(?:into\s+)?(?:the\s+)?seminal\s+vesicle",
            "T3",
        ),
        (
            r"extra-?prostatic\s+extension\s*[:\-]?\s*(?:present|identified|focal|established)|"
            r"(?:extends?|extension|extending|penetrat\w*)\s+(?:into|through|beyond)\s+(?:the\s+)?(?:periprostatic|"
            r"prostatic\s+capsule|capsule)",
            "T3",
        ),
        (
            r"(?:confined\s+to\s+(?:the\s+)?prostate|organ[\s-]confined|extra-?prostatic\s+extension\s*[:\-]?\s*"
            r"(?:not\s+identified|absent|none|negative))",
            "T2",
        ),
    ),
    "kidney": (
        (r"(?:invad|involv|extend)\w*[^.;]{0,30}(?:gerota|adrenal\s+gland)", "T4"),
        (
            r"(?:invad|involv|extend)\w*[^.;]{0,30}(?:perinephric|perirenal|renal\s+sinus|sinus\s+fat|renal\s+vein)"
            r"(?![^.;]{0,10}(?:not|absent))",
            "T3",
        ),
    ),
    "thyroid": (
        (
            r"(?:gross|macroscopic|extensive)\s+extrathyroidal\s+extension[^.;]{0,20}(?:present|identified|into)|"
            r"invad\w*[^.;]{0,30}(?:strap\s+muscle)",
            "T3",
        ),
    ),
}
ORGAN_DEPTH = {
    "colorectal": "hollow",
    "stomach": "hollow",
    "esophagus": "hollow",
    "bladder": "hollow",
    "bile_duct": "hollow",
    "prostate": "prostate",
    "kidney": "kidney",
    "thyroid": "thyroid",
}

#: Positive node count (upper bounds inclusive) → N group, per organ staged by count.
NODE_RULES: dict[str, tuple[tuple[float, str], ...]] = {
    "breast": ((0, "N0"), (3, "N1"), (9, "N2"), (float("inf"), "N3")),
    "colorectal": ((0, "N0"), (3, "N1"), (float("inf"), "N2")),
    "stomach": ((0, "N0"), (2, "N1"), (6, "N2"), (float("inf"), "N3")),
    "esophagus": ((0, "N0"), (2, "N1"), (6, "N2"), (float("inf"), "N3")),
    "pancreas": ((0, "N0"), (3, "N1"), (float("inf"), "N2")),
    "bladder": ((0, "N0"), (1, "N1"), (float("inf"), "N2")),
    "melanoma": ((0, "N0"), (1, "N1"), (3, "N2"), (float("inf"), "N3")),
    "head_neck": ((0, "N0"), (1, "N1"), (float("inf"), "N2")),
}
#: Organs where any nodal metastasis is N1 (the subdivisions need the station).
ANY_NODE_N1 = {
    "lung",
    "kidney",
    "thyroid",
    "prostate",
    "liver",
    "bile_duct",
    "cervix",
    "adrenal",
    "testis",
    "eye",
    "pleura",
}
_MEDIASTINAL = re.compile(
    r"(?:mediastin|subcarinal|paratracheal|station\s*[2-9]\b|level\s*(?:[2-9]|i[iv]|vii?i?)\b)"
    r"[^.;]{0,80}?(?:positive|metasta|involved|carcinoma\s+present)",
    re.IGNORECASE,
)


def _derived(value: str, basis: str, span: tuple[int, int]) -> Mention:
    return Mention(span[0], span[1], value, basis=basis)


def _by_threshold(rules: tuple[tuple[float, str], ...], quantity: float) -> str:
    return next(group for bound, group in rules if quantity <= bound)


def derive_t(organ: str | None, text: str, size: Mention | None) -> Mention | None:
    """The T group from extent (deepest criterion met) or size, by the organ's AJCC rules."""
    if organ is None:
        return None
    family = ORGAN_DEPTH.get(organ)
    by_extent: Mention | None = None
    if family:
        for pattern, group in DEPTH_RULES[family]:
            match = re.search(pattern, text, re.IGNORECASE)
            if match:
                by_extent = _derived(
                    group, f"AJCC 8th {organ}: extent '{match.group(0)[:60]}'", match.span()
                )
                break
    by_size: Mention | None = None
    if organ in SIZE_RULES and size is not None:
        group = _by_threshold(SIZE_RULES[organ], float(size.value))  # type: ignore[arg-type]
        by_size = _derived(group, f"AJCC 8th {organ}: tumour size {size.value:g} mm", size.span)
    if (
        organ == "lung"
        and by_size
        and re.search(
            r"visceral\s+pleura\w*\s+(?:invasion\s*[:\-]?\s*(?:present|identified)|"
            r"(?:is\s+)?(?:invaded|involved))|invad\w*\s+(?:the\s+)?visceral\s+pleura",
            text,
            re.IGNORECASE,
        )
        and by_size.value == "T1"
    ):
        by_size = _derived("T2", by_size.basis + " with visceral pleural invasion", by_size.span)
    candidates = [d for d in (by_extent, by_size) if d is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda d: d.value)


def derive_n(
    organ: str | None, text: str, examined: Mention | None, positive: Mention | None
) -> Mention | None:
    """The N group from the count of positive nodes, by the organ's AJCC rules."""
    if organ is None or positive is None or examined is None or examined.value == 0:
        return None
    count = int(positive.value)  # type: ignore[arg-type]
    basis = f"AJCC 8th {organ}: {count} of {examined.value} regional nodes positive"
    if count == 0:
        return _derived("N0", basis, positive.span)
    if organ in NODE_RULES:
        return _derived(_by_threshold(NODE_RULES[organ], count), basis, positive.span)
    if organ == "lung":
        group = "N2" if _MEDIASTINAL.search(text) else "N1"
        return _derived(
            group, basis + (" incl. mediastinal" if group == "N2" else ""), positive.span
        )
    if organ in ANY_NODE_N1:
        return _derived("N1", basis, positive.span)
    return None
