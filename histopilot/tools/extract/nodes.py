"""Regional lymph node counts: examined and positive.

Reports give counts three ways, and this is the order of trust:

1. A labelled total: "Summary of lymph nodes: 3/26", "Number of positive lymph nodes / total
   number of nodes examined: 1/10", "Lymph nodes examined: 12 … involved: 0".
2. One statement per specimen part: "(0/3)", "metastatic carcinoma in 2 of 14 lymph nodes",
   "six lymph nodes, negative for tumor", "metastatic carcinoma in one lymph node". These are
   summed. A statement repeated word for word (an addendum restating the diagnosis) counts once,
   and a part count that equals the sum of all the others is a summary and replaces them.
3. Nothing: ``None``, never zero.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass

from histopilot.tools.extract.text import COUNT, Mention, around, matches_in, parse_count

_NODE = r"(?:lymph[\s.-]*nodes?|nodes?|LNs?\b|lymphonod\w*)"
_NEGATIVE = (
    r"(?:negative|benign|tumou?r[\s-]free|free\s+of\s+(?:tumou?r|carcinoma|metasta\w*|malignancy)|"
    r"uninvolved|reactive|no\s+(?:evidence\s+of\s+)?(?:tumou?r|metasta\w*|malignan\w*|carcinoma|neoplas\w*))"
)
_METASTASIS = r"(?:metasta\w*|carcinoma|tumou?r|melanoma|malignan\w*)"

LABELLED_FRACTION = re.compile(
    rf"{_NODE}[^:;]{{0,90}}?:\s*(?P<pos>\d{{1,3}})\s*(?:/|of|out\s+of)\s*(?P<all>\d{{1,3}})(?!\s*/)",
    re.IGNORECASE,
)
EXAMINED_LINE = re.compile(
    rf"(?:(?:total\s+)?(?:number\s+of\s+)?(?:regional\s+)?{_NODE}\s+(?:examined|identified|"
    rf"recovered|retrieved|evaluated)|nodes\s+examined)\s*(?:\([^)]{{0,20}}\))?\s*[:=\-]\s*"
    rf"(?P<n>{COUNT})\b(?!\s*/)",
    re.IGNORECASE,
)
POSITIVE_LINE = re.compile(
    rf"(?:(?:number\s+of\s+)?(?:regional\s+)?{_NODE}\s+(?:involved|positive|with\s+metasta\w*)"
    rf"(?:\s+by\s+{_METASTASIS})?|nodes\s+positive)\s*(?:\([^)]{{0,20}}\))?\s*[:=\-]\s*"
    rf"(?P<n>{COUNT})\b(?!\s*/)",
    re.IGNORECASE,
)
#: One specimen part: a fraction, a count of negative nodes, or a count of positive ones. The
#: forms that begin with the count share one leading ``count`` group, so the number words are
#: tried once per position rather than once per form.
PART = re.compile(
    rf"(?P<count>{COUNT})(?:"
    rf"\s*(?:/|of|out\s+of)\s*(?P<all>{COUNT})\s*\)?\s*(?:[a-z]+\s+){{0,3}}?{_NODE}"
    rf"|(?!\s*(?:cm|mm|x)\b)\s+(?:[\w-]+[\s.,]+){{0,4}}?{_NODE}(?:(?!metasta)[^;]){{0,60}}?"
    rf"{_NEGATIVE}"
    rf"|\s+(?:[\w-]+\s+){{0,2}}?{_NODE}\s+(?:positive|involved)\b(?P<hit_after>)"
    rf"|\s+(?:benign|negative|reactive|uninvolved|tumou?r[\s-]free)\s+(?:[\w-]+\s+){{0,2}}?{_NODE}"
    rf"|\s*\(\s*(?:out\s+)?of\s+(?P<all_in_brackets>{COUNT})\s*\)\s*(?:[\w-]+\s+){{0,2}}?{_NODE}"
    rf"|\s+(?:[\w-]+\s+){{0,3}}?{_NODE}[^;]{{0,80}}?(?:of\s+which|of\s+these|(?P<them>of\s+them))"
    rf"[,\s]*(?P<of_which>{COUNT})\b(?(them)|\s+(?:[\w-]+\s+){{0,2}}?(?:shows?|contains?|with|are|"
    rf"is|positive|involved|metasta\w*|lymph))"
    rf")"
    rf"|{_NODE}[^;()]{{0,70}}?\(\s*(?P<bracket_pos>\d{{1,2}})\s*/\s*(?P<bracket_all>\d{{1,3}})\s*\)"
    rf"|{_NEGATIVE}(?:\s+(?:is\s+)?(?:identified|seen|present|detected))?\s+(?:in|for)\s+"
    rf"(?:all\s+)?(?P<negative_in>{COUNT})\s+(?:[\w-]+\s+){{0,3}}?{_NODE}"
    rf"|(?<!\bno\s)(?<!\bnot\s){_METASTASIS}\s+(?:\w+\s+){{0,3}}?(?:in|to|involving)\s+"
    rf"(?P<metastasis_in>{COUNT})(?!\s*(?:to|-|or|/|of|out)\s*\w)\s+(?:[\w-]+\s+){{0,3}}?{_NODE}"
    rf"|\(?\s*No\.?\s*(?P<roman_pos>[IVXL]+|0)\s*/\s*(?P<roman_all>[IVXL]+)\s*\)?",
    re.IGNORECASE,
)
_NODE_WORD = re.compile(_NODE, re.IGNORECASE)
#: Where a count statement can begin: a digit, the first letter of a number word, of "lymph",
#: "node", a negative or a metastasis word, or a bracket.
_COUNT_START = re.compile(r"\b[0-9zotfsenlbumrcZOTFSENLBUMRC]|\(")
#: Where a labelled count can begin ("Total number of regional lymph nodes examined: 12").
_LINE_START = re.compile(r"\b(?:total|number|regional|lymph|nodes?|LNs?)\b", re.IGNORECASE)
_TOTAL_WORD = re.compile(r"\b(?:total|summary|overall|in\s+all)\b")


@dataclass(frozen=True)
class _Count:
    positive: int
    total: int
    start: int
    end: int
    context: str
    section: int = 0


def _number(match: re.Match, *groups: str) -> int | None:
    for group in groups:
        token = match.group(group)
        if token:
            return parse_count(token)
    return None


SECTION_HEADING = re.compile(
    r"\b(?:final\s+diagnosis|diagnosis|comment|synoptic|summary|addendum|microscopic|gross\s+"
    r"description|pathologic\s+stag\w*|tumou?r\s+summary|checklist|template)\b",
    re.IGNORECASE,
)


def _section_of(headings: list[int], position: int) -> int:
    """How many section headings come before ``position``: the section's number."""
    return bisect.bisect_right(headings, position)


