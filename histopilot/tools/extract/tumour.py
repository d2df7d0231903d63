"""The tumour itself: size, extent, grade, histologic type, margins, invasion, residual tumour.

Each finder returns a :class:`Mention` (value and span) or ``None``. Synoptic labels ("Tumor
size:", "Histologic grade:") are preferred to narrative wording, because a report's synopsis is
its answer and its narrative describes every specimen part, including the benign ones.
"""

from __future__ import annotations

import re

from histopilot.tools.extract.text import DECIMAL, Mention, around, matches_in, parse_decimal

# --- Size -----------------------------------------------------------------------------------


def _dims(key: str = "") -> str:
    """Up to three dimensions and their unit: "2.3 x 1.5 x 1.0 cm", "23 mm", "2.0 cm x 1.5 cm"."""
    unit_before_x = r"(?:(?:cm|mm)\s*(?=[x×X]))?"
    return (
        rf"(?P<a{key}>{DECIMAL})\s*{unit_before_x}(?:[x×X]\s*(?P<b{key}>{DECIMAL})\s*{unit_before_x})?"
        rf"(?:[x×X]\s*(?P<c{key}>{DECIMAL})\s*)?(?P<unit{key}>cm|mm)\b"
    )


SIZE_LABEL = re.compile(
    rf"(?:tumou?r\s+size|size\s+of\s+(?:the\s+)?(?:largest\s+)?(?:primary\s+)?tumou?r|greatest\s+(?:tumou?r\s+)?"
    rf"dimension|largest\s+dimension|maximum\s+(?:tumou?r\s+)?(?:dimension|diameter)|tumou?r\s+diameter)"
    rf"[^0-9]{{0,40}}?{_dims()}",
    re.IGNORECASE,
)
SIZE_NARRATIVE = re.compile(
    rf"(?:carcinoma|tumou?r|mass|neoplasm|lesion|melanoma|nodule)[^.;]{{0,80}}?(?:measur\w*|size|of|,)\s*"
    rf"(?:up\s+to\s+|approximately\s+|at\s+least\s+)?{_dims()}"
    rf"|{_dims('2')}\s*(?:in\s+)?(?:greatest|maximum|largest)?\s*(?:dimension|diameter)?[^.;]{{0,12}}"
    rf"(?:tumou?r|carcinoma|mass)",
    re.IGNORECASE,
)
_NOT_TUMOUR = re.compile(
    r"specimen|fragment|portion|segment|ellipse|skin\s+\(|lymph|node|aggregate|"
    r"cyst|weigh|kidney\s+measur|lobe\s+measur|margin|from\s+the",
    re.IGNORECASE,
)


#: A measurement ("2.3 cm", "4 mm"): sizes are only looked for near one.
_MEASUREMENT = re.compile(r"\d\s*(?:cm|mm)\b", re.IGNORECASE)
_MARGIN_WORD = re.compile(r"margin", re.IGNORECASE)
#: Where a size or distance statement can start: a word, a decimal written ".5", or a tumour
#: word inside a longer one ("adeno|carcinoma").
_NUMBER_OR_WORD = re.compile(r"\b\w|[.,](?=\d)|(?<=\w)(?:carcinoma|melanoma)", re.IGNORECASE)


def tumour_size_mm(text: str) -> Mention | None:
    """Greatest dimension of the tumour in mm: a labelled size first, else the largest tumour
    measurement in the narrative (specimen, node and fragment sizes are skipped)."""
    spans = around(text, _MEASUREMENT, 160, 60)
    for match in matches_in(SIZE_LABEL, text, spans, _NUMBER_OR_WORD):
        size = _greatest(match)
        if size is not None:
            return Mention(match.start(), match.end(), size)
    best: Mention | None = None
    for match in matches_in(SIZE_NARRATIVE, text, spans, _NUMBER_OR_WORD):
        if _NOT_TUMOUR.search(match.group(0)):
            continue
        size = _greatest(match)
        if size is not None and (best is None or size > best.value):  # type: ignore[operator]
            best = Mention(match.start(), match.end(), size)
    return best


def _greatest(match: re.Match) -> float | None:
    key = "" if match.groupdict().get("a") else "2"
    values = []
    for name in ("a", "b", "c"):
        token = match.group(name + key)
        if token:
            try:
                values.append(parse_decimal(token))
            except ValueError:
                continue
    if not values:
        return None
    scale = 1.0 if match.group("unit" + key).lower() == "mm" else 10.0
    size = max(values) * scale
    return round(size, 1) if 0 < size <= 400 else None


# --- Grade ----------------------------------------------------------------------------------

