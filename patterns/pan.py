"""Primary account numbers (card numbers): 13-19 digits, plain or grouped with one consistent
space or dash, Luhn-valid, with an issuer (IIN) prefix and a length that brand issues.
ASCII and UTF-16LE. A PAN inside a longer digit or digit-group run is not a PAN."""

from __future__ import annotations

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Hit, Hits
from patterns.digits import (
    DigitDetector,
    TextView,
    gather_digits,
    group_key,
    is_in,
    luhn_ok,
    views,
)

# IIN / brand table (ISO/IEC 7812 ranges as the schemes publish them). Order matters: the first
# row that matches wins, so narrower ranges come before the wider ones they sit inside.
# (brand, first prefix, last prefix, prefix digits, valid lengths)
IIN_TABLE: list[tuple[str, int, int, int, tuple[int, ...]]] = [
    ("mir", 2200, 2204, 4, (16, 17, 18, 19)),
    ("mastercard", 2221, 2720, 4, (16,)),
    ("mastercard", 51, 55, 2, (16,)),
    ("amex", 34, 34, 2, (15,)),
    ("amex", 37, 37, 2, (15,)),
    ("diners", 300, 305, 3, (14, 15, 16, 17, 18, 19)),
    ("diners", 3095, 3095, 4, (14, 15, 16, 17, 18, 19)),
    ("diners", 36, 36, 2, (14, 15, 16, 17, 18, 19)),
    ("diners", 38, 39, 2, (14, 15, 16, 17, 18, 19)),
    ("jcb", 3528, 3589, 4, (16, 17, 18, 19)),
    ("visa", 4, 4, 1, (13, 16, 19)),
    ("verve", 506099, 506198, 6, (16, 18, 19)),
    ("rupay", 508, 508, 3, (16,)),
    ("maestro", 5018, 5018, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 5020, 5020, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 5038, 5038, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 5893, 5893, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 6304, 6304, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 6759, 6759, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", 6761, 6763, 4, (13, 14, 15, 16, 17, 18, 19)),
    ("discover", 6011, 6011, 4, (16, 17, 18, 19)),
    ("rupay", 60, 60, 2, (16,)),
    ("discover", 622126, 622925, 6, (16, 17, 18, 19)),
    ("discover", 644, 649, 3, (16, 17, 18, 19)),
    ("verve", 650002, 650027, 6, (16, 18, 19)),
    ("rupay", 6521, 6522, 4, (16,)),
    ("discover", 65, 65, 2, (16, 17, 18, 19)),
    ("unionpay", 62, 62, 2, (16, 17, 18, 19)),
    ("rupay", 81, 82, 2, (16,)),
    ("troy", 9792, 9792, 4, (16,)),
]

# Published test card numbers (processors' documentation): reported, flagged details.test.
TEST_PANS = frozenset(
    {
        "4111111111111111",
        "4012888888881881",
        "4222222222222",
        "4242424242424242",
        "4000056655665556",
        "4000000000000002",
        "4000000000000077",
        "4917610000000000",
        "4000000000000010",
        "4444333322221111",
        "4005550000000001",
        "4012000033330026",
        "5555555555554444",
        "5105105105105100",
        "5200828282828210",
        "2223003122003222",
        "5454545454545454",
        "2222400010000008",
        "5425233430109903",
        "378282246310005",
        "371449635398431",
        "378734493671000",
        "343434343434343",
        "6011111111111117",
        "6011000990139424",
        "6011000400000000",
        "6011601160116611",
        "3530111333300000",
        "3566002020360505",
        "3566111111111113",
        "30569309025904",
        "38520000023237",
        "36227206271667",
        "36700102000000",
        "6200000000000005",
        "6221260000000000",
        "6759649826438453",
        "6304000000000000",
    }
)

# Digit-group layouts accepted for separated PANs (group lengths, left to right).
GROUPINGS: tuple[tuple[int, ...], ...] = (
    (4, 4, 4, 1),
    (4, 4, 4, 2),
    (4, 4, 4, 3),
    (4, 4, 4, 4),
    (4, 4, 4, 4, 1),
    (4, 4, 4, 4, 2),
    (4, 4, 4, 4, 3),
    (4, 6, 5),
    (4, 6, 4),
)

_BRANDS = sorted({row[0] for row in IIN_TABLE})
# The table as arrays for one broadcast comparison per batch of candidates.
_ROW_BRAND = np.array([_BRANDS.index(r[0]) for r in IIN_TABLE])
_ROW_LO = np.array([r[1] for r in IIN_TABLE], np.int64)
_ROW_HI = np.array([r[2] for r in IIN_TABLE], np.int64)
_ROW_DIV = np.array([10 ** (6 - r[3]) for r in IIN_TABLE], np.int64)
_ROW_LEN = np.zeros((20, len(IIN_TABLE)), bool)  # [length, row]: row issues that length
for _j, _row in enumerate(IIN_TABLE):
    _ROW_LEN[list(_row[4]), _j] = True


def brand_of(digits: np.ndarray, ndig: np.ndarray) -> np.ndarray:
    """Brand index (into ``_BRANDS``) per row of right-aligned ``digits``, -1 when no IIN
    range issues that prefix at that length (first matching table row wins)."""
    first = digits.shape[1] - ndig
    cols = np.minimum(first[:, None] + np.arange(6)[None, :], digits.shape[1] - 1)
    six = np.take_along_axis(digits, cols, 1).astype(np.int64)
    p6 = six @ (10 ** np.arange(5, -1, -1))
    pk = p6[:, None] // _ROW_DIV[None, :]
    m = (pk >= _ROW_LO) & (pk <= _ROW_HI) & _ROW_LEN[np.minimum(ndig, 19)]
    hit = m.any(axis=1)
    return np.where(hit, _ROW_BRAND[np.argmax(m, axis=1)], -1)


_GROUP_KEYS = np.array(sorted(group_key(g) for g in GROUPINGS))


def candidates(view: TextView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text-index (start, span, separators) of every whole digit chain in ``view`` that is a
    plain 13-19 digit run or one of the accepted groupings with one consistent separator."""
    c = view.chains()
    span = c.end - c.start
    plain = (c.links == 0) & (span >= 13) & (span <= 19)
    ok = plain | ((c.links > 0) & is_in(c.key, _GROUP_KEYS))
    return c.start[ok], span[ok], c.links[ok]


def validate(
    view: TextView, start: np.ndarray, span: np.ndarray, links: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ok mask, brand index) for candidate spans (``links`` separators each; none if not
    given): Luhn, then the IIN/length table."""
    if start.size == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    if links is None:
        links = np.zeros(start.size, np.int64)
    ndig = span - links
    digits = gather_digits(view, start, span, 19, plain=links == 0)
    ok = luhn_ok(digits, ndig)
    brand = np.full(start.size, -1, np.int64)
    brand[ok] = brand_of(digits[ok], ndig[ok])  # a tenth of them: Luhn first
    return ok & (brand >= 0), brand


class PanDetector(DigitDetector):
    """Card numbers (PAN)."""

    name = "pan"
    group = "cards"
    version = "1"
    max_len = 23 * 2  # 19 digits + 4 separators, UTF-16LE
    context = 48

    def find(self, chunk: Chunk) -> Hits:
        parts = []
        for view in views(chunk):
            start, span, links = candidates(view)
            ok, brand = validate(view, start, span, links)
            s, ln = view.to_chunk(start[ok]), span[ok] * view.width
            parts.append(Hits.of(s, ln, view.encoding, brand[ok]))
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        text = hit.text()
        digits = text.replace(" ", "").replace("-", "")  # a chain: digits and separators
        details: dict = {"brand": _BRANDS[hit.tag], "digits": len(digits)}
        if len(digits) != len(text):
            details["separator"] = "space" if " " in text else "dash"
        if digits in TEST_PANS:
            details["test"] = True
        details.update(context.card_confidence(hit, grouped=len(digits) != len(text)))
        return Described(digits.encode(), mask_pan(digits), details)


def mask_pan(digits: str) -> str:
    """PCI DSS 3.4.1 display: at most the first six and last four digits."""
    keep_head = 6 if len(digits) >= 16 else 4 if len(digits) >= 14 else 2
    return digits[:keep_head] + "*" * (len(digits) - keep_head - 4) + digits[-4:]
