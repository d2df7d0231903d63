"""Gleason grading in its many spellings, and the grade group it implies.

"Gleason score 3+4=7", "GLEASON SCORE (PRIMARY + SECONDARY PATTERN): 3 + 4 = 7/10",
"Gleason grade 4+3", "PRIMARY GLEASON GRADE: 4. SECONDARY GLEASON GRADE: 3", "Gleason sum 7",
"Primary Pattern: Grade 3". Patterns are 3–5 in contemporary grading (1–2 are no longer
assigned but old reports use them, so they are read). The grade group follows ISUP 2014.
"""

from __future__ import annotations

import re

from histopilot.tools.extract.text import Mention

_SUM = re.compile(
    r"gleason[^.;\d]{0,60}?(?P<p>[1-5])\s*\+\s*(?P<s>[1-5])(?:\s*=\s*(?P<total>10|[2-9]))?"
    r"|gleason(?:'?s)?[^.;\d]{0,40}?(?P<total2>10|[2-9])[\s.]*\(\s*(?P<p2>[1-5])\s*\+\s*(?P<s2>[1-5])\s*\)",
    re.IGNORECASE,
)


def _pattern_line(rank: str, values: str) -> re.Pattern:
    """A labelled pattern: "PRIMARY GLEASON GRADE: 4", "Secondary pattern: grade 3"."""
    return re.compile(
        rf"{rank}\s+(?:gleason\s+)?(?:grade|pattern)(?:\s*\(?gleason\)?)?\s*[:=\-]?\s*"
        rf"(?:grade\s*|pattern\s*)?(?P<v>[{values}])\b",
        re.IGNORECASE,
    )


_PRIMARY = _pattern_line("primary", "1-5")
_SECONDARY = _pattern_line("secondary", "1-5")
_TERTIARY = _pattern_line("tertiary", "3-5")
_TOTAL = re.compile(
    r"gleason\s+(?:sum|score|total)(?:\s+sum)?(?:\s+score)?\s*[:=\-]?\s*(?P<total>10|[2-9])\b(?!\s*\+)",
    re.IGNORECASE,
)


#: Words that put a grade in the patient's history (an earlier biopsy), not this specimen.
_HISTORY = re.compile(
    r"histor|biopsy\s+reveal|previous|prior|outside|clinical\s+(?:data|information|diagnosis)",
    re.IGNORECASE,
)


def _weight(text: str, match: re.Match) -> float:
    return 0.4 if _HISTORY.search(text[max(0, match.start() - 150) : match.start()]) else 1.0


def grade_group(primary: int, secondary: int) -> int:
    """ISUP grade group from the two patterns."""
    total = primary + secondary
    if total <= 6:
        return 1
    if total == 7:
        return 2 if primary == 3 else 3
    return 4 if total == 8 else 5


def gleason(text: str, *, resection: bool = True) -> dict[str, Mention]:
    """Primary, secondary, tertiary pattern, score and grade group, each with its span.

    The most frequent ``p+s`` pair wins (a resection restates its grade in the synopsis); among
    equals, a resection takes the first named (the dominant nodule, as CAP asks) and a biopsy
    the highest-grade core.
    """
    pairs: dict[tuple[int, int], list[re.Match]] = {}
    for match in _SUM.finditer(text):
        key = "" if match.group("p") else "2"
        primary, secondary = int(match.group("p" + key)), int(match.group("s" + key))
        total = match.group("total" + key)
        if total and int(total) != primary + secondary:
            continue
        pairs.setdefault((primary, secondary), []).append(match)
    found: dict[str, Mention] = {}
    if pairs:
        if resection:  # the dominant nodule, which reports name first
            order = {pair: -matches[0].start() for pair, matches in pairs.items()}
        else:  # a biopsy is graded by its highest-grade core
            order = {pair: sum(pair) * 10 + pair[0] for pair in pairs}
        weight = {pair: sum(_weight(text, m) for m in matches) for pair, matches in pairs.items()}
        (primary, secondary), matches = max(
            pairs.items(), key=lambda kv: (weight[kv[0]], order[kv[0]])
        )
        first = matches[0]
        key = "" if first.group("p") else "2"
        found["primary"] = Mention(first.start("p" + key), first.end("p" + key), primary)
        found["secondary"] = Mention(first.start("s" + key), first.end("s" + key), secondary)
        found["score"] = Mention(first.start(), first.end(), primary + secondary)
    else:
        primary_match, secondary_match = _PRIMARY.search(text), _SECONDARY.search(text)
        if primary_match and secondary_match:
            primary, secondary = int(primary_match.group("v")), int(secondary_match.group("v"))
            found["primary"] = Mention(primary_match.start(), primary_match.end(), primary)
            found["secondary"] = Mention(secondary_match.start(), secondary_match.end(), secondary)
            total = _TOTAL.search(text)
            if total and int(total.group("total")) == primary + secondary:
                found["score"] = Mention(total.start(), total.end(), primary + secondary)
            else:
                first, last = sorted((primary_match, secondary_match), key=lambda m: m.start())
                found["score"] = Mention(first.start(), last.end(), primary + secondary)
        elif total := _TOTAL.search(text):
            found["score"] = Mention(total.start(), total.end(), int(total.group("total")))
    if "primary" in found:
        score = found["score"]
        group = grade_group(int(found["primary"].value), int(found["secondary"].value))  # type: ignore[arg-type]
        found["grade_group"] = Mention(score.start, score.end, group)
    tertiary = _TERTIARY.search(text)
    if (
        tertiary
        and "primary" in found
        and int(tertiary.group("v"))
        > max(
            int(found["primary"].value),
            int(found["secondary"].value),  # type: ignore[arg-type]
        )
    ):
        found["tertiary"] = Mention(tertiary.start(), tertiary.end(), int(tertiary.group("v")))
    return found
