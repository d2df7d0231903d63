"""Breast biomarkers: ER, PR (status, percentage, intensity), HER2 (IHC score, ISH), Ki-67.

A result is read from the words after the marker's name up to the next marker or full stop:
"ESTROGEN RECEPTORS: POSITIVE (>95% NUCLEAR STAINING)", "ER: Moderate to strong expression in
80% of invasive tumor nuclei", "negative for ER and PR". A percentage without a word follows
ASCO/CAP 2020: 1 % or more is positive, 1–10 % "low positive". Methods text ("Interpretation of
the ER/PR stain is guided by …", "ER/PR taken", "will be reported as an addendum") states no
result and is skipped.
"""

from __future__ import annotations

import re

from histopilot.tools.extract.text import Mention

_ER = r"(?:\bER\b|\bE\.R\.|estrogen(?:[\s-]+receptors?)?|oestrogen(?:[\s-]+receptors?)?)"
_PR = r"(?:\bPR\b|\bPgR\b|\bP\.R\.|progesterone(?:[\s-]+receptors?)?)"
_HER2 = r"(?:HER[\s-]?2(?:[\s/-]*neu)?|c-?erb-?B2|HercepTest)"
_NEXT_MARKER = re.compile(rf"{_ER}|{_PR}|{_HER2}|ki-?67|\.\s|;", re.IGNORECASE)
_STATUS = re.compile(
    r"\b(?P<neg>negative|neg\b|not\s+(?:detected|identified)|no\s+(?:staining|expression|"
    r"immunoreactiv)|absent)(?!\s+for\b)|\b(?P<pos>positive|pos\b|immunoreactive|expression|"
    r"staining\s+in)(?!\s+for\b)",
    re.IGNORECASE,
)
_PERCENT = re.compile(
    r"(?P<cmp>[<>]\s?=?|less\s+than|greater\s+than|more\s+than|over)?\s*(?P<lo>\d{1,3})(?:\s*-\s*(?P<hi>\d{1,3}))?\s*%"
)
_INTENSITY = re.compile(r"\b(weak|moderate|strong)", re.IGNORECASE)
_NO_RESULT = re.compile(
    r"guided by|taken|will be|pending|to follow|performed on|submitted for|addendum|ordered|"
    r"see (?:prior|previous|report)|not (?:performed|done|applicable)|interpretation|clone|antibod",
    re.IGNORECASE,
)
_BOTH_NEGATIVE = re.compile(rf"negative\s+for\s+{_ER}\s*(?:,|and|/)\s*{_PR}", re.IGNORECASE)
_BOTH = re.compile(
    r"\b(?:ER\s*/\s*PR|ER\s*and\s*PR)\s*[:\-]?\s*(?P<sign>positive|negative|\+|-)", re.IGNORECASE
)
_HER2_SCORE = re.compile(
    r"(?<![\d.])(?P<score>[0-3])\s?\+|score\s*(?:of\s*)?[:=]?\s*(?P<s2>[0-3])\b"
    r"|\b(?P<zero>0)\b(?!\s*[%.,\d])",
    re.IGNORECASE,
)
_ISH = re.compile(
    r"(?P<no>not\s+amplified|non-?amplified|no\s+(?:gene\s+)?amplification|amplification\s+not\s+"
    r"(?:found|detected|identified|seen)|negative\s+for\s+amplification)|(?P<eq>equivocal)|"
    r"(?P<yes>amplified|amplification\s+(?:present|detected|found))(?!\s+control)",
    re.IGNORECASE,
)
_ISH_CONTEXT = re.compile(r"\b(?:FISH|ISH|CISH|SISH|gene\s+amplification|ratio)\b", re.IGNORECASE)
_KI67 = re.compile(r"ki-?67[^%.;]{0,40}?(?P<v>\d{1,3}(?:\.\d)?)\s*%", re.IGNORECASE)


_LEAD = re.compile(r"[\s:.\-]*")
_SIGN = re.compile(r"(?P<sign>[+-])(?![\w])|\s?\((?P<paren>[+-])\)")
_STATUS_FIRST = re.compile(
    rf"\b(?P<word>positive|negative)\s+for\s+(?P<first>{_ER}|{_PR})(?:\s*(?:,|and|/)\s*(?P<second>{_ER}|{_PR}))?",
    re.IGNORECASE,
)


def _result_after(text: str, marker: re.Match) -> tuple[str, int]:
    """The words that state a marker's result: up to the next marker name or full stop (a
    separator right after the name, as in "RECEPTOR -. POSITIVE", is skipped)."""
    start = _LEAD.match(text, marker.end()).end()
    stop = _NEXT_MARKER.search(text, start + 1, start + 160)
    end = stop.start() if stop else min(len(text), start + 160)
    return text[start:end], start


