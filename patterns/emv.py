"""EMV chip data in memory: ``emv-pan`` (tag 5A, Application Primary Account Number) and
``emv-track2`` (tag 57, Track 2 Equivalent Data), as POS terminal software holds them after
a chip transaction — binary BER-TLV, and the same records rendered as hex text in logs (ASCII
and UTF-16LE, upper or lower case, the tag, length and value glued together).

The record layouts are EMV 4.3 Book 3, Annex A (data element dictionary), as public tag
references give them (emvlab.org "EMV tag search" entries 5A and 57; payprobe.io EMV tag
reference):

- **5A**: format cn (compressed numeric: BCD digits, left-justified, padded on the right with
  hex F), up to 19 digits, 1-10 bytes.
- **57**: format b, up to 19 bytes: PAN (n, up to 19 digits), field separator hex D, expiry
  YYMM (n 4), service code (n 3), discretionary data (n, variable), one hex F to pad to whole
  bytes. Both appear standalone or inside the record templates 70 / 77; a record is found
  wherever it lies, and ``details.template`` says when it opens a 70 or 77 template.

A record is reported when its value is well formed — every nibble a decimal digit except 57's
single D and one F as the very last nibble; a 57 expiry month of 01-12 and at least the 7
digits of expiry and service code after the D — and its PAN passes the same checks as a card
number: 13-19 digits, Luhn, an issuer prefix and length of the IIN table (patterns/pan.py).
So a 5A's length byte is 7-10 in practice (13-19 digits), a 57's 11-19.

Stage 1, binary: the 13 headers (tag and a length byte in range) are anchors of the shared
anchor pass of patterns/scratch.py, read from it when a key or secret detector already ran it
on the chunk (every detector: no extra pass); otherwise per 512 KiB block two compares for the
two tag bytes (0x5A, 0x57), and only the 8-byte words holding one are looked into, a word at a
time for the length byte after each tag. Headers whose value does not start with six bytes of
decimal digits are dropped; the nibbles, month, Luhn and IIN checks run on the rest as arrays.
Hex text: the digit chains of the digit detectors' text views (patterns/digits.py, memoized
on the chunk: a record's PAN digits make its region hot and form a chain) — a 5A's PAN starts
a chain right after the letter A of its tag or length, a 57's ends one right before its
separator D — then the same checks on the text. No Python loop per byte or candidate. A
hex-text record whose PAN is glued into a run of more than 64 decimal digits (the longest chain
the digit stage keeps) is not found. Masked like a PAN: at most the first six and last four digits.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from patterns.base import BINARY, Chunk, Described, Detector, Hit, Hits
from patterns.context import text_around
from patterns.digits import TextView, luhn_ok, rows_with_digits, views
from patterns.pan import _BRANDS, TEST_PANS, brand_of, mask_pan
from patterns.scratch import ANCHOR_PASS, anchor_hits, buffer, gather, register_anchor

TAG_PAN, TAG_TRACK2 = 0x5A, 0x57
TEMPLATES = (0x70, 0x77)  # READ RECORD response / response message template format 2
MAX_VALUE = {TAG_PAN: 10, TAG_TRACK2: 19}  # bytes (Book 3 Annex A)
#: shortest value that can hold a valid record: 13 digits (7 bytes with the F pad); 13 digits,
#: D, YYMM and a 3-digit service code (21 nibbles: 11 bytes)
MIN_VALUE = {TAG_PAN: 7, TAG_TRACK2: 11}
PAN_MIN, PAN_MAX = 13, 19
SEP, PAD = 0xD, 0xF
AFTER_SEP = 7  # digits after 57's separator at least: YYMM and the service code
BLOCK = 512 * 1024  # binary stage-1 block: its scratch arrays stay in L2 (2 MiB)
_HEX_VALUE = np.full(256, 16, np.int16)  # hex character -> nibble (16: not hex)
for _i, _c in enumerate(b"0123456789ABCDEF"):
    _HEX_VALUE[_c] = _HEX_VALUE[_c | 0x20] = _i


# --- value checks, shared by both forms ---------------------------------------------------------


def _check(nib: np.ndarray, count: np.ndarray, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """For candidate values as nibble rows (``nib``: (n, 38) int16, ``count`` nibbles each,
    16 beyond): (valid, brand index). The structure is checked on every row; month, Luhn and
    IIN only on the few that pass it."""
    n = nib.shape[0]
    rows = np.arange(n)
    ndat = count - (nib[rows, np.maximum(count - 1, 0)] == PAD)  # nibbles before the pad
    big = (nib > 9) & (_NIBBLES[None, :] < ndat[:, None])  # letters among the data nibbles
    nbig = np.count_nonzero(big, axis=1)
    if tag == TAG_PAN:
        ndig = ndat
        ok = nbig == 0
    else:
        ndig = np.argmax(big, axis=1)  # the first letter: it must be the separator D
        ok = (nbig == 1) & (nib[rows, ndig] == SEP) & (ndat - ndig - 1 >= AFTER_SEP)
    ok &= (ndig >= PAN_MIN) & (ndig <= PAN_MAX)
    idx = np.flatnonzero(ok)
    if tag == TAG_TRACK2 and idx.size:
        month = nib[idx, ndig[idx] + 3] * 10 + nib[idx, ndig[idx] + 4]
        idx = idx[(month >= 1) & (month <= 12)]
    # the PAN right-aligned in PAN_MAX columns, for Luhn and the IIN table
    nd = ndig[idx]
    src = _NIBBLES[None, :PAN_MAX] - (PAN_MAX - nd)[:, None]
    digits = np.where(src >= 0, nib[idx[:, None], np.maximum(src, 0)], 0).astype(np.int8)
    good = luhn_ok(digits, nd)
    idx, digits, nd = idx[good], digits[good], nd[good]
    brand = np.full(n, -1, np.int64)
    brand[idx] = brand_of(digits, nd)
    return brand >= 0, brand


def _nibbles(values: np.ndarray) -> np.ndarray:
    """(n, 2k) nibbles of (n, k) bytes, high nibble first."""
    out = np.empty((values.shape[0], 2 * values.shape[1]), np.int16)
    out[:, 0::2] = values >> 4
    out[:, 1::2] = values & 15
    return out


# --- binary -------------------------------------------------------------------------------------


#: per-byte constants for 8 bytes at once (a little-endian uint64 word)
_EACH = np.uint64(0x0101010101010101)
_LOW7, _TOP = np.uint64(0x7F) * _EACH, np.uint64(0x80) * _EACH
LEN_LO, LEN_HI = MIN_VALUE[TAG_PAN], MAX_VALUE[TAG_TRACK2]  # every length byte a record can have


def _length_bytes(words: np.ndarray) -> np.ndarray:
    """Per byte of uint64 ``words``: 0x80 where it is a length byte LEN_LO-LEN_HI, else 0
    (bytes under 0x80 compared by adding, so no carry crosses into the next byte)."""
    low = words & _LOW7
    at_least = low + np.uint64(0x80 - LEN_LO) * _EACH  # top bit set: >= LEN_LO
    above = low + np.uint64(0x80 - LEN_HI - 1) * _EACH  # top bit set: > LEN_HI
    return at_least & ~above & ~words & _TOP


def _headers(data: np.ndarray) -> np.ndarray:
    """Sorted offsets ``p`` of a tag byte (0x5A or 0x57) followed by a length byte
    LEN_LO-LEN_HI: a superset of every record header. Per L2-sized block two compares at
    full width; then only the 8-byte words holding a tag byte (about 1 in 80 on memory-like
    data, mostly the letters W and Z of text) are looked into, as words: the byte after each
    byte is the word shifted by one byte, with the next word's first byte. (Measured: one
    subtract-and-compare for 0x57-0x5A instead finds twice the words and costs more.)"""
    n = data.size - data.size % 8
    words = data[:n].view(np.uint64)
    last = max(0, n - 8)  # the last word and the tail have no whole next word: done bytewise
    out = []
    for lo in range(0, last, BLOCK):
        b = data[lo : min(last, lo + BLOCK)]
        m = buffer("emv.m", b.size, np.bool_)
        m2 = buffer("emv.m2", b.size, np.bool_)
        np.equal(b, TAG_PAN, out=m)
        np.equal(b, TAG_TRACK2, out=m2)
        np.logical_or(m, m2, out=m)
        busy = buffer("emv.busy", b.size // 8, np.bool_)
        np.not_equal(m.view(np.uint64), 0, out=busy)  # a bool nonzero is the fast one
        w = np.flatnonzero(busy)
        g = lo // 8 + w
        after = (words[g] >> np.uint64(8)) | (words[g + 1] << np.uint64(56))
        head = m.view(np.uint64)[w] & (_length_bytes(after) >> np.uint64(7))
        hw = np.flatnonzero(head)
        r, c = np.nonzero(head[hw].view(np.uint8).reshape(-1, 8))
        out.append(8 * g[hw][r] + c)
    tail = data[last:]
    tag = (tail[:-1] == TAG_PAN) | (tail[:-1] == TAG_TRACK2)
    out.append(np.flatnonzero(tag & (tail[1:] - LEN_LO <= LEN_HI - LEN_LO)) + last)
    return np.concatenate(out)


#: candidates of one form: chunk start, length in bytes, encoding, value nibbles, nibble count
_Candidates = tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]
_NIBBLES = np.arange(2 * MAX_VALUE[TAG_TRACK2])


#: every TLV header (tag, length byte) that can open a valid record, as binary anchors of the
#: shared anchor pass (patterns/scratch.py): when keys or secrets run too, that pass finds them
#: at no extra cost
HEADERS = [bytes([t, n]) for t in (TAG_PAN, TAG_TRACK2)
           for n in range(MIN_VALUE[t], MAX_VALUE[t] + 1)]
for _header in HEADERS:
    register_anchor(_header, text=False)


def _header_offsets(chunk: Chunk) -> np.ndarray:
    """Sorted offsets of the chunk's record headers: from the anchor pass when another
    detector already ran it on this chunk, else from this module's own two-compare pass."""
    if chunk.has(ANCHOR_PASS):
        parts = [hits for h in HEADERS for _enc, _step, hits in anchor_hits(chunk, h)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return _headers(chunk.data)


#: value bytes every valid record starts with that hold PAN digits only (13 digits or more)
PURE_BCD = PAN_MIN // 2


def _binary(chunk: Chunk, out: dict[int, list[_Candidates]]) -> None:
    """Binary TLV candidates (from the tag byte) whose length byte fits and whose value
    starts with PURE_BCD bytes of two decimal digits each, added to ``out``. (On the 1 GiB
    memory-like benchmark image one header in seven passes that test: 16,600 of 114,000.)"""
    data = chunk.data
    pos = _header_offsets(chunk)
    pos = pos[pos + 2 + MIN_VALUE[TAG_PAN] <= data.size]
    tag, length = data[pos], data[pos + 1].astype(np.int64)
    lead = gather(data, pos + 2, PURE_BCD)
    bcd = np.all(((lead >> 4) < 10) & ((lead & 15) < 10), axis=1)
    for t in (TAG_PAN, TAG_TRACK2):
        keep = bcd & (tag == t) & (length >= MIN_VALUE[t]) & (length <= MAX_VALUE[t])
        keep[keep] = pos[keep] + 2 + length[keep] <= data.size
        if keep.any():
            p, ln = pos[keep], length[keep]
            nib = _nibbles(gather(data, p + 2, MAX_VALUE[TAG_TRACK2]))
            out[t].append((p, 2 + ln, BINARY, nib, 2 * ln))


def _hex(view: TextView, out: dict[int, list[_Candidates]]) -> None:
    """Hex-text candidates in a view, added to ``out``; found from the view's digit chains
    (memoized for the digit detectors): a 5A record's PAN digits start a chain right after a
    letter A (of the tag ``5A``, or of the length ``0A``), a 57 record's end one right before
    its separator D. Most views have neither."""
    c = view.chains()
    s = c.start[(view.byte_at(c.start - 1) | 0x20) == ord("a")]
    e = c.end[(view.byte_at(c.end) | 0x20) == ord("d")]
    for t, start in ((TAG_PAN, s), (TAG_TRACK2, e)):
        if start.size == 0:
            continue
        if t == TAG_PAN:  # the length 07-09 begins the chain, or 0A stands before it
            start = np.concatenate((start - 2, start - 4))
        else:  # 13-19 PAN digits before the D
            start = np.unique(start[:, None] - np.arange(PAN_MIN + 4, PAN_MAX + 5)[None, :])
        second = ord("a") if t == TAG_PAN else ord("7")
        start = start[((view.byte_at(start + 1) | 0x20) == second)
                      & (view.byte_at(start) == ord("5"))]
        ln = _HEX_VALUE[view.byte_at(start + 2)] * 16 + _HEX_VALUE[view.byte_at(start + 3)]
        keep = (ln >= MIN_VALUE[t]) & (ln <= MAX_VALUE[t])
        if keep.any():
            start, ln = start[keep], ln[keep].astype(np.int64)
            nib = _HEX_VALUE[view.byte_at(start[:, None] + 4 + _NIBBLES[None, :])]
            out[t].append(
                (view.to_chunk(start), (4 + 2 * ln) * view.width, view.encoding, nib, 2 * ln)
            )


def _records(chunk: Chunk) -> dict[int, Hits]:
    """Per tag, the valid records of a chunk in every form: the candidates of all forms
    checked together (one batch per tag)."""
    found: dict[int, list[_Candidates]] = {TAG_PAN: [], TAG_TRACK2: []}
    _binary(chunk, found)
    for view in views(chunk):
        _hex(view, found)
    out = {}
    for t, parts in found.items():
        if not parts:
            out[t] = Hits.empty()
            continue
        start, length, enc, nib, count = zip(*parts, strict=True)
        count_a = np.concatenate(count)
        nib_a = np.concatenate(nib)
        nib_a[_NIBBLES[None, :] >= count_a[:, None]] = 16
        ok, brand = _check(nib_a, count_a, t)
        encs = np.concatenate([np.full(c.size, e, np.uint8)
                               for c, e in zip(count, enc, strict=True)])
        out[t] = Hits(np.concatenate(start)[ok], np.concatenate(length)[ok], encs[ok], brand[ok])
    return out


# --- the detectors ------------------------------------------------------------------------------


class _EmvDetector(Detector):
    group = "cards"
    version = "1"
    #: a 57 record in UTF-16LE hex text: tag, length and 19 value bytes, 4 characters a byte
    max_len = (4 + 2 * MAX_VALUE[TAG_TRACK2]) * 2
    context = 16  # a template header before the record (hex text "7081LL" in UTF-16LE: 12)
    subsumes = ("pan",)  # the PAN digits of a hex-text record are not reported again
    #: a record touching a seam has its tag byte or 4 digits within max_len of it
    seam_band = max_len
    #: both EMV detectors read one records pass (``_records``, memoized on the chunk)
    stage: ClassVar[str] = "emv"
    tag: ClassVar[int]
    CONFIDENCE: ClassVar[dict[str, tuple[float, float]]]

    def may_touch(self, rows: Chunk) -> np.ndarray:
        return rows.memo("emv.may_touch", _tagged_or_digits)

    def find(self, chunk: Chunk) -> Hits:
        return chunk.memo("emv.records", _records)[self.tag]

    def describe(self, hit: Hit) -> Described | None:
        if hit.encoding == "binary":
            tlv, form = hit.raw.hex().upper(), "binary"
            before, after = hit.before, hit.after
        else:
            tlv, form = hit.text().upper(), "hex"
            text_before, text_after = text_around(hit)
            before = bytes.fromhex(_hex_run(text_before, tail=True))
            after = bytes.fromhex(_hex_run(text_after, tail=False))
        value = tlv[4:]
        if value.endswith("F"):
            value = value[:-1]
        pan = value.split("D", 1)[0]
        details: dict = {"brand": _BRANDS[hit.tag], "form": form, "pan": mask_pan(pan)}
        template = _template(before, len(tlv) // 2)
        if template:
            details["template"] = template
        neighbour = _next_tag(after)
        if neighbour:
            details["next_tag"] = neighbour
        if pan in TEST_PANS:
            details["test"] = True
        bare, in_context = self.CONFIDENCE[form]
        details["confidence"] = in_context if template or neighbour else bare
        masked = f"{self.tag:02X} {mask_pan(pan)}"
        if self.tag == TAG_TRACK2:  # nothing after the PAN is shown
            masked += "D" + "*" * (len(value) - len(pan) - 1)
        return Described(value.encode(), masked, details)


def _tagged_or_digits(rows: Chunk) -> np.ndarray:
    """Seam rows holding a 5A or 57 tag byte (a binary record) or 4 digits (a hex-text one)."""
    d = rows.data
    return ((d == TAG_PAN) | (d == TAG_TRACK2)).any(axis=1) | rows_with_digits(rows, 4)


def _hex_run(text: str, tail: bool) -> str:
    """The hex digits (an even number, so whole bytes) at the end (``tail``) or start of
    ``text``: the hex data glued to a hex-text record."""
    m = (_HEX_TAIL if tail else _HEX_HEAD).search(text)
    run = m.group(0) if m else ""
    return run[len(run) % 2 :] if tail else run[: len(run) - len(run) % 2]


_HEX_TAIL = re.compile(r"[0-9A-Fa-f]+$")
_HEX_HEAD = re.compile(r"^[0-9A-Fa-f]+")
#: tags of the data elements that card records carry with the PAN (EMV Book 3 Annex A):
#: 57, 5A, 5F20 cardholder name, 5F24 expiry, 5F25 effective date, 5F28 issuer country,
#: 5F30 service code, 5F34 PAN sequence number, 8C/8D CDOL1/2, 8E CVM list, 9F07 usage
#: control, 9F08 application version, 9F0D-9F0F issuer action codes, 9F1F track 1
#: discretionary data, 9F20 track 2 discretionary data, 9F42 currency, 9F4A SDA tag list
NEXT_TAGS = {
    0x57, 0x5A, 0x8C, 0x8D, 0x8E, 0x5F20, 0x5F24, 0x5F25, 0x5F28, 0x5F30, 0x5F34, 0x9F07,
    0x9F08, 0x9F0D, 0x9F0E, 0x9F0F, 0x9F1F, 0x9F20, 0x9F42, 0x9F4A,
}


def _next_tag(after: bytes) -> str | None:
    """The EMV tag of NEXT_TAGS that starts the bytes right after a record, if one does."""
    if after[:1] and after[0] in NEXT_TAGS:
        return f"{after[0]:02X}"
    if len(after) >= 2 and (after[0] << 8 | after[1]) in NEXT_TAGS:
        return after[:2].hex().upper()
    return None


def _template(before: bytes, size: int) -> str | None:
    """``70`` / ``77`` when a template header right before a record of ``size`` bytes opens a
    template that holds it (the record is the template's first element)."""
    if len(before) >= 2 and before[-2] in TEMPLATES and before[-1] >= size:
        return f"{before[-2]:02X}"
    if len(before) >= 3 and before[-3] in TEMPLATES and before[-2] == 0x81 and before[-1] >= size:
        return f"{before[-3]:02X}"
    return None


class EmvPanDetector(_EmvDetector):
    """``emv-pan``: EMV tag 5A records (Application PAN), binary and hex text."""

    name = "emv-pan"
    tag = TAG_PAN
    #: (alone, next to a template or record tag) per form. A lone binary 5A is ten bytes of
    #: digits-looking data: measured on the benchmark image, Python bytecode (STORE_NAME 'Z',
    #: then LOAD_CONST/LOAD_NAME with small arguments: BCD-valid bytes) forms Luhn-valid
    #: "records"; so alone it stays below the default threshold
    CONFIDENCE: ClassVar[dict[str, tuple[float, float]]] = {
        "binary": (0.25, 0.7), "hex": (0.75, 0.85)}


class EmvTrack2Detector(_EmvDetector):
    """``emv-track2``: EMV tag 57 records (Track 2 Equivalent Data), binary and hex text:
    sensitive authentication data, as magnetic-stripe Track 2 is."""

    name = "emv-track2"
    tag = TAG_TRACK2
    CONFIDENCE: ClassVar[dict[str, tuple[float, float]]] = {
        "binary": (0.7, 0.95), "hex": (0.9, 0.95)}
