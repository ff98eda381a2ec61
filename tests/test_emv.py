"""EMV chip data (issue 11 part 3): any valid tag 5A / 57 record, binary or hex text (ASCII or
UTF-16LE, either case, glued to its neighbours), is found exactly once at its GPA through the
engine over shuffled pages; a record with a bad Luhn digit, month, length or padding never
is."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from patterns.pan import IIN_TABLE
from tests.plant import PAGE, make_pan

NPAGES = 8
HEXDIGITS = "0123456789ABCDEF"
FORMS = ["binary", "hex", "hex-lower", "utf-16le"]


def value57(pan: str, month: int, rng: random.Random, extra: int) -> str:
    """Track 2 Equivalent Data nibbles: PAN, D, YYMM, service code, discretionary digits, an F
    if the count is odd — ``extra`` discretionary digits, at most what 19 bytes hold."""
    room = 38 - (len(pan) + 1 + 4 + 3)
    disc = "".join(rng.choice("0123456789") for _ in range(min(extra, room)))
    v = f"{pan}D{rng.randint(20, 39):02d}{month:02d}{rng.choice(['101', '201', '226'])}{disc}"
    return v + "F" * (len(v) % 2)


def value5a(pan: str) -> str:
    return pan + "F" * (len(pan) % 2)


def tlv(tag: str, value: str, length: int | None = None) -> str:
    n = len(value) // 2 if length is None else length
    return f"{tag}{n:02X}{value}"


def encode(record: str, form: str, rng: random.Random) -> tuple[bytes, int, int]:
    """(bytes to plant, offset of the record in them, its length in bytes): binary TLV, or hex
    text glued to up to 12 random hex digits on each side."""
    if form == "binary":
        return bytes.fromhex(record), 0, len(record) // 2
    before = "".join(rng.choice(HEXDIGITS) for _ in range(2 * rng.randint(0, 6)))
    after = "".join(rng.choice(HEXDIGITS) for _ in range(2 * rng.randint(0, 6)))
    text = before + record + after
    if form == "hex-lower":
        text = text.lower()
    codec = "utf-16-le" if form == "utf-16le" else "ascii"
    w = 2 if form == "utf-16le" else 1
    return (" " + text + "\n").encode(codec), w * (1 + len(before)), w * len(record)


def background(seed: int) -> bytearray:
    """Random bytes (binary data and stray tag bytes) without digits (no stray digit runs)."""
    data = np.random.default_rng(seed).integers(0, 256, NPAGES * PAGE, dtype=np.uint8)
    data[(data >= 0x30) & (data <= 0x39)] = 0x41
    return bytearray(data.tobytes())


def plant(seed: int, where: int, blob: bytes) -> bytes:
    mem = background(seed)
    where = min(where, len(mem) - len(blob))
    mem[where : where + len(blob)] = blob
    return bytes(mem), where


record_args = dict(
    seed=st.integers(0, 2**32 - 1),
    row=st.integers(0, len(IIN_TABLE) - 1),
    form=st.sampled_from(FORMS),
    where=st.integers(0, NPAGES * PAGE - 120),
    chunk=st.sampled_from([4096, 4104, 65536]),
    shuffle=st.booleans(),
)


def layout(seed: int, shuffle: bool) -> list[int]:
    order = list(range(NPAGES))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


@settings(max_examples=50)
@given(tag=st.sampled_from(["5A", "57"]), month=st.integers(1, 12), extra=st.integers(0, 20),
       **record_args)
def test_any_valid_record_found_once_at_its_gpa(tag, month, extra, seed, row, form, where,
                                               chunk, shuffle, engine_scan):
    rng = random.Random(seed)
    pan = make_pan(rng, row)
    value = value5a(pan) if tag == "5A" else value57(pan, month, rng, extra)
    blob, off, length = encode(tlv(tag, value), form, rng)
    mem, at = plant(seed, where, blob)
    name = "emv-pan" if tag == "5A" else "emv-track2"
    # with the card detectors alone the binary records come from the EMV detectors' own pass;
    # with a secret detector as well, from the anchor pass it runs
    detectors = "cards" if seed % 2 else "cards,aws-key"
    everything = [f for f in engine_scan(mem, chunk, layout(seed, shuffle), detectors)
                  if f.detector != "aws-key"]
    found = [f for f in everything if f.detector.startswith("emv")]
    enc = {"binary": "binary", "utf-16le": "utf-16le"}.get(form, "ascii")
    assert [(f.detector, f.gpa, f.length, f.encoding) for f in found] == [
        (name, at + off, length, enc)]
    assert pan not in found[0].masked and found[0].masked.split()[1].startswith(pan[:2])
    # the record's PAN digits are not reported again as a bare PAN (digits glued on from the
    # random neighbours may form other numbers, reported as what they are)
    inside = [f for f in everything if f not in found
              and at + off <= f.gpa and f.gpa + f.length <= at + off + length]
    assert inside == []


def corrupt(kind: str, tag: str, pan: str, rng: random.Random) -> str:
    """A record that breaks one rule: the Luhn digit, the month, the length byte, the pad."""
    good = (lambda p: value5a(p)) if tag == "5A" else (lambda p: value57(p, 7, rng, 4))
    if kind == "luhn":
        bad = pan[:-1] + str((int(pan[-1]) + rng.randint(1, 9)) % 10)
        return tlv(tag, good(bad))
    if kind == "month":  # (5A has none: its Luhn digit then)
        if tag == "5A":
            return corrupt("luhn", tag, pan, rng)
        return tlv(tag, value57(pan, rng.choice([0, 13, 19, 20, 99]), rng, 4))
    if kind == "length":  # over the bound (5A: 10 bytes, 57: 19), or too short for 13 digits
        v = good(pan)
        if rng.random() < 0.5:
            big = {"5A": 11, "57": 20}[tag]
            v = (v + "0" * 60)[: 2 * big] if tag == "57" else (v.rstrip("F") + "F" * 40)[:22]
            return tlv(tag, v)
        return tlv(tag, v[: 2 * {"5A": 6, "57": 10}[tag]])
    # padding: an F before the last nibble, or another letter as the pad
    v = good(pan)
    cut = rng.randint(2, len(pan) - 2)
    if rng.random() < 0.5:
        return tlv(tag, (v[:cut] + "F" + v[cut + 1 :]))
    return tlv(tag, v[:-1] + rng.choice("ABCE") if v.endswith("F") else v[:-2] + "FF")


@settings(max_examples=50)
@given(tag=st.sampled_from(["5A", "57"]),
       kind=st.sampled_from(["luhn", "month", "length", "padding"]), **record_args)
def test_any_broken_record_never_reported(tag, kind, seed, row, form, where, chunk, shuffle,
                                         engine_scan):
    rng = random.Random(seed)
    record = corrupt(kind, tag, make_pan(rng, row), rng)
    blob, _, _ = encode(record, form, rng)
    mem, _ = plant(seed, where, blob)
    detectors = "emv-pan,emv-track2" if seed % 2 else "emv-pan,emv-track2,aws-key"
    found = [f for f in engine_scan(mem, chunk, layout(seed, shuffle), detectors)
             if f.detector != "aws-key"]
    assert found == [], (record, form, [(f.detector, f.masked) for f in found])


def test_template_and_details(engine_scan):
    pan = "4761739001010119"  # the tag-57 example of public EMV tag references
    record = tlv("57", value57(pan, 12, random.Random(1), 13))
    for template in ("70", "77"):
        blob = bytes.fromhex(f"{template}{len(record) // 2:02X}{record}")
        mem, at = plant(3, 5000, blob)
        (f,) = engine_scan(mem, 65536, None, "emv-track2")
        assert f.gpa == at + 2 and f.details["template"] == template
        assert f.details["brand"] == "visa" and f.details["form"] == "binary"
        assert f.masked.startswith("57 476173******0119D") and "*" * 6 in f.masked
    text = f"9F02060000000010005A08{pan}5F24032512319F1A020840".encode()
    mem, at = plant(4, 9000, text)
    (f,) = engine_scan(mem, 65536, None, "emv-pan")
    assert (f.gpa, f.length, f.details["form"]) == (at + 18, 20, "hex")
    assert "template" not in f.details and f.masked == "5A 476173******0119"


def test_lone_binary_5a_stays_below_the_threshold(engine_scan):
    # Python bytecode in the benchmark image: STORE_NAME 8 ('Z' 08), then LOAD_NAME/LOAD_CONST
    # with small arguments — BCD-valid bytes that read as a Luhn-valid Discover number
    code = b"Z\x08e\x04d\x06f\x02d\x07\x84\x01"
    mem, at = plant(5, 7000, b"\x00" + code)
    (f,) = engine_scan(mem, 65536, None, "emv-pan")
    assert f.gpa == at + 1 and f.details["confidence"] < 0.3 and "next_tag" not in f.details
    # the same ten bytes followed by the PAN sequence number (5F34) are a card record
    mem, at = plant(5, 7000, b"\x00" + code[:10] + bytes.fromhex("5F340101"))
    (f,) = engine_scan(mem, 65536, None, "emv-pan")
    assert f.details["next_tag"] == "5F34" and f.details["confidence"] >= 0.3


def test_both_binary_stage1_paths_give_the_same_headers():
    """The EMV detectors' own pass and the shared anchor pass (used when a key or secret
    detector already ran it on the chunk) find the same record headers."""
    from patterns import emv
    from patterns.base import Chunk
    from patterns.scratch import anchor_hits

    data = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8)
    data[1000:1002], data[4095:4097] = (0x5A, 0x08), (0x57, 0x13)  # one across a page edge
    own = Chunk(data)
    pos = emv._header_offsets(own)
    ok = np.isin(data[pos[:, None] + [0, 1]].view(np.uint16).ravel(),
                 [int.from_bytes(h, "little") for h in emv.HEADERS])
    shared = Chunk(data)
    anchor_hits(shared, b"\x02\x01")  # as the DER detectors do first
    assert shared.has("scratch.anchors")
    assert emv._header_offsets(shared).tolist() == pos[ok].tolist()
    assert {1000, 4095} <= set(pos[ok].tolist())


@settings(max_examples=200)
@given(data=st.lists(st.sampled_from([0x00, 0x06, 0x07, 0x0A, 0x0B, 0x13, 0x14, 0x56, 0x57, 0x58,
                                      0x5A, 0x5B, 0x80, 0x87, 0x93, 0xD7, 0xFF]),
                     max_size=300),
       block=st.sampled_from([8, 16, 64, 1 << 19]))
def test_header_pass_finds_every_tag_and_length_pair(data, block):
    """The binary header pass (block loop, 8-byte words, bytewise last word and tail) finds
    exactly the offsets of a tag byte 0x57 or 0x5A followed by a byte 7-19, at any size and any
    block size."""
    from unittest import mock

    from patterns import emv

    a = np.array(data, np.uint8)
    want = [p for p in range(a.size - 1)
            if a[p] in (0x57, 0x5A) and emv.LEN_LO <= a[p + 1] <= emv.LEN_HI]
    with mock.patch.object(emv, "BLOCK", block):
        assert emv._headers(a).tolist() == want
