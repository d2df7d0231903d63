"""Reading pathology report text as it arrives: OCR noise, numbers in words, mentions with spans.

Report text is never rewritten: every pattern tolerates the noise instead ("pTlc", "pNO",
"Is" for "is"), so a match's offsets are offsets in the text the user gave and a span can be
shown next to the value it supports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: What OCR makes of the digits that matter in categories: O for 0, l/I/i/| for 1.
OCR_DIGITS = {"O": "0", "o": "0", "l": "1", "I": "1", "i": "1", "|": "1"}
DIGIT = r"[0-9OoIl|]"

_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60}
NUMBER_WORDS = (
    {word: value for value, word in enumerate(_UNITS)}
    | _TENS
    | {"no": 0, "a": 1, "single": 1, "both": 2}
)
_WORDS = "|".join(sorted((w for w in NUMBER_WORDS if w not in ("a", "no")), key=len, reverse=True))
#: A count as digits, words ("twenty-three") or both ("three (3)").
COUNT = rf"(?:\d{{1,3}}|(?:{'|'.join(_TENS)})[- ](?:{_WORDS})|{_WORDS})(?:\s*\(\s*\d{{1,3}}\s*\))?"


def ocr_digit(token: str) -> str:
    """One category digit as written, with OCR confusions undone."""
    return OCR_DIGITS.get(token, token)


def parse_count(token: str) -> int | None:
    """``'12'``, ``'twelve'``, ``'twenty-one'``, ``'three (3)'`` → the number; else ``None``."""
    token = token.strip().lower()
    digits = re.search(r"\d+", token)
    if digits:
        return int(digits.group())
    parts = re.split(r"[- ]+", token)
    if len(parts) == 2 and parts[0] in _TENS and parts[1] in NUMBER_WORDS:
        return _TENS[parts[0]] + NUMBER_WORDS[parts[1]]
    return NUMBER_WORDS.get(token)


def parse_decimal(token: str) -> float:
    """``'2.3'``, ``'2,3'`` (decimal comma) and ``'0. 8'`` (OCR gap) → 2.3 / 0.8."""
    return float(re.sub(r"\s+", "", token).replace(",", "."))


#: A decimal as OCR leaves it: "2.3", "2,3", "0. 8", ".5".
DECIMAL = r"(?:\d{1,3}(?:\s?[.,]\s?\d{1,2})?|[.,]\d{1,2})"


@dataclass(frozen=True, order=True)
class Mention:
    """A value found in the text, where it was found, and how much to trust that place."""

    start: int
    end: int
    value: object
    weight: float = 1.0

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


def sentence_bounds(text: str, position: int, *, limit: int = 300) -> tuple[int, int]:
    """The sentence around ``position`` (full stop, semicolon or newline), at most ``limit``
    characters each way. OCR turns line breaks into ". ", so sentences are short."""
    start = max(text.rfind(mark, max(0, position - limit), position) for mark in ".;\n")
    end_candidates = [
        i for mark in ".;\n" if (i := text.find(mark, position, position + limit)) >= 0
    ]
    return start + 1, min(end_candidates, default=min(len(text), position + limit))


def window(text: str, start: int, end: int, before: int, after: int) -> str:
    """The text just around a match, lowercased, for context rules."""
    return text[max(0, start - before) : end + after].lower()
