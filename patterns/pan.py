"""Primary account numbers (card numbers): 13-19 digits, plain or grouped with spaces or
dashes, Luhn-valid, with an issuer (IIN) prefix and a length that brand issues. ASCII and
UTF-16LE. A PAN inside a longer unbroken digit run is not a PAN; one standing beside other
digit groups ("4111111111111111 12/25") is (:func:`_inside_chains`).

The IIN table below was reviewed (issue 11) against Wikipedia's "Payment card number" IIN
table, braintree/credit-card-type (``src/lib/card-types.ts``), Fivell/credit_card_validations
(``lib/data/brands.yaml``) and d-edge/Cardizer (generators that follow the Wikipedia table);
python-stdnum checks only the Luhn digit (``stdnum.luhn``) and has no IIN table. Decisions,
per network (in = a row below):

- in, active: Visa, Mastercard (51-55, 2221-2720), Amex, Discover (6011, 622126-622925,
  644-649, 65), JCB (3528-3589), Diners (300-305, 3095, 36, 38-39), UnionPay (62, 81),
  Maestro, Mir, RuPay, Verve (506099-506198, 507865-507964, 650002-650027), Troy (9792; its
  65 cards are in Discover's range and reported as discover), Dankort (5019, 16 digits; the
  Visa/Dankort 4571 is Visa), InstaPayment (637-639), InterPayment (636), UATP (1, 15 digits:
  airline cards, a payment network of their own; reported below the default threshold unless
  a card keyword precedes it, see ``CONTEXT_ONLY``), BORICA (2205), Humo (9860), UzCard (8600,
  5614), GPN (1946, 50, 56, 58, 60-63; 16, 18 or 19 digits), UkrCard (604001-604200),
  LankaPay (357111, inside JCB's range). Elo and Hipercard ranges lie inside Visa, Discover,
  GPN, InterPayment and RuPay rows and are reported under those names.
- in, retired: Switch (4903, 4905, 4911, 4936, 564182, 633110, 6333; its 6759 is Maestro
  UK's), Solo (6334,
  6767), Australian Bankcard (5610, 560221-560225), Laser (6304, 6706, 6709, 6771), JCB's
  15-digit 1800 and 2131: the networks are gone but their numbers still sit in old systems'
  data and memory, and a PAN stays cardholder data after its card expires (PCI DSS protects
  the PAN itself). Their ranges are narrow, so they add little noise.
- out: Diners Club enRoute (2014, 2149: no check digit, so any 15 digits there would match),
  China T-Union (31, 19 digits: a transit stored-value card, not a payment network), 12-digit
  Maestro (12-digit numbers are everywhere; 13-19 is kept).

Separators: a grouped PAN has 4-4-4-4 style groups (``GROUPINGS``) joined by single spaces or
dashes. Mixed separators (``5105-1051 0510-5100``) are accepted, as bulk_extractor and
Presidio's credit-card recognizer accept them: the grouping, Luhn and IIN checks are what
keep precision, and people and forms do mix them; only a consistent grouping earns the
grouping bonus in ``details.confidence`` (``details.separator`` is ``mixed``).
"""

from __future__ import annotations

import numpy as np

from patterns import context
from patterns.base import Chunk, Described, Hit, Hits
from patterns.digits import (
    DASH,
    MAX_GROUPS,
    SPACE,
    Chains,
    DigitDetector,
    TextView,
    bit_index,
    gather_digits,
    group_key,
    is_in,
    luhn_ok,
    set_bits,
    views,
)

