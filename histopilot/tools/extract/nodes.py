"""Regional lymph node counts: examined and positive.

Reports give them three ways. A synoptic line ("Number of lymph nodes examined: 12"), which is
the total and wins; a fraction per specimen part ("(0/3)", "2 of 14 lymph nodes"), which are
summed over distinct parts; or words ("Two interlobar and one segmental lymph node - negative"),
which count as examined with none positive. A sum never mixes parts with the synoptic total.
"""

from __future__ import annotations

import re

from histopilot.tools.extract.text import COUNT, Mention, parse_count

_NODE = r"(?:lymph[\s-]*nodes?|nodes?|LNs?)"
EXAMINED_LINE = re.compile(
    rf"(?:(?:total\s+)?(?:number\s+of\s+)?(?:regional\s+)?{_NODE}\s+(?:examined|identified|"
    rf"recovered|retrieved|submitted|evaluated|resected)|nodes\s+examined)\s*(?:\([^)]{{0,20}}\))?\s*[:=\-]?\s*(?P<n>{COUNT})\b",
    re.IGNORECASE,
)
POSITIVE_LINE = re.compile(
    rf"(?:(?:number\s+of\s+)?(?:regional\s+)?{_NODE}\s+(?:involved|positive|with\s+(?:metastas[ie]s|"
    rf"metastatic\s+(?:carcinoma|tumou?r|disease)|tumou?r))(?:\s+by\s+(?:tumou?r|carcinoma|metastas[ie]s))?|"
    rf"nodes\s+positive)\s*(?:\([^)]{{0,20}}\))?\s*[:=\-]?\s*(?P<n>{COUNT})\b",
    re.IGNORECASE,
)
#: "(2/14)", "2/14 lymph nodes", "2 of 14 lymph nodes", "two out of fourteen nodes".
FRACTION = re.compile(
    rf"(?P<pos>{COUNT})\s*(?:/|of|out\s+of)\s*(?P<all>{COUNT})\s*(?:\)\s*)?(?:[a-z]+\s+){{0,3}}?{_NODE}\b"
    rf"|{_NODE}[^.;()]{{0,60}}?\(\s*(?P<pos2>\d{{1,2}})\s*/\s*(?P<all2>\d{{1,3}})\s*\)",
    re.IGNORECASE,
)
#: "Six lymph nodes, negative for tumor", "no tumor identified in three lymph nodes".
NEGATIVE_WORDS = re.compile(
    rf"(?:(?P<a>{COUNT})\s+(?:[a-z-]+\s+){{0,3}}?{_NODE}[^.;]{{0,40}}?(?:negative|benign|no\s+(?:tumou?r|"
    rf"metasta|malignan|carcinoma|evidence))|(?:negative|no\s+(?:tumou?r|metasta\w*|malignancy|carcinoma)"
    rf"(?:\s+(?:identified|seen|present))?)\s+(?:in|for)\s+(?:all\s+)?(?P<b>{COUNT})\s+(?:[a-z-]+\s+){{0,3}}?{_NODE})",
    re.IGNORECASE,
)


_NODE_WORD = re.compile(_NODE, re.IGNORECASE)


def _near_nodes(text: str, reach: int = 90) -> list[tuple[int, int]]:
    """Stretches of text around the word "node": the count patterns are only tried there,
    which keeps extraction fast on long reports."""
    spans: list[tuple[int, int]] = []
    for match in _NODE_WORD.finditer(text):
        start, end = max(0, match.start() - reach), min(len(text), match.end() + reach)
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def _finditer(pattern: re.Pattern, text: str, spans: list[tuple[int, int]]) -> list[re.Match]:
    return [match for start, end in spans for match in pattern.finditer(text, start, end)]


def _count(match: re.Match, group: str) -> int | None:
    token = match.group(group)
    return parse_count(token) if token else None


def node_counts(text: str) -> tuple[Mention | None, Mention | None]:
    """(examined, positive) as mentions; either may be ``None``."""
    spans = _near_nodes(text)
    examined = _first_line(EXAMINED_LINE, text, spans)
    positive = _first_line(POSITIVE_LINE, text, spans)
    if examined and positive:
        if positive.value <= examined.value:  # type: ignore[operator]
            return examined, positive
        positive = None
    parts: dict[tuple[int, int], tuple[int, int, int]] = {}
    for match in _finditer(FRACTION, text, spans):
        pos = _count(match, "pos") if match.group("pos") else _count(match, "pos2")
        total = _count(match, "all") if match.group("all") else _count(match, "all2")
        if pos is None or total is None or pos > total or total == 0 or total > 120:
            continue
        parts[match.span()] = (pos, total, match.start())
    for match in _finditer(NEGATIVE_WORDS, text, spans):
        total = _count(match, "a") if match.group("a") else _count(match, "b")
        if total and not any(
            s <= match.start() < e or match.start() <= s < match.end() for s, e in parts
        ):
            parts[match.span()] = (0, total, match.start())
    if not parts:
        return examined, positive
    unique = _distinct(parts)
    summed_pos = sum(p for p, _, _ in unique)
    summed_all = sum(t for _, t, _ in unique)
    start = min(s for s, _ in parts)
    end = max(e for _, e in parts)
    if examined is None:
        examined = Mention(start, end, summed_all, 0.8)
    if positive is None and summed_pos <= examined.value:  # type: ignore[operator]
        positive = Mention(start, end, summed_pos, 0.8)
    return examined, positive


def _distinct(parts: dict[tuple[int, int], tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Fractions with a repeated statement dropped: summaries restate each part's count, and a
    final diagnosis restates the gross, so the same (positive, total) seen again far away is
    counted once per distinct value."""
    seen: dict[tuple[int, int], int] = {}
    kept = []
    for pos, total, start in sorted(parts.values(), key=lambda p: p[2]):
        times = seen.get((pos, total), 0)
        seen[(pos, total)] = times + 1
        if times == 0:
            kept.append((pos, total, start))
    return kept


def _first_line(pattern: re.Pattern, text: str, spans: list[tuple[int, int]]) -> Mention | None:
    for match in _finditer(pattern, text, spans):
        value = parse_count(match.group("n"))
        if value is not None and value <= 150:
            return Mention(match.start(), match.end(), value, 1.0)
    return None
