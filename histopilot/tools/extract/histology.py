"""Histologic type and its ICD-O-3 morphology code.

A code the report writes ("M 8255/3") wins. Otherwise the type is read from the synoptic
"Histologic type:" line when there is one, else from the whole text, against a table of the
types the supported sites report most, most specific first, with the organ deciding between
readings (a "papillary type" kidney tumour is papillary renal cell carcinoma). OCR often
breaks a phrase with ". ", so words may be joined by spaces or full stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from histopilot.tools.extract.text import Mention

ICDO3 = re.compile(r"(?<![0-9/.])(?:M\s?[-:]?\s?)?(?P<code>[89]\d{3})\s?/\s?(?P<b>[0-3])(?![0-9])")
HISTOLOGIC_LABEL = re.compile(
    r"histologic(?:al)?\s+type\s*[:\-]\s*(?P<type>[^;]{3,100}?)(?=\.\s+[A-Z][a-z]+\s*[a-z]*\s*:|;|$)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class HistologicType:
    pattern: str
    name: str
    code: str
    organs: frozenset[str] | None = None
    """Read only in reports about these organs (``None``: any)."""


def _type(pattern: str, name: str, code: str, *organs: str) -> HistologicType:
    gap = r"[\s.,-]+"
    return HistologicType(pattern.replace(" ", gap), name, code, frozenset(organs) or None)


#: Most specific first; the first that matches is taken.
TYPES: tuple[HistologicType, ...] = (
    # breast
    _type(
        r"(?:infiltrating|invasive) duct(?:al)? and lobular|mixed ductal and lobular",
        "invasive ductal and lobular carcinoma",
        "8522/3",
    ),
    _type(r"(?:invasive|infiltrating) lobular carcinoma", "invasive lobular carcinoma", "8520/3"),
    _type(
        r"(?:invasive|infiltrating) (?:mammary )?duct(?:al)? carcinoma"
        r"|invasive carcinoma of no special type"
        r"|(?:invasive|infiltrating) (?:mammary )?carcinoma,? (?:of )?duct(?:al)? type"
        r"|ductal carcinoma,? (?:invasive|infiltrating)",
        "invasive ductal carcinoma",
        "8500/3",
    ),
    _type(
        r"(?:invasive|infiltrating) (?:mammary )?carcinoma|mammary carcinoma",
        "invasive ductal carcinoma",
        "8500/3",
        "breast",
    ),
    _type(r"ductal carcinoma in situ", "ductal carcinoma in situ", "8500/2"),
    # gastrointestinal and pancreas
    _type(r"(?:pancreatic )?ductal adenocarcinoma", "ductal adenocarcinoma", "8500/3", "pancreas"),
    _type(
        r"signet[\s-]ring cell carcinoma|signet[\s-]ring", "signet ring cell carcinoma", "8490/3"
    ),
    _type(r"mucinous adenocarcinoma|colloid carcinoma", "mucinous adenocarcinoma", "8480/3"),
    _type(r"intestinal type", "adenocarcinoma, intestinal type", "8144/3", "stomach"),
    _type(r"diffuse type", "carcinoma, diffuse type", "8145/3", "stomach"),
    _type(
        r"tubular adenocarcinoma",
        "tubular adenocarcinoma",
        "8211/3",
        "stomach",
        "colorectal",
        "esophagus",
    ),
    _type(r"hepatocellular carcinoma", "hepatocellular carcinoma", "8170/3"),
    _type(r"cholangiocarcinoma", "cholangiocarcinoma", "8160/3"),
    # thyroid
    _type(
        r"papillary (?:thyroid )?carcinoma[^;]{0,40}follicular variant"
        r"|follicular variant of papillary",
        "papillary carcinoma, follicular variant",
        "8340/3",
        "thyroid",
    ),
    _type(
        r"papillary (?:thyroid )?carcinoma[^;]{0,30}tall cell|tall cell variant",
        "papillary carcinoma, tall cell variant",
        "8344/3",
        "thyroid",
    ),
    _type(
        r"papillary (?:thyroid )?carcinoma|papillary microcarcinoma",
        "papillary thyroid carcinoma",
        "8260/3",
        "thyroid",
    ),
    _type(r"follicular (?:thyroid )?carcinoma", "follicular carcinoma", "8330/3", "thyroid"),
    # kidney
    _type(r"chromophobe", "chromophobe renal cell carcinoma", "8317/3", "kidney"),
    _type(
        r"papillary renal cell carcinoma|renal cell carcinoma[^;]{0,40}papillary|papillary type",
        "papillary renal cell carcinoma",
        "8260/3",
        "kidney",
    ),
    _type(r"clear[\s-]cell|conventional", "clear cell renal cell carcinoma", "8310/3", "kidney"),
    _type(r"renal cell carcinoma", "renal cell carcinoma", "8312/3", "kidney"),
    # urothelium
    _type(
        r"papillary urothelial carcinoma|papillary transitional cell carcinoma",
        "papillary urothelial carcinoma",
        "8130/3",
    ),
    _type(r"urothelial carcinoma|transitional cell carcinoma", "urothelial carcinoma", "8120/3"),
    # squamous
    _type(r"basaloid squamous", "basaloid squamous cell carcinoma", "8083/3"),
    _type(
        r"non-?keratinizing squamous|squamous cell carcinoma,? non-?keratinizing|nonkeratinizing",
        "squamous cell carcinoma, non-keratinizing",
        "8072/3",
    ),
    _type(
        r"(?<!non)(?<!non-)keratinizing squamous|squamous cell carcinoma,? (?<!non)keratinizing",
        "squamous cell carcinoma, keratinizing",
        "8071/3",
    ),
    _type(
        r"squamous cell carcinoma|squamous carcinoma|epidermoid carcinoma|squamous cell ca\b",
        "squamous cell carcinoma",
        "8070/3",
    ),
    # pleura, germ cells, adrenal, melanocytic
    _type(
        r"epithelioid (?:malignant )?mesothelioma|mesothelioma,? epithelioid",
        "epithelioid mesothelioma",
        "9052/3",
    ),
    _type(r"biphasic|mixed (?:type )?mesothelioma", "biphasic mesothelioma", "9053/3", "pleura"),
    _type(
        r"sarcomatoid mesothelioma|mesothelioma,? sarcomatoid", "sarcomatoid mesothelioma", "9051/3"
    ),
    _type(r"mesothelioma", "mesothelioma", "9050/3"),
    _type(r"mixed germ cell", "mixed germ cell tumour", "9085/3"),
    _type(r"embryonal carcinoma", "embryonal carcinoma", "9070/3"),
    _type(r"seminoma", "seminoma", "9061/3"),
    _type(
        r"adrenal cortical carcinoma|adrenocortical carcinoma",
        "adrenal cortical carcinoma",
        "8370/3",
    ),
    _type(
        r"mixed (?:cell )?(?:type )?melanoma|epithelioid and spindle|spindle and epithelioid"
        r"|mixed (?:epithelioid|spindle)",
        "mixed epithelioid and spindle cell melanoma",
        "8770/3",
        "eye",
    ),
    _type(r"epithelioid (?:cell )?melanoma", "epithelioid cell melanoma", "8771/3", "eye"),
    _type(r"spindle (?:cell )?melanoma", "spindle cell melanoma", "8772/3", "eye"),
    _type(r"melanoma", "melanoma", "8720/3"),
    # glands
    _type(
        r"acinar (?:type )?adenocarcinoma|adenocarcinoma,? acinar",
        "acinar adenocarcinoma",
        "8550/3",
        "prostate",
    ),
    _type(r"adenocarcinoma", "adenocarcinoma", "8140/3"),
    _type(r"carcinoma", "carcinoma", "8010/3"),
)
_COMPILED = [(re.compile(t.pattern, re.IGNORECASE), t) for t in TYPES]


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a regular expression."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(pattern):
        if char == "(" and pattern[index - 1 : index] != "\\":
            depth += 1
        elif char == ")" and pattern[index - 1 : index] != "\\":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:index])
            start = index + 1
    return [*parts, pattern[start:]]


#: Words in nearly every report, useless for ruling a type out.
_COMMON_WORDS = {"carcinoma", "adenocarcinoma", "cell", "type", "invasive", "infiltrating"}


def _keywords(pattern: str) -> tuple[str, ...]:
    """For each alternative, its longest plain word: a text holding none of them cannot match,
    so most of the table is skipped without running a search."""
    words = []
    for alternative in _alternatives(pattern):
        plain = re.sub(r"\(\?[^)]*\)|\[[^]]*\]|\\.|[?*+{}()|]", " ", alternative)
        candidates = [word.lower() for word in re.findall(r"[A-Za-z]{3,}", plain)]
        if not candidates:
            return ("",)
        rare = [word for word in candidates if word not in _COMMON_WORDS] or candidates
        words.append(max(rare, key=len))
    return tuple(words)


_KEYWORDS = [_keywords(t.pattern) for t in TYPES]
_ALL_KEYWORDS = sorted({word for words in _KEYWORDS for word in words})


def histologic_type(text: str, organ: str | None) -> tuple[Mention | None, Mention | None]:
    """(type, ICD-O-3 code) as mentions; either may be ``None``."""
    code = ICDO3.search(text)
    written = (
        Mention(code.start(), code.end(), f"{code.group('code')}/{code.group('b')}")
        if code
        else None
    )
    label = HISTOLOGIC_LABEL.search(text)
    places = [(label.start("type"), label.end("type"))] if label else []
    places.append((0, len(text)))
    lowered = text.lower()
    found = {word: word in lowered for word in _ALL_KEYWORDS}
    present = [any(found[word] for word in words) for words in _KEYWORDS]
    for start, end in places:
        for (pattern, kind), possible in zip(_COMPILED, present, strict=True):
            if not possible or (kind.organs is not None and organ not in kind.organs):
                continue
            match = pattern.search(text, start, end)
            if match:
                found = Mention(match.start(), match.end(), kind.name)
                coded = Mention(
                    found.start, found.end, kind.code, basis=f"ICD-O-3 code of {kind.name}"
                )
                return found, written or coded
    return None, written
