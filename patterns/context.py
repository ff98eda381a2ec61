"""Confidence from the text around a match (runs once per reported match, never per byte).

Real memory is full of digit strings that pass Luhn by chance (locale tables, hex dumps, IDs,
timestamps). Context separates them: a card or SSN keyword shortly before, an expiry date
shortly after, raise confidence; hex digits or a longer numeric structure glued to the match
lower it. The result is ``details.confidence`` in [0, 1] (``--min-confidence`` filters on it)
and ``details.keyword`` when a keyword was seen.
"""

from __future__ import annotations

import re
from typing import Any

from patterns.base import Hit

CARD_WORDS = re.compile(
    r"(card|visa|master ?card|amex|american express|discover|credit|debit|"
    r"\bpan\b|\bcc\b|cc_?num|acct|account|payment|expir|\bexp\b|cvv|cvc|jcb|maestro)",
    re.I,
)
SSN_WORDS = re.compile(
    r"(\bssn\b|ss#|s\.s\.n|social security|soc\.? ?sec|\bsin\b|tax ?id|\btin\b)", re.I
)
EXPIRY = re.compile(r"^.{0,24}?\b(0[1-9]|1[0-2]) ?[/-] ?(\d\d|20\d\d)\b", re.S)
LETTER = re.compile(r"[A-Za-z]")
HEXISH = re.compile(r"[0-9a-fA-F]")
HEX_LETTER = re.compile(r"[a-fA-F]")
# a neighbouring hex word (hex dumps: "c0be 4819 1956 ...")
HEX_WORD_BEFORE = re.compile(r"(?:^|[\s:])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{2,16}[ :]$")
HEX_WORD_AFTER = re.compile(r"^[ :](?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{2,16}(?:$|[\s:])")
# a number glued on with punctuation, before or after the match
NUMBER_BEFORE = re.compile(r"\d[.,:/_+]")
NUMBER_AFTER = re.compile(r"[.,:/_+]\d")
# an identifier, counter or timestamp field: "id=", "uuid: ", "seq=", "ts=" ...
ID_FIELD = re.compile(
    r"(?:\b|_)(?:id|uid|uuid|guid|seq|nonce|ts|time|timestamp|offset|size|count|"
    r"hash|crc|tid|pid|inode|ino)[\"']?\s*[:=]\s*[\"']?$",
    re.I,
)


def text_around(hit: Hit) -> tuple[str, str]:
    """The context before and after a match, decoded like the match itself."""
    if hit.encoding == "utf-16le":
        b, a = hit.before, hit.after
        b = b[len(b) % 2 :]
        a = a[: len(a) - len(a) % 2]
        return b.decode("utf-16-le", "replace"), a.decode("utf-16-le", "replace")
    return hit.before.decode("latin-1"), hit.after.decode("latin-1")


def _glued(before: str, after: str) -> tuple[bool, bool]:
    """(hex context, long-number context) right at the match's edges: hex digits or a hex
    word next to it; a number glued on with '.', ',' ... or an identifier field's name."""
    b1, a1 = before[-1:], after[:1]
    b2, a2 = before[-2:], after[:2]
    hexy = bool(HEX_LETTER.match(b1) or HEX_LETTER.match(a1)) or b2.lower() == "0x"
    hexy = hexy or (len(b2) == 2 and HEXISH.fullmatch(b2) is not None and b1 in "0123456789")
    hexy = hexy or bool(HEX_WORD_BEFORE.search(before[-18:]) or HEX_WORD_AFTER.match(after))
    numeric = bool(NUMBER_BEFORE.fullmatch(b2) or NUMBER_AFTER.fullmatch(a2))
    numeric = numeric or bool(ID_FIELD.search(before[-24:]))
    return hexy, numeric


def _score(base: float, *adjust: float) -> float:
    return round(min(0.99, max(0.05, base + sum(adjust))), 2)


def _assess(
    hit: Hit, words: re.Pattern[str], reach: int
) -> tuple[str, str, dict[str, Any], bool, bool, bool]:
    """Shared context reading: (before, after, details with the keyword if one stands within
    ``reach`` characters before the match, keyword seen, hex context, long-number context)."""
    before, after = text_around(hit)
    out: dict[str, Any] = {}
    near = before[-reach:]
    # every keyword has a letter: most contexts in digit data have none (a fast C scan)
    kw = list(words.finditer(near)) if LETTER.search(near) else []
    if kw:
        out["keyword"] = kw[-1].group(0).lower()
    hexy, numeric = _glued(before, after)
    return before, after, out, bool(kw), hexy, numeric


def card_confidence(hit: Hit, grouped: bool) -> dict[str, Any]:
    """Confidence for a PAN-like match: keyword before (+0.3), expiry after (+0.15),
    digit grouping (+0.1), hex (-0.35) or longer-number (-0.25) context."""
    _, after, out, kw, hexy, numeric = _assess(hit, CARD_WORDS, 48)
    out["confidence"] = _score(
        0.5,
        0.3 if kw else 0.0,
        0.15 if EXPIRY.match(after) else 0.0,
        0.1 if grouped else 0.0,
        -0.35 if hexy else 0.0,
        -0.25 if numeric and not kw else 0.0,
    )
    return out


def ssn_confidence(hit: Hit, separated: bool) -> dict[str, Any]:
    """Confidence for an SSN-like match: keyword before (+0.35); dashes (+0.1);
    hex (-0.35) or longer-number (-0.25) context."""
    _, _, out, kw, hexy, numeric = _assess(hit, SSN_WORDS, 32)
    out["confidence"] = _score(
        0.45,
        0.35 if kw else 0.0,
        0.1 if separated and "-" in hit.text() else 0.0,
        -0.35 if hexy else 0.0,
        -0.25 if numeric else 0.0,
    )
    return out