_ANY = (13, 14, 15, 16, 17, 18, 19)
_16_19 = (16, 17, 18, 19)
_16_18_19 = (16, 18, 19)
# IIN / brand table (ISO/IEC 7812 ranges as the schemes publish them). Order matters: the first
# row that matches wins, so narrower ranges come before the wider ones they sit inside.
# (brand, first prefix, last prefix, prefix digits, valid lengths)
IIN_TABLE: list[tuple[str, int, int, int, tuple[int, ...]]] = [
    ("jcb", 1800, 1800, 4, (15,)),
    ("gpn", 1946, 1946, 4, _16_18_19),
    ("uatp", 1, 1, 1, (15,)),
    ("jcb", 2131, 2131, 4, (15,)),
    ("mir", 2200, 2204, 4, _16_19),
    ("borica", 2205, 2205, 4, (16,)),
    ("mastercard", 2221, 2720, 4, (16,)),
    ("mastercard", 51, 55, 2, (16,)),
    ("amex", 34, 34, 2, (15,)),
    ("amex", 37, 37, 2, (15,)),
    ("diners", 300, 305, 3, (14, 15, 16, 17, 18, 19)),
    ("diners", 3095, 3095, 4, (14, 15, 16, 17, 18, 19)),
    ("diners", 36, 36, 2, (14, 15, 16, 17, 18, 19)),
    ("diners", 38, 39, 2, (14, 15, 16, 17, 18, 19)),
    ("lankapay", 357111, 357111, 6, (16,)),
    ("jcb", 3528, 3589, 4, _16_19),
    ("switch", 4903, 4903, 4, _16_18_19),
    ("switch", 4905, 4905, 4, _16_18_19),
    ("switch", 4911, 4911, 4, _16_18_19),
    ("switch", 4936, 4936, 4, _16_18_19),
    ("visa", 4, 4, 1, (13, 16, 19)),
    ("verve", 506099, 506198, 6, _16_18_19),
    ("verve", 507865, 507964, 6, _16_18_19),
    ("rupay", 508, 508, 3, (16,)),
    ("maestro", 5018, 5018, 4, _ANY),
    ("dankort", 5019, 5019, 4, (16,)),
    ("maestro", 5020, 5020, 4, _ANY),
    ("maestro", 5038, 5038, 4, _ANY),
    ("gpn", 50, 50, 2, _16_18_19),
    ("bankcard", 560221, 560225, 6, (16,)),
    ("bankcard", 5610, 5610, 4, (16,)),
    ("uzcard", 5614, 5614, 4, (16,)),
    ("switch", 564182, 564182, 6, _16_18_19),
    ("gpn", 56, 56, 2, _16_18_19),
    ("maestro", 5893, 5893, 4, _ANY),
    ("gpn", 58, 58, 2, _16_18_19),
    ("discover", 6011, 6011, 4, _16_19),
    ("ukrcard", 604001, 604200, 6, _16_19),
    ("rupay", 60, 60, 2, (16,)),
    ("discover", 622126, 622925, 6, _16_19),
    ("unionpay", 62, 62, 2, _16_19),
    ("maestro", 6304, 6304, 4, _ANY),
    ("switch", 633110, 633110, 6, _16_18_19),
    ("switch", 6333, 6333, 4, _16_18_19),
    ("solo", 6334, 6334, 4, _16_18_19),
    ("interpayment", 636, 636, 3, _16_19),
    ("instapayment", 637, 639, 3, (16,)),
    ("gpn", 60, 63, 2, _16_18_19),
    ("discover", 644, 649, 3, _16_19),
    ("verve", 650002, 650027, 6, _16_18_19),
    ("rupay", 6521, 6522, 4, (16,)),
    ("discover", 65, 65, 2, _16_19),
    ("laser", 6706, 6706, 4, _16_19),
    ("laser", 6709, 6709, 4, _16_19),
    ("maestro", 6759, 6759, 4, _ANY),
    ("maestro", 6761, 6763, 4, _ANY),
    ("solo", 6767, 6767, 4, _16_18_19),
    ("laser", 6771, 6771, 4, _16_19),
    ("rupay", 81, 82, 2, (16,)),
    ("unionpay", 810, 810, 3, _16_19),
    ("unionpay", 8110, 8171, 4, _16_19),
    ("uzcard", 8600, 8600, 4, (16,)),
    ("troy", 9792, 9792, 4, (16,)),
    ("humo", 9860, 9860, 4, (16,)),
]

#: brands whose bare numbers are too common in memory to alert on without a card keyword
#: before them (UATP: any 15 digits starting with 1, like message ids and counters): their
#: confidence drops below the default threshold then
CONTEXT_ONLY = frozenset({"uatp"})

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
MIN_DIGITS, MAX_DIGITS = 13, 19


def _brand_table() -> np.ndarray:
    """[length - MIN_DIGITS, first six digits] -> brand index (-1: none): the IIN table
    applied once to every 6-digit prefix (7 MB), so a batch of candidates costs one gather.
    Rows are painted last to first, so the first matching row wins as the table says."""
    out = np.full((MAX_DIGITS - MIN_DIGITS + 1, 10**6), -1, np.int8)
    for brand, lo, hi, digits, lengths in reversed(IIN_TABLE):
        scale = 10 ** (6 - digits)
        for n in lengths:
            if MIN_DIGITS <= n <= MAX_DIGITS:
                out[n - MIN_DIGITS, lo * scale : (hi + 1) * scale] = _BRANDS.index(brand)
    return out


_BRAND_BY_PREFIX = _brand_table()
_POW6 = 10 ** np.arange(5, -1, -1)


def brand_of(digits: np.ndarray, ndig: np.ndarray) -> np.ndarray:
    """Brand index (into ``_BRANDS``) per row of right-aligned ``digits``, -1 when no IIN
    range issues that prefix at that length (first matching table row wins)."""
    first = digits.shape[1] - ndig
    cols = np.minimum(first[:, None] + np.arange(6)[None, :], digits.shape[1] - 1)
    p6 = np.take_along_axis(digits, cols, 1).astype(np.int64) @ _POW6
    n = np.clip(ndig, MIN_DIGITS, MAX_DIGITS) - MIN_DIGITS
    brand = _BRAND_BY_PREFIX[n, p6].astype(np.int64)
    return np.where((ndig >= MIN_DIGITS) & (ndig <= MAX_DIGITS), brand, -1)