_DIFFERENTIATION = {"well": "G1", "moderately": "G2", "poorly": "G3", "un": "G4"}
GRADE_LABEL = re.compile(
    r"(?:histologic(?:al)?\s+grade|tumou?r\s+grade|nuclear\s+grade|fuhrman\s+(?:nuclear\s+)?grade|"
    r"(?:who/)?isup\s+grade|grade)\s*(?:\(.{0,30}?\))?\s*[:\-]?\s*(?:is\s+)?(?:G\s?)?(?P<g>[1-4IV]{1,3})\b(?!\s*[+%])",
    re.IGNORECASE,
)
G_CODE = re.compile(r"(?<![A-Za-z0-9])G(?P<g>[1-4X])(?![0-9A-Za-z])")
DIFFERENTIATED = re.compile(
    r"\b(?P<d>well|moderately|poorly|un)[\s-]*(?:to\s+\w+\s+)?differentiated", re.IGNORECASE
)
TWO_TIER = re.compile(
    r"\b(?P<t>high|low)[\s-]grade\b(?!\s+(?:dysplasia|squamous\s+intraepithelial|"
    r"PIN|prostatic|urothelial\s+dysplasia))",
    re.IGNORECASE,
)
_ROMAN = {"I": "1", "II": "2", "III": "3", "IV": "4"}


def grade(text: str, site: str) -> Mention | None:
    """The histologic grade in the site's system: Nottingham 1–3 for breast, WHO/ISUP or
    Fuhrman 1–4 for kidney, else G1–G4 (differentiation) or high/low grade."""
    if site.startswith("prostate"):
        return None  # Gleason, read separately
    for match in GRADE_LABEL.finditer(text):
        raw = match.group("g").upper()
        number = _ROMAN.get(raw, raw)
        if number.isdigit() and 1 <= int(number) <= 4:
            if site in ("breast_invasive", "kidney"):
                if site == "breast_invasive" and number == "4":
                    continue
                return Mention(match.start(), match.end(), number)
            return Mention(match.start(), match.end(), f"G{number}")
    if site in ("breast_invasive", "kidney"):
        return None
    code = G_CODE.search(text)
    if code:
        return Mention(code.start(), code.end(), f"G{code.group('g')}")
    differentiation = DIFFERENTIATED.search(text)
    if differentiation:
        key = differentiation.group("d").lower()
        return Mention(differentiation.start(), differentiation.end(), _DIFFERENTIATION[key])
    tier = TWO_TIER.search(text)
    if tier:
        return Mention(tier.start(), tier.end(), tier.group("t").lower())
    return None


# --- Margins, residual tumour, invasion -----------------------------------------------------

MARGIN_LABEL = re.compile(
    r"\bmargins?\b(?:\s+of\s+resection|\s+status)?\s*(?:\([^)]{0,30}\))?\s*[:\-]", re.IGNORECASE
)
_MARGIN_NEGATIVE = re.compile(
    r"\b(?:negative|free|clear|uninvolved|not\s+involved|no\s+(?:tumou?r|carcinoma|malignancy|invasive)"
    r"|tumou?r[\s-]free|widely\s+free|all\s+margins\s+(?:are\s+)?(?:negative|free))",
    re.IGNORECASE,
)
_MARGIN_POSITIVE = re.compile(
    r"\b(?:positive|involved|(?<!un)involvement\s+by|tumou?r\s+(?:present\s+)?at|extends?\s+to\s+(?:the\s+)?"
    r"(?:inked\s+)?(?:surgical\s+)?margin|transected)",
    re.IGNORECASE,
)
_MARGIN_CLOSE = re.compile(r"\bclose\b", re.IGNORECASE)
MARGIN_NARRATIVE = re.compile(
    r"(?:(?:surgical|resection|all|inked)\s+)?margins?[^.;]{0,40}?(?:are|is)?\s*(?P<w>negative|free|clear|"
    r"uninvolved|positive|involved)|(?P<w2>negative|free|clear|uninvolved|positive)\s+(?:surgical\s+|resection\s+)?margins?",
    re.IGNORECASE,
)
MARGIN_DISTANCE = re.compile(
    rf"(?:distance|closest|nearest)[^.;]{{0,60}}?margin[^0-9<]{{0,40}}?(?P<lt><\s?)?(?P<d>{DECIMAL})\s*(?P<unit>cm|mm)\b"
    rf"|(?P<d2>{DECIMAL})\s*(?P<unit2>cm|mm)\s+(?:from|to)\s+(?:the\s+)?(?:closest|nearest)?[^.;]{{0,30}}?margin",
    re.IGNORECASE,
)
RESIDUAL = re.compile(r"(?<![A-Za-z0-9])R\s?(?P<r>[0-2OX])(?![0-9A-Za-z])")
_INVASION = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "lymphovascular_invasion": r"(?:lympho[\s-]?vascular|angio[\s-]?lymphatic|"
        r"lymphatic(?:\s*\(small\s+vessel\))?|"
        r"vascular|venous|blood\s+vessel|lymph[\s-]?vascular|vessel)\s+invasion",
        "perineural_invasion": r"peri[\s-]?neural\s+(?:invasion|infiltration|spread)",
    }.items()
}
_ABSENT = re.compile(
    r"\b(?:not\s+(?:identified|seen|present|detected|found)|absent|negative|none|no\b)",
    re.IGNORECASE,
)
_PRESENT = re.compile(r"\b(?:present|identified|seen|positive|yes)\b", re.IGNORECASE)
_INDETERMINATE = re.compile(
    r"\b(?:indeterminate|cannot\s+be\s+(?:determined|assessed)|equivocal|suspicious)", re.IGNORECASE
)


