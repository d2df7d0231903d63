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
_BOTH_NAMED = re.compile(
    rf"{_ER}\s*(?:and|&|/)\s*{_PR}(?:\s+receptors?)?\s+(?:are|is|were|was)\s+(?:both\s+)?"
    r"(?P<word>positive|negative)",
    re.IGNORECASE,
)
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
_HER2_WORD = re.compile(
    r"\b(negative|positive|equivocal|indeterminate|borderline)\b(?!\s+for\b)", re.IGNORECASE
)
#: "negative for HER2/neu oncoprotein over-expression": the IHC result, said before the name.
_HER2_STATUS_FIRST = re.compile(
    rf"\b(negative|positive|equivocal)\s+for\s+(?:the\s+)?{_HER2}(?!\s*(?:gene|amplif))",
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
        percent = _PERCENT.search(words)
        status = _STATUS.search(words)
        if status is None and percent is None:
            continue
        first = min(m.start() for m in (status, percent) if m is not None)
        if _withheld(words[:first]):
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
        found["status"] = Mention(marker.start(), end, value)
        break
    if "status" not in found:
        for stated in _STATUS_FIRST.finditer(text):
            named = [stated.group("first"), stated.group("second") or ""]
            if any(name.fullmatch(n) for n in named):
                return {
                    "status": Mention(stated.start(), stated.end(), stated.group("word").lower())
                }
        for both in _BOTH_NAMED.finditer(text):
            return {"status": Mention(both.start(), both.end(), both.group("word").lower())}
        for both in _BOTH.finditer(text):
            sign = both.group("sign").lower()
            value = "positive" if sign in ("positive", "+") else "negative"
            return {"status": Mention(both.start(), both.end(), value)}
    return found


def _withheld(words: str) -> bool:
    """Whether the words before a result say there is none yet ("will be performed",
    "see prior report"); "performed on another specimen. Results: positive" still counts."""
    withheld = _NO_RESULT.search(words)
    return withheld is not None and not re.search(r"results?\b", words[withheld.end() :], re.I)


def _share(percent: re.Match) -> float:
    low = float(percent.group("lo"))
    high = float(percent.group("hi")) if percent.group("hi") else low
    if percent.group("cmp") and percent.group("cmp")[0] in "<l":
        return max(0.0, min(low, high) - 0.5)
    return min(100.0, max(low, high) if percent.group("hi") else low)


def her2(text: str) -> dict[str, Mention]:
    """HER2: the IHC score and category, the ISH result, and the overall status.

    The overall status follows ASCO/CAP 2018: an ISH result decides (amplified positive, not
    amplified negative); without one, IHC 3+ is positive, 2+ equivocal, 0 and 1+ negative.
    Words next to an ISH method ("by FISH: negative") are the ISH result, not the IHC one.
    """
    found: dict[str, Mention] = {}
    for marker in re.finditer(_HER2, text, re.IGNORECASE):
        words, offset = _result_after(text, marker)
        if len(set(re.findall(r"negative|equivocal|positive", words, re.IGNORECASE))) >= 2:
            continue  # a legend of the categories ("Negative 0-1+, Equivocal 2+"), not a result
        ish = _ISH.search(words)
        score = _HER2_SCORE.search(words)
        word = _HER2_WORD.search(words)
        results = [m for m in (ish, score, word) if m is not None]
        if not results or _withheld(words[: min(m.start() for m in results)]):
            continue
        by_ish = bool(
            _ISH_CONTEXT.search(words)
            or _ISH_CONTEXT.search(text[max(0, marker.start() - 40) : marker.start()])
        )
        if ish and (by_ish or ish.group("no") or ish.group("yes")):
            found.setdefault("ish", Mention(offset + ish.start(), offset + ish.end(), _ish(ish)))
            method = _ISH_CONTEXT.search(words)
            if word and method and word.end() <= method.start():  # "NEGATIVE (CISH: NOT AMPLIFIED)"
                value = word.group(1).lower().replace("borderline", "equivocal")
                found.setdefault("ihc_status", Mention(marker.start(), offset + word.end(), value))
        elif word and by_ish and word.group(1).lower() in ("positive", "negative"):
            value = "amplified" if word.group(1).lower() == "positive" else "not amplified"
            found.setdefault("ish", Mention(offset + word.start(), offset + word.end(), value))
        elif score:
            value = score.group("score") or score.group("s2") or score.group("zero")
            value = "0" if value == "0" else f"{value}+"
            found.setdefault("score", Mention(offset + score.start(), offset + score.end(), value))
        elif word and word.group(1).lower() != "indeterminate":
            value = word.group(1).lower().replace("borderline", "equivocal")
            found.setdefault("ihc_status", Mention(marker.start(), offset + word.end(), value))
    if "ihc_status" not in found and (stated := _HER2_STATUS_FIRST.search(text)):
        found["ihc_status"] = Mention(stated.start(), stated.end(), stated.group(1).lower())
    if "score" in found:
        found["ihc_status"] = _from_score(found["score"])
    overall = found.get("ihc_status")
    if "ish" in found:
        ish_result = found["ish"]
        value = {"amplified": "positive", "not amplified": "negative"}.get(
            str(ish_result.value), "equivocal"
        )
        overall = Mention(ish_result.start, ish_result.end, value)
    if overall is not None:
        found["status"] = overall
    return found


def _ish(match: re.Match) -> str:
    if match.group("no"):
        return "not amplified"
    return "equivocal" if match.group("eq") else "amplified"


def _from_score(score: Mention) -> Mention:
    value = {"3+": "positive", "2+": "equivocal"}.get(str(score.value), "negative")
    return Mention(score.start, score.end, value)


def ki67(text: str) -> Mention | None:
    match = _KI67.search(text)
    return Mention(match.start(), match.end(), float(match.group("v"))) if match else None