_GROUP_KEYS = np.array(sorted(group_key(g) for g in GROUPINGS))
_FIRST_GROUPS = np.array(sorted({g[0] for g in GROUPINGS}))


#: longest grouped PAN in characters: 19 digits in 5 groups
GROUPED_MAX = 19 + 4


def candidates(view: TextView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text-index (start, span, separators) of every whole digit chain in ``view`` that is a
    plain 13-19 digit run or one of the accepted groupings (separators consistent or mixed),
    and of the PANs inside longer chains (:func:`_inside_chains`). Candidates may share a
    start (a chain and its leading groups): :func:`longest_per_start` keeps one."""
    c = view.chains()
    span = c.end - c.start
    plain = (c.links == 0) & (span >= 13) & (span <= 19)
    ok = plain | ((c.links > 0) & is_in(c.key, _GROUP_KEYS))
    # the chain analysis gives no grouping key to mixed separators: work theirs out here
    mixed = np.flatnonzero((c.key == -1) & (c.links >= 2) & (c.links <= 4) & (span >= 15)
                           & (span <= GROUPED_MAX))
    key = _prefix_keys(c.bits[mixed], span[mixed], c.links[mixed])[0]
    ok[mixed[is_in(key[np.arange(mixed.size), c.links[mixed]], _GROUP_KEYS)]] = True
    s2, n2, l2 = _inside_chains(view, c)
    return (np.concatenate((c.start[ok], s2)), np.concatenate((span[ok], n2)),
            np.concatenate((c.links[ok], l2)))


_U = np.uint64  # chain bit words
_ONES = ~_U(0)


def _inside_chains(view: TextView, c: Chains) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PAN candidates a separated chain holds although the whole chain is none: a PAN
    followed or preceded by more digits after a space or dash ("4111111111111111 12/25",
    "4111 1111 1111 1111 12/25", "1225 5105105105105100"). Every unbroken run of 13-19
    digits in the chain (a run bounded by separators is a number of its own; a PAN-looking
    part of an unbroken longer run still is none), the chain's first 2-5 groups when they
    form an accepted grouping and more groups follow, and a group of 13-19 digits the chain
    analysis dropped before the chain for being glued to a word ("a4111111111111111 12").

    Worked out on each chain's separator bits (``Chains.bits``, <= 64 characters): a few
    uint64 operations per chain instead of reading its characters."""
    span = c.end - c.start
    sel = np.flatnonzero((c.links > 0) & (span >= MIN_DIGITS + 1))
    s, n = c.start[sel], span[sel]
    digit = ~(c.bits[sel] << _U(1)) & (_ONES >> (_U(64) - n.astype(_U)))  # bit k: text s+k
    out = [_runs(s, digit), _leading_groups(s, n, c.bits[sel], c.links[sel]), _glued_group(view, c)]
    return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
            np.concatenate([o[2] for o in out]))


def _runs(start: np.ndarray, digit: np.ndarray) -> tuple[np.ndarray, ...]:
    """(start, length, 0) of the runs of MIN_DIGITS..MAX_DIGITS set bits of ``digit`` (one
    uint64 per chain, bit k for text ``start + k``)."""
    first = digit & ~(digit << _U(1))  # a run's first bit
    last = digit & ~(digit >> _U(1))  # a run's last bit
    e2 = digit & (digit >> _U(1))  # bit p: bits p .. p+1 all set
    e4 = e2 & (e2 >> _U(2))
    e8 = e4 & (e4 >> _U(4))
    e13 = e8 & (e4 >> _U(8)) & (digit >> _U(12))
    e20 = e8 & (e8 >> _U(8)) & (e4 >> _U(16))
    todo = first & e13 & ~e20  # first bits of runs of 13-19
    row = np.flatnonzero(todo)
    todo, last, out_s, out_n = todo[row], last[row], [], []
    while row.size:  # a chain holds at most 4 such runs
        low = todo & (~todo + _U(1))
        end = last & (~low + _U(1))  # last bits from the run's first on
        p0, p1 = bit_index(low), bit_index(end & (~end + _U(1)))
        out_s.append(start[row] + p0)
        out_n.append(p1 - p0 + 1)
        todo ^= low
        more = todo != 0
        row, todo, last = row[more], todo[more], last[more]
    s = np.concatenate(out_s) if out_s else np.zeros(0, np.int64)
    n = np.concatenate(out_n) if out_n else np.zeros(0, np.int64)
    return s, n, np.zeros(s.size, np.int64)