def _first_of(
    words: str, readings: tuple[tuple[re.Pattern, str], ...]
) -> tuple[re.Match, str] | None:
    """The reading whose words come first: "present, no perineural invasion" is present."""
    hits = [(match, value) for pattern, value in readings if (match := pattern.search(words))]
    return min(hits, key=lambda hit: hit[0].start()) if hits else None


def margin_status(text: str) -> Mention | None:
    for label in MARGIN_LABEL.finditer(text):
        words = text[label.end() : label.end() + 90]
        words = re.split(r"(?<=[a-z])\.\s+[A-Z]", words)[0]
        # "close" qualifies a clear margin wherever it is said; otherwise the first word rules
        # ("involved by carcinoma; other margins free" is positive).
        hit = _first_of(words, ((_MARGIN_NEGATIVE, "negative"), (_MARGIN_POSITIVE, "positive")))
        close = _MARGIN_CLOSE.search(words)
        if close and (hit is None or hit[1] == "negative"):
            hit = close, "close"
        if hit:
            return Mention(label.start(), label.end() + hit[0].end(), hit[1])
    narrative = MARGIN_NARRATIVE.search(text)
    if narrative:
        word = (narrative.group("w") or narrative.group("w2")).lower()
        value = "positive" if word in ("positive", "involved") else "negative"
        return Mention(narrative.start(), narrative.end(), value)
    return None


def margin_distance_mm(text: str) -> Mention | None:
    spans = around(text, _MARGIN_WORD, 140, 90)
    match = next(matches_in(MARGIN_DISTANCE, text, spans, _NUMBER_OR_WORD), None)
    if not match:
        return None
    token, unit = (
        (match.group("d"), match.group("unit"))
        if match.group("d")
        else (match.group("d2"), match.group("unit2"))
    )
    distance = parse_decimal(token) * (10.0 if unit.lower() == "cm" else 1.0)
    return Mention(match.start(), match.end(), round(distance, 2)) if distance < 500 else None


def residual_tumour(text: str) -> Mention | None:
    for match in RESIDUAL.finditer(text):
        context = text[max(0, match.start() - 40) : match.start()].lower()
        if re.search(
            r"p?t\s?[0-4x]|n\s?[0-3x]|m\s?[01x]|\b[lv]\s?[0-2]\b|residual|resection|classification|margin",
            context,
        ):
            value = {"O": "0"}.get(match.group("r"), match.group("r"))
            return Mention(match.start(), match.end(), f"R{value}")
    return None


def invasion(text: str, field: str) -> Mention | None:
    """Lymphovascular or perineural invasion: present, absent or indeterminate."""
    for match in _INVASION[field].finditer(text):
        after = text[match.end() : match.end() + 40]
        before = text[max(0, match.start() - 25) : match.start()]
        hit = _first_of(
            after,
            ((_INDETERMINATE, "indeterminate"), (_ABSENT, "absent"), (_PRESENT, "present")),
        )
        if hit and hit[0].start() < 25:
            return Mention(match.start(), match.end() + hit[0].end(), hit[1])
        if re.search(r"\bno\s+(?:\w+\s+)?$|without\s+$|negative\s+for\s+$", before, re.IGNORECASE):
            return Mention(match.start() - len(before), match.end(), "absent")
        if re.search(r"(?:with|shows?|there\s+is|present)\s+$", before, re.IGNORECASE):
            return Mention(match.start(), match.end(), "present")
    return None
