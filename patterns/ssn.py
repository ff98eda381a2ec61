"""US Social Security numbers: ``ddd-dd-dddd`` and ``ddd dd dddd`` under the SSA's rules, and
bare nine-digit numbers only right after an SSN keyword. ASCII and UTF-16LE.

What is never anyone's SSN and is not reported at all (the SSA's rules, as python-stdnum's
``stdnum.us.ssn`` and Presidio's ``UsSsnRecognizer`` apply them): area 000, 666 or 900-999,
group 00, serial 0000. The SSA's advertising range 987-65-4320 .. 4329 lies in area 9xx.

What is public and is reported as such, not as a leak: numbers the SSA voided after they were
printed on sample cards, in advertising or in its own pamphlet (``PUBLISHED``, each with its
source), and placeholders people type into forms and test data: nine equal digits
(111-11-1111 ...) and runs of consecutive digits (123-45-6789, 876-54-3210 ...). They carry
``details.known`` naming what they are and confidence KNOWN_CONFIDENCE, below the default
threshold of 0.3: a scan shows them only with ``--min-confidence 0``, the way published test
card numbers carry ``details.test``. Presidio drops equal-digit numbers and 123456789 outright
and python-stdnum rejects its three published numbers; a forensic scan keeps the evidence but
does not alert on it: such a number in memory identifies nobody (tens of thousands of people
used 078-05-1120), and the odds that a real SSN is one of these ~50 numbers are below one in
ten million. Mixed separators (``123-45 6789``) are not an SSN, as in Presidio.
"""

from __future__ import annotations

import re

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Hit, Hits
from patterns.digits import DigitDetector, TextView, gather_digits, group_key, views

_FERREE = "1938 E. H. Ferree wallet sample card (SSA History, 'Misused SSNs'; python-stdnum)"
_AD = "printed in advertising (CPAN SSN::Validate 0.07, $ADVERTISING_SSN)"
#: Numbers the SSA voided or that were published, with where each is documented. Sources:
#: SSA History "Social Security Numbers: Misused SSNs" (ssa.gov/history/ssn/misused.html);
#: python-stdnum stdnum/us/ssn.py ``_ssn_blacklist``; Presidio UsSsnRecognizer
#: ``invalidate_result``; CPAN SSN::Validate 0.07 ``$ADVERTISING_SSN``; Wikipedia "Social
#: Security number", section "SSNs used in advertising".
PUBLISHED: dict[str, str] = {
    "078051120": _FERREE,
    "219099999": "1940 SSA pamphlet facsimile card (SSA History, 'Misused SSNs'; python-stdnum)",
    "457555462": "LifeLock advertising (python-stdnum; Wikipedia 'Social Security number')",
    "002281852": "sample number on invalid-SSN lists (neopragma javatypes Ssn.java)",
    "042103580": _AD,
    "062360749": _AD,
    "095073645": _AD,
    "128036045": _AD,
    "135016629": _AD,
    "141186941": _AD,
    "165167999": _AD,
    "165187999": _AD,
    "165207999": _AD,
    "165227999": _AD,
    "165247999": _AD,
    "189092294": _AD,
    "212097694": _AD,
    "212099999": _AD,
    "306302348": _AD,
    "308125070": _AD,
    "468288779": _AD,
    "549241889": _AD,
}
#: confidence of a published number or placeholder: below the default --min-confidence (0.3)
KNOWN_CONFIDENCE = 0.1
# one literal first byte lets the regex engine skip ahead fast
KEYWORDS = re.compile(rb"s(?:sn|s ?#|\.s\.n|ocial security|oc\.? ?sec)")
KEYWORD_LONGEST = len("social security")  # characters of the longest KEYWORDS match
KEYWORD_WINDOW = 24  # characters between a keyword's end and a bare number's start


def valid_ssn(digits: np.ndarray) -> np.ndarray:
    """SSA validity of each row of nine digits (int8): area, group and serial rules only
    (published numbers and placeholders are valid here and qualified by ``describe``)."""
    d = digits.astype(np.int64)
    area = d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]
    group = d[:, 3] * 10 + d[:, 4]
    serial = d[:, 5] * 1000 + d[:, 6] * 100 + d[:, 7] * 10 + d[:, 8]
    return (
        (area != 0)
        & (area != 666)
        & (area < 900)
        & (group != 0)
        & (serial != 0)
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
        known = known_ssn(digits)
        if known:
            details.update(known=known, confidence=KNOWN_CONFIDENCE)
        return Described(digits.encode(), mask_ssn(digits), details)


def known_ssn(digits: str) -> str | None:
    """What a published number or placeholder is (None for any other nine digits)."""
    if digits in PUBLISHED:
        return PUBLISHED[digits]
    if len(set(digits)) == 1:
        return "placeholder: nine equal digits"
    steps = {(int(b) - int(a)) % 10 for a, b in zip(digits, digits[1:], strict=False)}
    if steps in ({1}, {9}):
        return "placeholder: consecutive digits"
    return None


def mask_ssn(digits: str) -> str:
    """Show only the last four digits."""
    return "***-**-" + digits[-4:]
