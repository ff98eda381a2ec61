"""US Social Security numbers: ``ddd-dd-dddd`` and ``ddd dd dddd`` under the SSA's rules, and
bare nine-digit numbers only right after an SSN keyword. ASCII and UTF-16LE."""

from __future__ import annotations

import re

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Hit, Hits
from patterns.digits import DigitDetector, TextView, gather_digits, group_key, is_in, views

# Numbers the SSA voided or that were published (wallet inserts, advertising) and so are not
# anyone's SSN; SSA rules reject area 000, 666 and 900-999, group 00 and serial 0000 besides.
KNOWN_INVALID = frozenset({"078051120", "219099999", "457555462", "123456789"})
_KNOWN_INVALID = np.array(sorted(int(x) for x in KNOWN_INVALID), np.int64)
# one literal first byte lets the regex engine skip ahead fast
KEYWORDS = re.compile(rb"s(?:sn|s ?#|\.s\.n|ocial security|oc\.? ?sec)")
KEYWORD_LONGEST = len("social security")  # characters of the longest KEYWORDS match
KEYWORD_WINDOW = 24  # characters between a keyword's end and a bare number's start
_POW = 10 ** np.arange(8, -1, -1)


def valid_ssn(digits: np.ndarray) -> np.ndarray:
    """SSA validity of each row of nine digits (int8)."""
    d = digits.astype(np.int64)
    area = d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]
    group = d[:, 3] * 10 + d[:, 4]
    serial = d[:, 5] * 1000 + d[:, 6] * 100 + d[:, 7] * 10 + d[:, 8]
    number = (d * _POW).sum(axis=1)
    return (
        (area != 0)
        & (area != 666)
        & (area < 900)
        & (group != 0)
        & (serial != 0)
        & ~is_in(number, _KNOWN_INVALID)
    )


_SEPARATED = group_key((3, 2, 4))


def candidates(view: TextView) -> tuple[np.ndarray, np.ndarray]:
    """Text (start, span) of whole 3-2-4 chains with one separator kind, and of lone
    9-digit chains right after an SSN keyword."""
    c = view.chains()
    span = c.end - c.start
    sep = (c.links == 2) & (c.key == _SEPARATED)
    bare = np.flatnonzero((c.links == 0) & (span == 9))
    bare = bare[view.has_word_before(c.start[bare], KEYWORDS, KEYWORD_WINDOW, KEYWORD_LONGEST)]
    start = np.concatenate((c.start[bare], c.start[sep]))
    return start, np.concatenate((span[bare], span[sep]))


class SsnDetector(DigitDetector):
    """US Social Security numbers."""

    name = "ssn"
    group = "pii"
    max_len = 11 * 2
    context = 48

    def find(self, chunk: Chunk) -> Hits:
        parts = []
        for view in views(chunk):
            start, span = candidates(view)
            if start.size == 0:
                continue
            ok = valid_ssn(gather_digits(view, start, span, 9, plain=span == 9))
            parts.append(Hits.of(view.to_chunk(start[ok]), span[ok] * view.width, view.encoding))
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        text = hit.text()
        digits = text.replace(" ", "").replace("-", "")  # digits and separators only
        separated = len(text) == 11
        details = {"format": "dashed" if "-" in text else "spaced" if separated else "bare"}
        details.update(context.ssn_confidence(hit, separated))
        return Described(digits.encode(), mask_ssn(digits), details)


def mask_ssn(digits: str) -> str:
    """Show only the last four digits."""
    return "***-**-" + digits[-4:]
