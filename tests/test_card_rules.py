"""Card and SSN rules of issue 11: published SSNs and placeholders reported as known and below
the default threshold, the Track 1 alphabet, every IIN table row, mixed separators."""

from __future__ import annotations

import random
import re

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from patterns import pan
from patterns.base import ASCII, ENCODINGS, Chunk, Described, Detector, Hit
from patterns.digits import TextView
from patterns.pan import GROUPINGS, IIN_TABLE, PanDetector
from patterns.ssn import PUBLISHED, SsnDetector
from patterns.track import Track1Detector
from tests.plant import encode, first_brand, make_pan

DEFAULT_MIN_CONFIDENCE = 0.3  # scanner/cli.py's default --min-confidence


def detect(detector: Detector, text: str, enc: str = "ascii") -> list[tuple[str, Described]]:
    """(matched text, description) of every match of ``detector`` in ``text`` set in spaces."""
    pad = encode(" " * 40, enc)
    data = np.frombuffer(pad + encode(text, enc) + pad, np.uint8)
    hits = detector.find(Chunk(data))
    out = []
    tags = [0] * len(hits) if hits.tag is None else hits.tag.tolist()
    for s, n, e, tag in zip(hits.start.tolist(), hits.length.tolist(), hits.encoding.tolist(),
                            tags, strict=True):
        c = detector.context
        hit = Hit(data[s : s + n].tobytes(), ENCODINGS[e], data[max(0, s - c) : s].tobytes(),
                  data[s + n : s + n + c].tobytes(), tag)
        d = detector.describe(hit)
        if d is not None:
            out.append((hit.text(), d))
    return out


# ---- SSN ----------------------------------------------------------------------------------------


def _known_below_threshold(text: str, enc: str) -> None:
    found = detect(SsnDetector(), text, enc)
    assert len(found) == 1, (text, found)
    details = found[0][1].details
    assert details["known"] and details["confidence"] < DEFAULT_MIN_CONFIDENCE, details


@settings(max_examples=60)
@given(digit=st.sampled_from("0123456789"), sep=st.sampled_from(["-", " ", ""]),
       enc=st.sampled_from(["ascii", "utf-16le"]))
def test_any_equal_digit_ssn_is_a_known_placeholder_below_the_threshold(digit, sep, enc):
    """Every all-same-digit SSN is either never reported (areas 000, 666 and 9xx are never
    issued) or reported as a known placeholder below the default threshold."""
    d = digit * 9
    text = f"{d[:3]}{sep}{d[3:5]}{sep}{d[5:]}" if sep else f"SSN: {d}"
    if digit in "069":  # areas 000, 666, 999 are never issued: not reported at all
        assert detect(SsnDetector(), text, enc) == []
        return
    _known_below_threshold(text, enc)
    assert "equal digits" in detect(SsnDetector(), text, enc)[0][1].details["known"]


@settings(max_examples=40)
@given(first=st.integers(0, 9), down=st.booleans(), enc=st.sampled_from(["ascii", "utf-16le"]))
def test_any_consecutive_digit_ssn_is_a_known_placeholder(first, down, enc):
    d = "".join(str((first + (-k if down else k)) % 10) for k in range(9))
    text = f"{d[:3]}-{d[3:5]}-{d[5:]}"
    if d[0] == "9":  # area 9xx (987-65-4321 ...) is never an SSN
        assert detect(SsnDetector(), text, enc) == []
        return
    _known_below_threshold(text, enc)


def test_every_published_ssn_is_known_with_its_source():
    assert len(PUBLISHED) >= 20
    for number, source in PUBLISHED.items():
        _known_below_threshold(f"{number[:3]}-{number[3:5]}-{number[5:]}", "ascii")
        assert detect(SsnDetector(), f"{number[:3]}-{number[3:5]}-{number[5:]}", "ascii")[0][
            1
        ].details["known"] == source


def test_an_ordinary_ssn_is_not_known():
    ((_, d),) = detect(SsnDetector(), "SSN 536-90-4399")
    assert "known" not in d.details and d.details["confidence"] >= DEFAULT_MIN_CONFIDENCE


def test_mixed_ssn_separators_are_not_an_ssn():
    assert detect(SsnDetector(), "536-90 4399") == []


# ---- Track 1 -----------------------------------------------------------------------------------

#: ISO/IEC 7811-2 Track 1 characters a name may hold: 0x20-0x5F without % ^ ?
NAME_CHARS = "".join(chr(c) for c in range(0x20, 0x60) if chr(c) not in "%^?")


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), name=st.text(NAME_CHARS, min_size=2, max_size=26),
       enc=st.sampled_from(["ascii", "utf-16le"]))
def test_any_name_in_the_track1_alphabet_is_found(seed, name, enc):
    pan = make_pan(random.Random(seed))
    text = f"%B{pan}^{name}^2512101000123?"
    assert [t for t, _ in detect(Track1Detector(), text, enc)] == [text]


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), name=st.text(NAME_CHARS, min_size=1, max_size=25),
       lower=st.sampled_from("abcdefghijklmnopqrstuvwxyz"), at=st.integers(0, 25),
       sentinels=st.booleans(), enc=st.sampled_from(["ascii", "utf-16le"]))