def _leading_groups(
    start: np.ndarray, span: np.ndarray, bits: np.ndarray, links: np.ndarray
) -> tuple[np.ndarray, ...]:
    """(start, span, separators) of the first 2..MAX_GROUPS groups of each chain that form an
    accepted grouping with at least one more group after them."""
    sel = np.flatnonzero(links >= 2)
    sel = sel[is_in(bit_index(bits[sel] & (~bits[sel] + _U(1))) + 1, _FIRST_GROUPS)]
    start, links = start[sel], links[sel]
    key, sep = _prefix_keys(bits[sel], span[sel], links)
    rank = np.arange(MAX_GROUPS)[None, :]
    row, j = np.nonzero((rank >= 1) & (rank < links[:, None]) & is_in(key, _GROUP_KEYS))
    return start[row], sep[row, j], j.astype(np.int64)


def _prefix_keys(
    bits: np.ndarray, span: np.ndarray, links: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two (chains, MAX_GROUPS) arrays read from each chain's separator bits: in column j,
    the ``group_key`` of its first j+1 groups, and the chain offset where group j ends
    (columns past ``links`` are meaningless)."""
    sep = 1 + set_bits(bits, MAX_GROUPS)  # offsets of the first separators, from the start
    rank = np.arange(MAX_GROUPS)[None, :]
    sep = np.where(rank == links[:, None], span[:, None], sep)  # the chain's end after its last
    groups = np.diff(sep, axis=1, prepend=-1) - 1  # group j ends at separator j
    key = np.cumsum(np.minimum(groups, 31) << (5 * rank), axis=1)
    return key, sep


#: characters read before a chain for a dropped glued group: its 13-19 digits and the
#: character before them
_BACK = MAX_DIGITS + 1


def _glued_group(view: TextView, c: Chains) -> tuple[np.ndarray, ...]:
    """(start, length, 0) of the 13-19 digit groups just before a chain and its separator,
    bounded by a non-digit before them: the chain analysis dropped them as glued to a word
    ("a4111111111111111 12/25": the chain is "12")."""
    before = view.byte_at(c.start - 1)
    at = np.flatnonzero((before == SPACE) | (before == DASH))  # few chains follow one
    # ... and a digit before it and 13 digits back (a cheap necessary test)
    at = at[(np.subtract(view.byte_at(c.start[at] - 2), 48, dtype=np.uint8) < 10)
            & (np.subtract(view.byte_at(c.start[at] - 1 - MIN_DIGITS), 48, dtype=np.uint8) < 10)]
    end = c.start[at] - 1  # the group's end (exclusive)
    chars = view.byte_at(end[:, None] - 1 - np.arange(_BACK)[None, :])  # backwards
    n = np.argmin(np.subtract(chars, 48, dtype=np.uint8) < 10, axis=1)  # digits before end
    ok = n >= MIN_DIGITS  # n <= MAX_DIGITS: a non-digit was found within _BACK
    return end[ok] - n[ok], n[ok], np.zeros(int(ok.sum()), np.int64)


def longest_per_start(start: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Indices of the longest of the spans at each start (one finding per chain start)."""
    order = np.lexsort((-span, start))
    first = np.ones(order.size, bool)
    first[1:] = start[order][1:] != start[order][:-1]
    return order[first]


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
            start, span, brand = start[ok], span[ok], brand[ok]
            one = longest_per_start(start, span)
            s, ln = view.to_chunk(start[one]), span[one] * view.width
            parts.append(Hits.of(s, ln, view.encoding, brand[one]))
        return Hits.concat(parts)

    def describe(self, hit: Hit) -> Described | None:
        text = hit.text()
        digits = text.replace(" ", "").replace("-", "")  # a chain: digits and separators
        details: dict = {"brand": _BRANDS[hit.tag], "digits": len(digits)}
        sep = {" ": "space", "-": "dash"}
        kinds = {sep[ch] for ch in text if ch in sep}
        if kinds:
            details["separator"] = kinds.pop() if len(kinds) == 1 else "mixed"
        if digits in TEST_PANS:
            details["test"] = True
        # a consistent grouping is how card numbers are displayed; a mixed one is weaker
        grouped = details.get("separator", "mixed") != "mixed"
        details.update(context.card_confidence(hit, grouped=grouped))
        if details["brand"] in CONTEXT_ONLY and "keyword" not in details:
            details["confidence"] = round(max(0.05, details["confidence"] - 0.25), 2)
        return Described(digits.encode(), mask_pan(digits), details)


def mask_pan(digits: str) -> str:
    """PCI DSS 3.4.1 display: at most the first six and last four digits."""
    keep_head = 6 if len(digits) >= 16 else 4 if len(digits) >= 14 else 2
    return digits[:keep_head] + "*" * (len(digits) - keep_head - 4) + digits[-4:]