_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}


def _roman(numeral: str) -> int | None:
    """``'XIV'`` → 14 (some reports count nodes in Roman numerals: "No II/XXII")."""
    if numeral == "0":
        return 0
    values = [_ROMAN[c] for c in numeral.upper()]
    total = sum(
        -v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values)
    )
    return total if total > 0 else None


def _part_counts(match: re.Match) -> tuple[int | None, int | None]:
    """(positive, examined) from a ``PART`` match, whichever form it took."""
    if match.group("roman_all"):
        return _roman(match.group("roman_pos")), _roman(match.group("roman_all"))
    if match.group("count") is not None:
        count = parse_count(match.group("count"))
        if match.group("all") or match.group("all_in_brackets"):
            return count, _number(match, "all", "all_in_brackets")
        if match.group("of_which"):
            return parse_count(match.group("of_which")), count
        if match.group("hit_after") is not None:
            return count, count
        return 0, count
    if match.group("bracket_all"):
        return int(match.group("bracket_pos")), int(match.group("bracket_all"))
    if match.group("negative_in"):
        return 0, parse_count(match.group("negative_in"))
    count = parse_count(match.group("metastasis_in"))
    return count, count


def _parts(text: str, spans: list[tuple[int, int]]) -> list[_Count]:
    counts = []
    for match in matches_in(PART, text, spans, _COUNT_START):
        positive, total = _part_counts(match)
        if positive is None or total is None or not 0 < total <= 150 or positive > total:
            continue
        context = re.sub(r"\W+", " ", text[max(0, match.start() - 40) : match.end()].lower())
        counts.append(_Count(positive, total, match.start(), match.end(), context))
    values = [(c.positive, c.total) for c in counts]
    if len(set(values)) < len(values):  # a count seen twice: sections tell parts from restatements
        headings = [m.start() for m in SECTION_HEADING.finditer(text)]
        counts = [dataclasses.replace(c, section=_section_of(headings, c.start)) for c in counts]
    return counts