def test_any_lower_case_track1_name_is_rejected(seed, name, lower, at, sentinels, enc):
    pan = make_pan(random.Random(seed))
    name = name[:at] + lower + name[at:]
    text = f"B{pan}^{name}^2512101000123"
    text = f"%{text}?" if sentinels else text
    assert detect(Track1Detector(), text, enc) == []


def test_track1_discretionary_data_keeps_to_its_alphabet():
    pan = make_pan(random.Random(5))
    # with an end sentinel: any Track 1 character up to it
    text = f"%B{pan}^DOE/JANE^2512101 0A1 ?"
    assert [t for t, _ in detect(Track1Detector(), text)] == [text]
    # without one: the digits only (what follows is not part of the track)
    assert [t for t, _ in detect(Track1Detector(), f"B{pan}^DOE/JANE^2512101000 NEXT")] == [
        f"B{pan}^DOE/JANE^2512101000"
    ]


# ---- IIN table and separators ---------------------------------------------------------------


@settings(max_examples=150)
@given(row=st.integers(0, len(IIN_TABLE) - 1), seed=st.integers(0, 2**32 - 1),
       sep=st.sampled_from(["", " ", "-", "mixed"]))
def test_every_iin_row_is_found_with_its_brand(row, seed, sep):
    rng = random.Random(seed)
    pan = make_pan(rng, row)
    groups = [pan[i : i + 4] for i in range(0, len(pan), 4)]
    if sep == "mixed":
        seps = [rng.choice(" -") for _ in groups[1:]]
        seps[0], seps[-1] = "-", " "  # at least one of each
        text = groups[0] + "".join(s + g for s, g in zip(seps, groups[1:], strict=True))
    else:
        text = sep.join(groups) if sep else pan
    found = detect(PanDetector(), text)  # 13-19 digits as 4-4-4-x: an accepted grouping
    assert [t for t, _ in found] == [text]
    details = found[0][1].details
    assert details["brand"] == first_brand(pan)
    assert details.get("separator") == {"": None, " ": "space", "-": "dash"}.get(sep, "mixed")


def test_dankort_is_found():
    ((_, d),) = detect(PanDetector(), "card 5019 7170 1010 3742")
    assert d.details["brand"] == "dankort"


def test_mixed_separators_score_below_a_consistent_grouping():
    ((_, mixed),) = detect(PanDetector(), "5105-1051 0510-5100")
    ((_, dashed),) = detect(PanDetector(), "5105-1051-0510-5100")
    assert mixed.details["separator"] == "mixed"
    assert DEFAULT_MIN_CONFIDENCE <= mixed.details["confidence"] < dashed.details["confidence"]


def test_uatp_needs_a_card_keyword():
    # a mailing-list message id from a man page in the benchmark image: 15 digits, Luhn-valid
    ((_, bare),) = detect(PanDetector(), "kernel&m=110260821123863&w=2")
    ((_, keyed),) = detect(PanDetector(), "UATP card number 110260821123863")
    assert bare.details["brand"] == keyed.details["brand"] == "uatp"
    assert bare.details["confidence"] < DEFAULT_MIN_CONFIDENCE <= keyed.details["confidence"]


# ---- PANs inside longer chains ------------------------------------------------------------------

#: digit groups of lengths near the groupings' and the PAN lengths' edges, and separators
GROUP = st.sampled_from([1, 2, 3, 4, 4, 4, 5, 6, 12, 13, 16, 19, 20]).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n))
DIGIT_TEXT = st.lists(st.one_of(GROUP, st.sampled_from([" ", " ", "-", "a", "/"])),
                      max_size=40).map(lambda parts: "".join(parts).encode())


@settings(max_examples=300)
@given(text=DIGIT_TEXT)
@example(text=b"a4111111111111111111 12 3456789")  # a 19-digit group glued to a word
@example(text=b"x4111111111111-1234567 4111 1111 1111 1111 1 2")
def test_pans_inside_chains_read_like_the_text(text):
    """The bit-level reading of chains finds what a plain reading of each chain's text does:
    13-19 digit groups of a chain with separators, its first 2-5 groups when they form an
    accepted grouping and more follow, and a 13-19 digit group glued to a word just before
    it and its separator."""
    data = np.frombuffer(text, np.uint8)
    zero = np.zeros(1, np.int64)
    view = TextView(data, ASCII, 0, (zero, zero), data)
    t, c = text, view.chains()
    want = set()
    for s, e, links in zip(c.start.tolist(), c.end.tolist(), c.links.tolist(), strict=True):
        if links > 0 and e - s >= 14:
            groups = [(m.start() + s, len(m.group())) for m in re.finditer(rb"\d+", t[s:e])]
            want |= {(a, n, 0) for a, n in groups if 13 <= n <= 19}
            for j in range(1, min(len(groups) - 1, 5)):
                if tuple(n for _, n in groups[: j + 1]) in GROUPINGS:
                    want.add((s, groups[j][0] + groups[j][1] - s, j))
        glued = re.search(rb"(?<!\d)\d{13,19}$", t[: max(s - 1, 0)])
        if s >= 2 and t[s - 1 : s] in (b" ", b"-") and glued:
            want.add((glued.start(), len(glued.group()), 0))
    got = pan._inside_chains(view, c)
    assert set(zip(*(a.tolist() for a in got), strict=True)) == want
