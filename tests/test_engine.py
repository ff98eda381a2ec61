"""Engine + detector properties: any valid secret planted anywhere, in either encoding, with
any chunk size and any out-of-order page layout, is found exactly once at its GPA; invalid
ones never are."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patterns.base import Chunk, Described, Detector, Hit, Hits
from patterns.pan import IIN_TABLE
from patterns.registry import select
from scanner.engine import Engine, ScanConfig
from tests.plant import (
    PAGE,
    encode,
    first_brand,
    group,
    luhn_digit,
    make_pan,
    make_ssn,
    memory_image,
)

NPAGES = 8
SETTINGS = settings(max_examples=60)


def background(seed: int, kind: str) -> bytearray:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytearray(NPAGES * PAGE)
    if kind == "text":
        words = np.frombuffer(b"lorem ipsum dolor sit amet card holder ", np.uint8)
        return bytearray(words[rng.integers(0, words.size, NPAGES * PAGE)].tobytes())
    data = rng.integers(0, 256, NPAGES * PAGE, dtype=np.uint8)
    data[(data >= 0x30) & (data <= 0x39)] = 0x41  # no stray digits glued to the plant
    return bytearray(data.tobytes())


def scan(memory: bytes, order: list[int], chunk: int, detectors: str = "all"):
    """Findings over ``memory`` stored as pages in ``order`` with 8 bytes of '7' between them:
    junk a detector would glue on if it joined pages that are not adjacent in the guest."""
    eng = Engine(ScanConfig(select(detectors), key=b"k" * 32, chunk_size=chunk))
    return eng.scan_image(memory_image(memory, order, junk=0x37)).findings


plant_args = dict(
    seed=st.integers(0, 2**32 - 1),
    where=st.integers(0, NPAGES * PAGE - 64),
    enc=st.sampled_from(["ascii", "utf-16le"]),
    chunk=st.sampled_from([4096, 4104, 8192 + 8, 65536, 262144]),
    kind=st.sampled_from(["zeros", "text", "random"]),
    shuffle=st.booleans(),
)


def plant(seed, where, enc, kind, text, end=" "):
    """``text`` planted at about ``where`` in a background, a space before it and ``end``
    after it: (memory, GPA of the text, its length in bytes)."""
    mem = background(seed, kind)
    raw = encode(f" {text}{end}", enc)
    where = min(where, len(mem) - len(raw))
    mem[where : where + len(raw)] = raw
    return bytes(mem), where + len(encode(" ", enc)), len(encode(text, enc))


def layout(seed, shuffle):
    order = list(range(NPAGES))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


@SETTINGS
@given(sep=st.sampled_from(["", " ", "-"]), **plant_args)
def test_any_valid_pan_found_once_at_its_gpa(seed, where, enc, chunk, kind, shuffle, sep):
    pan = make_pan(random.Random(seed))
    mem, gpa, length = plant(seed, where, enc, kind, group(pan, sep))
    found = [f for f in scan(mem, layout(seed, shuffle), chunk) if f.detector == "pan"]
    assert [(f.gpa, f.length, f.encoding) for f in found] == [(gpa, length, enc)]
    assert found[0].masked.endswith(pan[-4:]) and pan not in found[0].masked


def _luhn_valid(digits: str) -> bool:
    return luhn_digit(digits[:-1]) == digits[-1]


@SETTINGS
@given(after=st.text("0123456789", min_size=1, max_size=8), link=st.sampled_from(" -"),
       grouped=st.sampled_from(["", " ", "-"]), **plant_args)
def test_any_valid_pan_followed_by_a_digit_group_found_once_at_its_gpa(
    seed, where, enc, chunk, kind, shuffle, after, link, grouped
):
    """A PAN (any IIN row, any length; plain or grouped) and then a separator and 1-8 more
    digits (an expiry, a CVV, an amount): the PAN is found once at its GPA — unless its
    groups and the digits after them read as one longer valid grouped PAN, which is then
    the finding (one per chain, the longest)."""
    pan = make_pan(random.Random(seed))
    text = group(pan, grouped)
    mem, gpa, whole = plant(seed, where, enc, kind, f"{text}{link}{after}")
    length = len(encode(text, enc))
    longer = pan + after  # 4-4-4-4 and 1-3 digits: an accepted 17-19 digit grouping
    if grouped and len(pan) == 16 and len(after) <= 3 and first_brand(longer) \
            and _luhn_valid(longer):
        length = whole
    found = [f for f in scan(mem, layout(seed, shuffle), chunk) if f.detector == "pan"]
    assert [(f.gpa, f.length, f.encoding) for f in found] == [(gpa, length, enc)]


@pytest.mark.parametrize("text, pan", [
    ("card 4111111111111111 12/25", "4111111111111111"),
    ("4111 1111 1111 1111 12/25", "4111 1111 1111 1111"),
    ("pan 4111111111111111 1225", "4111111111111111"),
    ("5105105105105100 0000", "5105105105105100"),
    ("exp 1225 5105105105105100", "5105105105105100"),
    ("5105-1051-0510-5100-0000", "5105-1051-0510-5100"),
    ("a4111111111111111 12/25", "4111111111111111"),  # glued to a word before it
    ("4111111111111111 12 34 56", "4111111111111111"),
])
def test_pan_beside_another_digit_group_found_once(text, pan):
    for enc in ("ascii", "utf-16le"):
        found = [f for f in _found(text, "pan", enc) if f.detector == "pan"]
        w = len(encode(" ", enc))
        assert [(f.gpa, f.length) for f in found] == [
            (5000 + w + w * text.index(pan), w * len(pan))
        ], (text, enc)


def test_pan_like_part_of_an_unbroken_longer_run_with_groups_not_reported():
    for text in ("41111111111111110 12/25", "14111111111111111 0000", "1225 51051051051051009"):
        for enc in ("ascii", "utf-16le"):
            assert [f for f in _found(text, "pan", enc) if f.detector == "pan"] == [], text


def test_expiry_after_a_pan_does_not_lower_its_confidence():
    """An expiry right after a PAN is how card data is written: "12/25" raises the
    confidence, a bare digit group leaves it as for the PAN alone."""
    def conf(text):
        (f,) = _found(text, "pan", "ascii")
        return f.details["confidence"]

    alone = conf("4111111111111111")
    assert conf("4111111111111111 12/25") > alone
    assert conf("4111111111111111 1225") == alone


@SETTINGS
@given(sep=st.sampled_from(["-", " "]), bare=st.booleans(), **plant_args)
def test_any_valid_ssn_found_once_at_its_gpa(seed, where, enc, chunk, kind, shuffle, sep, bare):
    ssn = make_ssn(random.Random(seed))
    text = f"SSN: {ssn}" if bare else f"{ssn[:3]}{sep}{ssn[3:5]}{sep}{ssn[5:]}"
    mem, gpa, length = plant(seed, where, enc, kind, text)
    if bare:
        w = 2 if enc == "utf-16le" else 1
        gpa, length = gpa + 5 * w, 9 * w
    found = [f for f in scan(mem, layout(seed, shuffle), chunk) if f.detector == "ssn"]
    assert [(f.gpa, f.length) for f in found] == [(gpa, length)]
    assert found[0].masked == "***-**-" + ssn[-4:]


@SETTINGS
@given(track=st.sampled_from(["track1", "track2"]), sentinels=st.booleans(), **plant_args)
def test_any_valid_track_found_once_and_subsumes_its_pan(
    seed, where, enc, chunk, kind, shuffle, track, sentinels
):
    rng = random.Random(seed)
    pan = make_pan(rng)
    exp = f"{rng.randint(20, 39):02d}{rng.randint(1, 12):02d}"
    if track == "track1":
        text = f"B{pan}^DOE/JANE^{exp}101000000000"
        text = f"%{text}?" if sentinels else text
    else:
        text = f"{pan}={exp}1011234567"
        text = f";{text}?" if sentinels else text
    # a line end after the track: Track 1 discretionary data may hold spaces and letters up
    # to a '?', so a space there could continue it into the background ("... A ?")
    mem, gpa, length = plant(seed, where, enc, kind, text, end="\n")
    found = scan(mem, layout(seed, shuffle), chunk)
    assert [(f.detector, f.gpa, f.length) for f in found] == [(track, gpa, length)]
    assert pan not in found[0].masked


def _found(text: str, detectors: str, enc: str) -> list:
    mem, _, _ = plant(1, 5000, enc, "text", text)
    return scan(mem, list(range(NPAGES)), 4096 + 8, detectors)


def _absent(text: str, detectors: str):
    for enc in ("ascii", "utf-16le"):
        found = _found(text, detectors, enc)
        assert found == [], (text, enc, found)


@settings(max_examples=80)
@given(seed=st.integers(0, 2**32 - 1), change=st.integers(1, 9))
def test_luhn_invalid_pan_never_reported(seed, change):
    pan = make_pan(random.Random(seed))
    bad = pan[:-1] + str((int(pan[-1]) + change) % 10)
    _absent(bad, "cards")


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    lead=st.sampled_from("0789"),
    extra=st.sampled_from("0123456789"),
)
def test_wrong_iin_and_overlong_runs_never_reported(seed, lead, extra):
    from tests.plant import luhn_digit

    rng = random.Random(seed)
    body = (
        lead + ("0" if lead in "89" else "") + "".join(rng.choice("0123456789") for _ in range(13))
    )
    _absent(body + luhn_digit(body), "pan")  # no issuer starts so
    pan = make_pan(rng)
    for longer in (extra + pan, pan + extra):  # embedded in a longer digit run
        for enc in ("ascii", "utf-16le"):
            # the longer run may itself be a valid PAN; the embedded one never is reported
            assert all(f.length != len(encode(pan, enc)) for f in _found(longer, "pan", enc))


@settings(max_examples=60)
@given(
    area=st.sampled_from([0, 666, 900, 950, 999, 123]),
    grp=st.integers(0, 99),
    serial=st.integers(0, 9999),
)
def test_invalid_ssn_never_reported(area, grp, serial):
    if area == 123:  # otherwise valid area: make the group or serial the invalid part
        grp, serial = (0, serial) if serial % 2 else (grp, 0)
    _absent(f"{area:03d}-{grp:02d}-{serial:04d}", "ssn")


def test_overlong_and_unkeyed_bare_ssn_not_reported():
    # (published numbers such as 078-05-1120: tests/test_card_rules.py)
    for s in ("1234-56-7890", "12-345-6789-0"):
        _absent(s, "ssn")
    _absent("order 234567890 shipped", "ssn")


def test_duplicate_pages_reported_once():
    mem = bytearray(NPAGES * PAGE)
    mem[100:118] = b" 4111111111111111 "
    found = scan(bytes(mem), [0, 1, 0, 2, 3, 4, 5, 6, 7, 0], 8192)
    assert [(f.detector, f.gpa) for f in found] == [("pan", 101)]


def test_confidence_from_context():
    def conf(text: str) -> float:
        mem, _, _ = plant(3, 3000, "ascii", "zeros", text)
        (f,) = scan(mem, list(range(NPAGES)), 65536, "pan")
        return f.confidence

    plain = conf("4556737586899855")
    assert conf("card number: 4556737586899855 exp 09/27") > plain
    assert conf("0x4556737586899855") < plain
    assert conf("ff4556737586899855") < plain


class _Marker(Detector):
    """A minimal detector with no context at all: the bytes ``<KEY>``."""

    name = "marker"
    group = "test"
    max_len = 5
    context = 0

    def find(self, chunk: Chunk) -> Hits:
        d = chunk.data
        if d.size < 5:
            return Hits.empty()
        m = np.ones(d.size - 4, bool)
        for k, ch in enumerate(b"<KEY>"):
            m &= d[k : d.size - 4 + k] == ch
        return Hits.of(np.flatnonzero(m), 5, 0)

    def describe(self, hit: Hit) -> Described:
        return Described(hit.raw, "<***>", {})


@settings(max_examples=40)
@given(page=st.integers(0, NPAGES - 1), end=st.booleans(), shuffle=st.booleans(),
       seed=st.integers(0, 1000))
def test_context_free_match_at_an_extent_edge_found_once(page, end, shuffle, seed):
    mem = bytearray(NPAGES * PAGE)
    at = page * PAGE + (PAGE - 5 if end else 0)  # touching the page's last or first byte
    mem[at : at + 5] = b"<KEY>"
    eng = Engine(ScanConfig([_Marker()], key=b"k" * 32, chunk_size=8192))
    found = eng.scan_image(memory_image(bytes(mem), layout(seed, shuffle), 0x37)).findings
    assert [f.gpa for f in found] == [at]


def test_every_format_found_at_every_alignment():
    """Stage 1 judges aligned 8-byte blocks: every PAN length and grouping, both SSN forms
    (and a bare one after a keyword) and both tracks are found at each of the 16 byte offsets
    modulo two blocks, in both encodings, amid text sparse in digits."""
    rng = random.Random(7)
    visa = [k for k, row in enumerate(IIN_TABLE) if row[0] == "visa"][0]
    diners = [k for k, row in enumerate(IIN_TABLE) if row[0] == "diners"][0]
    pans = [make_pan(rng, diners if n in (14, 15, 17, 18) else visa, n) for n in range(13, 20)]
    texts = [("pan", group(pan, sep)) for pan in pans for sep in ("", " ", "-")]
    ssn = make_ssn(rng)
    texts += [("ssn", f"{ssn[:3]}{s}{ssn[3:5]}{s}{ssn[5:]}") for s in ("-", " ")]
    texts += [("ssn", f"SSN#{ssn};")]  # a bare one: 9 digits, no space around
    pan = pans[3]
    texts += [("track2", f";{pan}=2512101123400001?"), ("track1", f"%B{pan}^DOE/JANE^2512101?")]
    for enc in ("ascii", "utf-16le"):
        mem = background(3, "text") * 16
        plants, at = [], 1000
        for det, text in texts:
            for off in range(16):
                raw = encode(f" {text} ", enc)
                pos = at - at % 16 + off
                mem[pos : pos + len(raw)] = raw
                skip = len(encode(" SSN#" if text.startswith("SSN") else " ", enc))
                plants.append((det, pos + skip))
                at = pos + len(raw) + 700
        assert at < len(mem)
        eng = Engine(ScanConfig(select("all"), key=b"k" * 32, chunk_size=256 * 1024))
        image = memory_image(bytes(mem), list(range(len(mem) // PAGE)), 0x37)
        found = eng.scan_image(image).findings
        assert set(plants) <= {(f.detector, f.gpa) for f in found}


def test_ssn_keyword_up_to_24_characters_before_the_number():
    ssn = make_ssn(random.Random(3))
    for enc in ("ascii", "utf-16le"):
        for gap, found in ((0, 1), (12, 1), (24, 1), (25, 0)):
            mem = background(3, "text") * 4
            text = f"social security{'x' * (gap - 2)}: {ssn}" if gap else f"SSN{ssn}"
            raw = encode(f" {text} ", enc)
            mem[5001 : 5001 + len(raw)] = raw
            image = memory_image(bytes(mem), list(range(len(mem) // PAGE)), 0x37)
            hits = Engine(ScanConfig(select("ssn"), key=b"k" * 32)).scan_image(image).findings
            assert len(hits) == found, (enc, gap)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from([1, 7, 64, 100])), min_size=1,
                max_size=30), st.data())
def test_layout_read_into_scratch_equals_fresh(pages: list[tuple[int, int]], data) -> None:
    """A gathered read into a reused scratch array (left holding garbage by an earlier use)
    is byte for byte the read into a fresh zeroed array: every gap is zeroed."""
    from parsers.base import Extents, Segment
    from patterns.scratch import buffer
    from scanner.engine import SCRATCH_KEEP, _Layout

    buf = np.random.default_rng(len(pages)).integers(1, 256, 128 * len(pages), np.uint8)
    ext = Extents.build([128 * k for k in range(len(pages))], [128 * a for a, _ in pages],
                        [n for _, n in pages])  # fmt: skip
    layout = _Layout.of([Segment(buf, ext, "f")], 256)
    a = data.draw(st.integers(0, layout.size - 1))
    b = data.draw(st.integers(a + 1, layout.size))
    buffer("engine.test", layout.size, np.uint8, keep=SCRATCH_KEEP).fill(0xAA)
    fresh, _ = layout.read(a, b)
    into, copied = layout.read(a, b, "test")
    assert np.array_equal(into, fresh)
