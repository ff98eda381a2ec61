"""US Social Security numbers: ``ddd-dd-dddd`` and ``ddd dd dddd`` under the SSA's rules, and
bare nine-digit numbers only right after an SSN keyword. ASCII and UTF-16LE."""

from __future__ import annotations

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Detector, Hit, Hits
from patterns.digits import TextView, gather_digits, views

# Numbers the SSA voided or that were published (wallet inserts, advertising) and so are not
# anyone's SSN; SSA rules reject area 000, 666 and 900-999, group 00 and serial 0000 besides.
KNOWN_INVALID = frozenset({"078051120", "219099999", "457555462", "123456789"})
_KNOWN_INVALID = np.array(sorted(int(x) for x in KNOWN_INVALID), np.int64)
KEYWORDS = (b"ssn", b"ss#", b"ss #", b"s.s.n", b"social security", b"soc sec", b"soc. sec")
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
        & ~np.isin(number, _KNOWN_INVALID)
    )


def candidates(view: TextView) -> tuple[np.ndarray, np.ndarray]:
    """Text (start, span) of separated 3-2-4 chains and keyword-led bare 9-digit runs."""
    r = view.runs()
    n = r.start.size
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z
    prev_link = np.concatenate(([0], r.link[:-1]))
    bare = (r.length == 9) & (r.link == 0) & (prev_link == 0)
    bare_idx = np.flatnonzero(bare)
    bare_idx = bare_idx[view.has_word_before(r.start[bare_idx], KEYWORDS, KEYWORD_WINDOW)]
    idx = np.flatnonzero((r.link[: max(n - 2, 0)] != 0) & (prev_link[: max(n - 2, 0)] == 0))
    ok = (
        (r.length[idx] == 3)
        & (r.length[idx + 1] == 2)
        & (r.length[idx + 2] == 4)
        & (r.link[idx + 1] == r.link[idx])
        & (r.link[idx + 2] == 0)
    )
    idx = idx[ok]
    start = np.concatenate((r.start[bare_idx], r.start[idx]))
    span = np.concatenate((r.length[bare_idx], r.end[idx + 2] - r.start[idx]))
    return start, span


class SsnDetector(Detector):
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
            ok = valid_ssn(gather_digits(view, start, span, 9))
            parts.append(Hits.of(view.to_chunk(start[ok]), span[ok] * view.width, view.encoding))
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        text = hit.text()
        digits = "".join(ch for ch in text if ch.isdigit())
        separated = len(text) == 11
        details = {"format": "dashed" if "-" in text else "spaced" if separated else "bare"}
        details.update(context.ssn_confidence(hit, separated))
        return Described(digits.encode(), mask_ssn(digits), details)


def mask_ssn(digits: str) -> str:
    """Show only the last four digits."""
    return "***-**-" + digits[-4:]