def receptor(text: str, which: str) -> dict[str, Mention]:
    """ER or PR (``which`` is ``'er'`` or ``'pr'``): status, percent and intensity mentions."""
    name = re.compile(_ER if which == "er" else _PR, re.IGNORECASE)
    for both in _BOTH_NEGATIVE.finditer(text):
        return {"status": Mention(both.start(), both.end(), "negative")}
    found: dict[str, Mention] = {}
    for marker in name.finditer(text):
        sign = _SIGN.match(text, marker.end())
        if sign:
            value = "positive" if "+" in (sign.group("sign") or sign.group("paren")) else "negative"
            return {"status": Mention(marker.start(), sign.end(), value)}
        words, offset = _result_after(text, marker)
        if not words.strip() or _NO_RESULT.search(words[:60]):
            continue
        percent = _PERCENT.search(words)
        status = _STATUS.search(words)
        if status is None and percent is None:
            continue
        value = None
        if status is not None:
            value = "negative" if status.group("neg") else "positive"
        if percent is not None:
            share = _share(percent)
            found.setdefault(
                "percent", Mention(offset + percent.start(), offset + percent.end(), share)
            )
            if value is None or (value == "positive" and share < 1):
                value = "positive" if share >= 1 else "negative"
            if value == "positive" and share <= 10:
                value = "low positive"
        intensity = _INTENSITY.search(words)
        if intensity and value != "negative":
            found.setdefault(
                "intensity",
                Mention(
                    offset + intensity.start(), offset + intensity.end(), intensity.group(1).lower()
                ),
            )
        end = offset + max(m.end() for m in (status, percent) if m is not None)
        found.setdefault("status", Mention(marker.start(), end, value))
        if "status" in found:
            break
    if "status" not in found:
        for stated in _STATUS_FIRST.finditer(text):
            named = [stated.group("first"), stated.group("second") or ""]
            if any(name.fullmatch(n) for n in named):
                return {
                    "status": Mention(stated.start(), stated.end(), stated.group("word").lower())
                }
        for both in _BOTH.finditer(text):
            sign = both.group("sign").lower()
            value = "positive" if sign in ("positive", "+") else "negative"
            return {"status": Mention(both.start(), both.end(), value)}
    return found


def _share(percent: re.Match) -> float:
    low = float(percent.group("lo"))
    high = float(percent.group("hi")) if percent.group("hi") else low
    if percent.group("cmp") and percent.group("cmp")[0] in "<l":
        return max(0.0, min(low, high) - 0.5)
    return min(100.0, max(low, high) if percent.group("hi") else low)


def her2(text: str) -> dict[str, Mention]:
    """HER2: IHC score, ISH result and the overall status (ASCO/CAP: 3+ or amplified positive,
    2+ without ISH equivocal, 0–1+ negative)."""
    found: dict[str, Mention] = {}
    status: Mention | None = None
    for marker in re.finditer(_HER2, text, re.IGNORECASE):
        words, offset = _result_after(text, marker)
        if _NO_RESULT.search(words[:50]) and not _STATUS.search(words[:25]):
            continue
        ish = _ISH.search(words)
        if (
            ish
            and ("ish" not in found)
            and (
                _ISH_CONTEXT.search(words)
                or _ISH_CONTEXT.search(text[max(0, marker.start() - 80) : marker.start()])
                or ish.group("no")
                or ish.group("yes")
            )
        ):
            result = (
                "not amplified"
                if ish.group("no")
                else "equivocal"
                if ish.group("eq")
                else "amplified"
            )
            found["ish"] = Mention(offset + ish.start(), offset + ish.end(), result)
            continue
        score = _HER2_SCORE.search(words)
        if score and "score" not in found:
            value = score.group("score") or score.group("s2") or score.group("zero")
            found["score"] = Mention(
                offset + score.start(), offset + score.end(), "0" if value == "0" else f"{value}+"
            )
        word = re.search(
            r"\b(negative|positive|equivocal|indeterminate|borderline)\b", words, re.IGNORECASE
        )
        if score and status is None:
            status = _from_score(found["score"])
        elif word and status is None:
            value = word.group(1).lower().replace("borderline", "equivocal")
            if value != "indeterminate":
                status = Mention(marker.start(), offset + word.end(), value)
    if status is None and "score" in found:
        status = _from_score(found["score"])
    if status is not None and "ish" in found and status.value == "equivocal":
        ish = found["ish"]
        status = Mention(ish.start, ish.end, "positive" if ish.value == "amplified" else "negative")
    if status is not None:
        found["status"] = status
    return found


def _from_score(score: Mention) -> Mention:
    value = {"3+": "positive", "2+": "equivocal"}.get(str(score.value), "negative")
    return Mention(score.start, score.end, value)


def ki67(text: str) -> Mention | None:
    match = _KI67.search(text)
    return Mention(match.start(), match.end(), float(match.group("v"))) if match else None