def _combine(counts: list[_Count]) -> _Count | None:
    """The sum over parts. A statement repeated with the same words before it, or the same
    count again in a later section of the report (the synopsis or an addendum restating the
    diagnosis), counts once; the same count under another part's label in the same section is
    another part. A count equal to the sum of the others, or one that calls itself a total, is
    a summary and is used as is."""
    unique: list[_Count] = []
    for count in sorted({c.context: c for c in counts}.values(), key=lambda c: c.start):
        if any(
            (u.positive, u.total) == (count.positive, count.total) and u.section != count.section
            for u in unique
        ):
            continue  # restated in a later section (synopsis, comment, addendum)
        unique.append(count)
    if not unique:
        return None
    largest = max(unique, key=lambda c: (c.total, c.start))
    rest = [c for c in unique if c is not largest]
    rest_total = sum(c.total for c in rest)
    if rest and (
        rest_total == largest.total
        or (rest_total < largest.total and _TOTAL_WORD.search(largest.context))
    ):
        return largest
    if len(unique) == 1:
        return unique[0]
    first = unique[0]
    basis = f"sum of {len(unique)} specimen parts' counts; the span is the first"
    return _Count(
        sum(c.positive for c in unique), sum(c.total for c in unique), first.start, first.end, basis
    )


def node_counts(text: str) -> tuple[Mention | None, Mention | None]:
    """(examined, positive) as mentions; either may be ``None``."""
    spans = around(text, _NODE_WORD, 120, 120)
    labelled = [
        _Count(int(m.group("pos")), int(m.group("all")), m.start(), m.end(), m.group(0).lower())
        for m in matches_in(LABELLED_FRACTION, text, spans, _LINE_START)
        if 0 < int(m.group("all")) <= 150 and int(m.group("pos")) <= int(m.group("all"))
    ]
    if labelled:
        best = max(labelled, key=lambda c: c.total)
        return _mention(best, best.total), _mention(best, best.positive)
    examined = _line(EXAMINED_LINE, text, spans, zero=False)
    positive = _line(POSITIVE_LINE, text, spans, zero=True)
    if examined is not None:
        if positive is None or positive.value > examined.value:  # type: ignore[operator]
            summed = _combine(_parts(text, spans))
            if summed is not None and summed.total == examined.value:
                positive = _mention(summed, summed.positive)
            elif re.search(_NEGATIVE, text[examined.end : examined.end + 60], re.IGNORECASE):
                positive = Mention(examined.start, examined.end, 0)  # "examined: 12, negative"
            else:
                positive = None
        return examined, positive
    summed = _combine(_parts(text, spans))
    if summed is None:
        return None, positive
    return _mention(summed, summed.total), _mention(summed, summed.positive)


def _mention(count: _Count, value: int) -> Mention:
    """A count as a mention; a sum over parts says so in its basis."""
    basis = count.context if count.context.startswith("sum of") else None
    return Mention(count.start, count.end, value, basis=basis)


def _line(
    pattern: re.Pattern, text: str, spans: list[tuple[int, int]], *, zero: bool
) -> Mention | None:
    """A labelled count; several different ones (one per specimen part) are added up unless
    one of them is the sum of the rest. ``zero``: whether 0 is a count (positive nodes) or a
    blank template (nodes examined)."""
    counts = []
    for match in matches_in(pattern, text, spans, _LINE_START):
        value = parse_count(match.group("n"))
        if value is not None and (zero or value > 0) and value <= 150:
            counts.append(_Count(value, value, match.start(), match.end(), match.group(0).lower()))
    combined = _combine(counts)
    return None if combined is None else _mention(combined, combined.total)
