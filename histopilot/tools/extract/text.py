"""Reading pathology report text as it arrives: OCR noise, numbers in words, mentions with spans.

Report text is never rewritten: every pattern tolerates the noise instead ("pTlc", "pNO",
"Is" for "is"), so a match's offsets are offsets in the text the user gave and a span can be
shown next to the value it supports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

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
    """A value found in the text, where it was found, and how much to trust that place.

    ``basis`` says how the value was reached when the text does not write it as such (derived
    by a staging rule, summed over parts); the span then points at the evidence."""

    start: int
    end: int
    value: object
    weight: float = 1.0
    basis: str | None = field(default=None, compare=False)

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


Spans = list[tuple[int, int]]
_WORD_START = re.compile(r"\b\w|\(")


def around(text: str, anchor: re.Pattern, before: int, after: int) -> Spans:
    """Stretches of ``text`` within reach of ``anchor`` (merged where they touch). A finder
    whose statements always sit near a word ("node", "cm") searches only there, which is what
    keeps extraction fast on long reports."""
    spans: Spans = []
    for match in anchor.finditer(text):
        start, end = max(0, match.start() - before), min(len(text), match.end() + after)
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def matches_in(
    pattern: re.Pattern, text: str, spans: Spans, starts: re.Pattern = _WORD_START
) -> Iterator[re.Match]:
    """``pattern``'s leftmost non-overlapping matches inside ``spans``, tried only where
    ``starts`` matches (a word or a bracket by default). A long alternation tried at every
    character is the slowest thing a finder can do; at word starts it is several times faster."""
    last_end = -1
    for start, end in spans:
        for anchor in starts.finditer(text, start, end):
            position = anchor.start()
            if position < last_end:
                continue
            match = pattern.match(text, position, end)
            if match:
                last_end = match.end()
                yield match
