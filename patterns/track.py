"""Magnetic-stripe track data (ISO/IEC 7813): sensitive authentication data that PCI DSS
forbids storing at all after authorization (requirement 3.2.1).

- Track 1: ``%B`` PAN ``^`` NAME ``^`` YYMM service-code discretionary ``?``
- Track 2: ``;`` PAN ``=`` YYMM service-code discretionary ``?``

Sentinels are optional (applications often keep the data without them); the PAN must pass
the same Luhn and IIN checks as a bare PAN. ASCII and UTF-16LE.

Each field keeps to its alphabet. Track 1 is written in the 6-bit alphabet of ISO/IEC 7811-2
(the characters 0x20-0x5F: space, digits, upper-case letters, punctuation; no lower case)
with ``%``, ``^`` and ``?`` reserved as start sentinel, field separator and end sentinel, so
the name (2-26 characters, ISO/IEC 7813) is any of the other 61 characters and text with a
lower-case letter there is not track data. The PAN, expiry (YYMM, month 01-12) and service
code are digits. The discretionary data may use the whole alphabet, which only an end
sentinel delimits: up to a ``?`` it is any alphabet character, without one only the digits
that follow (what Visa, Mastercard and Amex put there). Track 2 (ISO/IEC 7811-2 5-bit
alphabet) is digits with ``=`` as separator.
"""

from __future__ import annotations

import re

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Hit, Hits
from patterns.digits import Chains, DigitDetector, TextView, views
from patterns.pan import _BRANDS, mask_pan, validate

EQ, CARET, B, SEMI, QMARK, PCT = (ord(c) for c in "=^B;?%")

#: the Track 1 alphabet (0x20-0x5F) without its sentinels and separator (% ? ^)
T1_DATA = rb"[\x20-\x24\x26-\x3e\x40-\x5d\x5f]"
TRACK1 = re.compile(
    rb"(%?)B(\d{13,19})\^(" + T1_DATA + rb"{2,26})\^(\d\d)(\d\d)(\d{3})"
    rb"(?:(" + T1_DATA + rb"{0,60})(\?)|(\d{0,60}))"
)
TRACK1_MAX = 79  # characters, sentinels and LRC included
TRACK2_MAX_DATA = 37  # characters between the sentinels


def _lone_pans(view: TextView) -> tuple[Chains, np.ndarray, np.ndarray]:
    """The view's chains, their spans, and indices of lone 13-19 digit chains (a track's
    PAN has no separators)."""
    c = view.chains()
    span = c.end - c.start
    return c, span, np.flatnonzero((c.links == 0) & (span >= 13) & (span <= 19))


def _month_ok(view: TextView, pos: np.ndarray) -> np.ndarray:
    m1 = view.byte_at(pos).astype(np.int64) - 48
    m2 = view.byte_at(pos + 1).astype(np.int64) - 48
    month = m1 * 10 + m2
    return (month >= 1) & (month <= 12)


class Track2Detector(DigitDetector):
    """Track 2 data: PAN, '=', expiry, service code, discretionary digits."""

    name = "track2"
    group = "cards"
    max_len = (TRACK2_MAX_DATA + 3) * 2
    context = 32
    subsumes = ("pan",)

    def find(self, chunk: Chunk) -> Hits:
        parts = []
        for view in views(chunk):
            c, span, i = _lone_pans(view)
            i = i[i < span.size - 1]
            i = i[
                (view.byte_at(c.end[i]) == EQ)
                & (c.start[i + 1] == c.end[i] + 1)
                & (c.links[i + 1] == 0)
                & (span[i] + 1 + span[i + 1] <= TRACK2_MAX_DATA)
            ]
            i = i[_month_ok(view, c.start[i + 1] + 2)]
            ok, brand = validate(view, c.start[i], span[i])
            i, brand = i[ok], brand[ok]
            start = c.start[i] - (view.byte_at(c.start[i] - 1) == SEMI)
            end = c.end[i + 1] + (view.byte_at(c.end[i + 1]) == QMARK)
            parts.append(
                Hits.of(view.to_chunk(start), (end - start) * view.width, view.encoding, brand)
            )
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        text = hit.text()
        pan, rest = text.strip(";?").split("=", 1)
        details = {
            "brand": _BRANDS[hit.tag],
            "pan": mask_pan(pan),
            "sentinels": text.startswith(";") and text.endswith("?"),
            "confidence": context.card_confidence(hit, grouped=False)["confidence"],
        }
        details["confidence"] = max(details["confidence"], 0.9)
        masked = f"{';' if text.startswith(';') else ''}{mask_pan(pan)}={'*' * len(rest)}"
        return Described(text.strip(";?").encode(), masked, details)


class Track1Detector(DigitDetector):
    """Track 1 data: format code B, PAN, '^', name, '^', expiry, service code, discretionary."""

    name = "track1"
    group = "cards"
    max_len = TRACK1_MAX * 2
    context = 32
    subsumes = ("pan",)

    def find(self, chunk: Chunk) -> Hits:
        parts = []
        for view in views(chunk):
            c, _, i = _lone_pans(view)
            i = i[(view.byte_at(c.start[i] - 1) == B) & (view.byte_at(c.end[i]) == CARET)]
            starts, spans, brands = [], [], []
            # Candidates ('B' + 13-19 digits + '^') are rare outside real track data, so the
            # full grammar is checked per candidate on a short slice.
            for b_at in (c.start[i] - 1).tolist():
                lo = b_at - 1 if b_at > 0 and view.text[b_at - 1] == PCT else b_at
                m = TRACK1.match(view.chunk_text(lo, TRACK1_MAX + 1))
                if m is None or not 1 <= int(m.group(5)) <= 12 or m.end() > TRACK1_MAX:
                    continue
                ok, brand = validate(view, np.array([lo + m.start(2)]), np.array([len(m.group(2))]))
                if ok[0]:
                    starts.append(lo)
                    spans.append(m.end())
                    brands.append(brand[0])
            if starts:
                st = np.asarray(starts, np.int64)
                parts.append(
                    Hits.of(
                        view.to_chunk(st), np.asarray(spans) * view.width, view.encoding, brands
                    )
                )
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        m = TRACK1.fullmatch(hit.text().encode("latin-1", "replace"))
        if m is None:
            return None
        pan = m.group(2).decode()
        masked = f"{m.group(1).decode()}B{mask_pan(pan)}^{'*' * len(m.group(3))}^****"
        details = {
            "brand": _BRANDS[hit.tag],
            "pan": mask_pan(pan),
            "sentinels": bool(m.group(1)) and m.group(8) is not None,
            "confidence": 0.95,
        }
        value = hit.text().strip("%?").encode("latin-1", "replace")
        return Described(value, masked, details)
