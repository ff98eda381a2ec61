"""VirtualBox saved states (``.sav``, SSM format V2.0), as written by "Save state", snapshots
of a running or paused VM, and teleportation streams saved to a file.

Sources (docs/formats.md, "VirtualBox"): VirtualBox ``src/VBox/VMM/VMMR3/SSM.cpp`` (the format
description at its top, ``SSMFILEHDR``, ``SSMFILEUNITHDRV2``, ``SSMRECTERM``, ``SSMFILEDIR``,
``SSMFILEFTR``, ``ssmR3DataWriteRecHdr``, ``ssmR3DataWriteBig``, ``ssmR3DataReadRecHdrV2``,
``SSMR3PutStruct``, ``SSMR3PutStrZ``) and ``PGMSavedState.cpp`` (``pgmR3SaveExec``,
``pgmR3LiveExec``, ``pgmR3SaveRamPages``, ``pgmR3SaveMmio2Pages``, the ROM savers and the
``PGM_STATE_REC_*`` record types). All integers little-endian.

A file is a 64-byte header, then units (``\\nUnit\\n\\0`` header + name, then data records),
then a ``\\nTheEnd`` unit header, a directory and a footer. A unit's data is a sequence of
records; concatenating their decoded bytes (raw, LZF, zero) gives the unit's data stream, which
the unit's owner reads with its own layout. Only the ``pgm`` unit holds guest memory: a few
structures and range tables, then page records (a type byte, an address when bit 7 is set,
then the page). A live save writes the ``pgm`` unit once per pass and then a final pass: the
last record for a page wins; earlier copies are still bytes in the file and are scanned as
``region:superseded`` (address = offset in the file's SSM data stream: the decoded bytes of
every unit, concatenated in file order; plainly stored copies also carry their file offset).
The data of every other unit (device state: registers, device buffers, the ``SSM`` unit's
build strings) is scanned as ``region:device-state`` with the same addresses: device buffers
can hold guest data (a NIC's packets, a keyboard's keys, an audio buffer). Zero records hold
nothing to scan and are skipped.

Guest pages are laid into bounded windows in address order: pages stored plainly inside one
raw record are copied (and keep their file offset), pages in LZF records (and pages split
across records) decoded, each LZF record at most 4 KiB of output as VirtualBox's own reader
requires, and zero-page records written as zeros, so that guest neighbours are neighbours in a
window (a secret straddling two pages is found whatever records hold them). MMIO2 pages
(video RAM and other device memory) have no guest-physical address: they are scanned in
``block:<range name>`` spaces, addressed by their offset in the range; ROM pages likewise
(``block:<rom> (virgin)`` / ``block:<rom> (shadow)``).
"""

from __future__ import annotations

import copy
import struct
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from parsers.base import (
    Evidence,
    Extents,
    ImageError,
    MemoryImage,
    Ranges,
    Segment,
    printable,
)

FORMATS = ["vbox-sav"]

PAGE = 4096
MAGIC_BASE = b"\x7fVirtualBox SavedState "  # every SSM version starts with this
MAGIC_V2 = b"\x7fVirtualBox SavedState V2.0\n\0\0\0\0"  # SSMFILEHDR_MAGIC_V2_0 + NUL: 32 bytes

# SSMFILEHDR (64 bytes):
FILE_HEADER = struct.Struct(
    "<32s"  # szMagic
    "H"  # u16VerMajor: VirtualBox version that wrote the file
    "H"  # u16VerMinor
    "I"  # u32VerBuild
    "I"  # u32SvnRev
    "B"  # cHostBits: 32 or 64
    "B"  # cbGCPhys: bytes of a guest-physical address in the stream (4 or 8)
    "B"  # cbGCPtr: bytes of a guest pointer
    "B"  # u8Reserved
    "I"  # cUnits: units that may have stored data
    "I"  # fFlags: bit 0 stream CRC-32, bit 1 written by a live save
    "I"  # cbMaxDecompr
    "I"  # u32CRC: CRC-32 of these 64 bytes with this field zero
)
FLAG_STREAM_CRC32 = 1
FLAG_LIVE_SAVE = 2

# SSMFILEUNITHDRV2 (44 bytes, then cbName bytes of name incl. NUL):
UNIT_HEADER = struct.Struct(
    "<8s"  # szMagic: UNIT_MAGIC or END_MAGIC
    "Q"  # offStream: stream offset of this header (= file offset for a file)
    "I"  # u32CurStreamCRC
    "I"  # u32CRC: CRC-32 of header + name with this field zero
    "I"  # u32Version: the unit's data version
    "I"  # u32Instance
    "I"  # u32Pass: 0.. for live passes, PASS_FINAL for the final one
    "I"  # fFlags: must be zero
    "I"  # cbName: name length incl. NUL (<= 48)
)
UNIT_MAGIC = b"\nUnit\n\0"
END_MAGIC = b"\nTheEnd"
MAX_NAME = 48  # SSM_MAX_NAME_SIZE
PASS_FINAL = 0xFFFFFFFF  # SSM_PASS_FINAL

# SSMFILEDIR head (then cEntries x {u64 off, u32 instance, u32 name CRC}) and SSMFILEFTR:
DIR_HEAD = struct.Struct("<8sII")  # szMagic "\nDir\n\0\0", u32CRC, cEntries
DIR_ENTRY = struct.Struct("<QII")
DIR_MAGIC = b"\nDir\n\0\0"
FOOTER = struct.Struct("<8sQIIII")  # szMagic, offStream, u32StreamCRC, cDirEntries, reserved, CRC
FOOTER_MAGIC = b"\nFooter"

# Data records: byte 0 = 0x80 | important(0x10) | type; then the size, UTF-8 style.
REC_FIXED = 0x80
REC_FLAGS_MASK = 0xE0  # bits 5 and 6 must be clear, bit 7 set
REC_IMPORTANT = 0x10  # SSM_REC_FLAGS_IMPORTANT: set by SSM on every record; not checked
REC_TERM = 1  # SSMRECTERM: 16 bytes in all, ends the unit
REC_RAW = 2  # size bytes of unit data
REC_LZF = 3  # u8 decompressed size in KiB, then size-1 bytes of LZF data
REC_ZERO = 4  # u8 size in KiB of zero data (size field is 1)
REC_NAMED = 5  # reserved by SSM, never written: an error here
TERM = struct.Struct("<BBHIQ")  # type byte, cbRec (14), fFlags, u32StreamCRC, cbUnit
MAX_DECODED = 4096  # a LZF/zero record decodes to at most this (SSM's reader buffer)

# SSMR3PutStruct markers around a structure.
STRUCT_BEGIN = 0x19200102
STRUCT_END = 0x19920406
MAX_STRUCT = 4096  # bytes searched for a structure's end marker
MAX_CPUS = 1024  # PGMCPU structures read after the PGM one

# pgm unit page records (PGMSavedState.cpp PGM_STATE_REC_*). Bit 7 (FLAG_ADDR): an address
# follows the type byte (RAM: a guest-physical address of cbGCPhys bytes; MMIO2 and ROM: u8
# range id + u32 page index), else the page follows the previous one of its kind.
PG_RAM_ZERO = 0x00
PG_RAM_RAW = 0x01  # + 4096 bytes
PG_MMIO2_RAW = 0x02  # + 4096 bytes
PG_MMIO2_ZERO = 0x03
PG_ROM_VIRGIN = 0x04  # + u8 protection + 4096 bytes
PG_ROM_SHW_RAW = 0x05  # + u8 protection + 4096 bytes
PG_ROM_SHW_ZERO = 0x06  # + u8 protection
PG_ROM_PROT = 0x07  # + u8 protection
PG_RAM_BALLOONED = 0x08
PG_END = 0xFF
PG_FLAG_ADDR = 0x80
PGM_VERSIONS = range(11, 15)  # 11 pre-balloon .. 14 (VirtualBox 7.1); <= 10 lack RAM config
PGM_UNIT = "pgm"

# What a complete save holds (contract 4). RAM the VM has (``MMR3InitPaging`` in MM.cpp): RAM
# below 4 GiB up to 4 GiB minus the RAM hole, the rest from 4 GiB. ``pgmR3SaveRamPages`` saves
# only pages of type RAM: the legacy VGA window 0xA0000-0xBFFFF (MMIO of the VGA device) and the
# adapter ROM / BIOS area up to 1 MiB are never RAM pages (VirtualBox 7 registers no RAM there at
# all, older versions overlay MMIO and ROM on it), nor are the pages of a ROM range (saved as
# ROM records, in the pgm unit's ROM table with their GPA).
FOUR_GIB = 1 << 32
LEGACY_AREA = (0xA0000, 0x100000)

MAX_PAGE_RECORDS = 1 << 25  # page records kept (32 Mi pages = 128 GiB): a bound on memory
MAX_GPA = 1 << 52  # RAM pages above this are not physical addresses
MAX_RANGES = 254  # range ids are u8, 0xFF ends the list
WINDOW_PAGES = 1024  # pages per reused window (4 MiB)
RELEASE_STEP = 8 << 20  # walked file bytes given back at a time (see _State.walked)

# Page kinds in the record table (what a record's bytes are).
_ZERO, _PLAIN, _LZF, _SPLIT = 0, 1, 2, 3


@dataclass
class _Range:
    """An MMIO2 or ROM range from the pgm unit's tables."""

    kind: str  # "mmio2" or "rom"
    ident: int
    device: str
    instance: int
    region: int
    desc: str
    gcphys: int | None  # ROM only
    size: int


@dataclass
class _Unit:
    name: str
    instance: int
    version: int
    pass_: int
    offset: int  # file offset of the unit header
    data_offset: int  # file offset of its first record


@dataclass
class _State:
    """What the walk of a file found (the page table is filled by _PgmReader)."""

    path: str
    size: int
    cb_gcphys: int = 8
    live: bool = False
    units: list[_Unit] = field(default_factory=list)
    problems: list[ImageError] = field(default_factory=list)
    mmio2: dict[int, _Range] = field(default_factory=dict)
    rom: dict[int, _Range] = field(default_factory=dict)
    ram_hole: int | None = None
    ram_size: int | None = None
    ram_config_at: int | None = None  # file offset of the record holding the RAM config
    passes: list[int] = field(default_factory=list)  # pass numbers of the pgm units
    stream_base: int = 0  # decoded bytes of the units walked so far
    # One entry per page record, in file order: key (space << 48 | address), what the bytes
    # are (_ZERO, _PLAIN, _LZF, _SPLIT), where (file offset / LZF payload offset / index in
    # ``split``), LZF payload length, and offset in the SSM data stream.
    key: array = field(default_factory=lambda: array("q"))
    kind: array = field(default_factory=lambda: array("b"))
    where: array = field(default_factory=lambda: array("q"))
    clen: array = field(default_factory=lambda: array("i"))
    soff: array = field(default_factory=lambda: array("q"))
    split: list[bytes] = field(default_factory=list)
    spaces: dict[str, int] = field(default_factory=dict)
    # Device-unit data records with bytes to scan, in file order: record type (REC_RAW or
    # REC_LZF), file offset of the data (LZF: of the payload), stored bytes, decoded bytes
    # and offset in the SSM data stream.
    dev_type: array = field(default_factory=lambda: array("b"))
    dev_at: array = field(default_factory=lambda: array("q"))
    dev_len: array = field(default_factory=lambda: array("q"))
    dev_out: array = field(default_factory=lambda: array("i"))
    dev_soff: array = field(default_factory=lambda: array("q"))
    released: int = 0  # file offset below which the walked pages were given back

    def walked(self, ev: Evidence, pos: int) -> None:
        """The walk has reached file offset ``pos``: give back the mapped pages before it,
        RELEASE_STEP bytes at a time. Every page of a save holds a record header, so a walk
        that kept them would leave the whole file resident (the pages stay in the page
        cache: the stream reads them again at the cost of a page fault)."""
        if pos - self.released >= RELEASE_STEP:
            ev.release(self.released, pos - self.released)
            self.released = pos

    def fail(self, offset: int | None, message: str) -> ImageError:
        return ImageError(self.path, offset, message)


class _Stop(Exception):
    """The walk cannot go on; ``err`` says where and why."""

    def __init__(self, err: ImageError) -> None:
        super().__init__(str(err))
        self.err = err


def crc32(data: bytes) -> int:
    """RTCrc32: the usual CRC-32 (zlib's)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _with_zero_crc(raw: bytes, at: int) -> bytes:
    return raw[:at] + b"\0\0\0\0" + raw[at + 4 :]


# ---------------------------------------------------------------------------------------------
# Records


def read_record_header(data: np.ndarray, pos: int, end: int, st: _State) -> tuple[int, int, int]:
    """(type, offset of the record's data, size in bytes) of the record at file offset ``pos``.

    Raises _Stop for a bad type/flags byte, a malformed size or one running past ``end``."""
    if pos + 2 > end:
        raise _Stop(st.fail(pos, "truncated: unit data ends inside a record header"))
    b0, b1 = int(data[pos]), int(data[pos + 1])
    rtype = b0 & 0x0F
    if b0 & REC_FLAGS_MASK != REC_FIXED or not REC_TERM <= rtype <= REC_NAMED:
        raise _Stop(st.fail(pos, f"unknown SSM record type byte {b0:#04x}"))
    if rtype == REC_TERM:
        return rtype, pos + 2, TERM.size - 2
    if not b1 & 0x80:
        return rtype, pos + 2, b1
    # UTF-8 style: the count of leading one bits of byte 1 is the size field's length.
    if not b1 & 0x20:
        n, value = 2, b1 & 0x1F
    elif not b1 & 0x10:
        n, value = 3, b1 & 0x0F
    elif not b1 & 0x08:
        n, value = 4, b1 & 0x07
    elif not b1 & 0x04:
        n, value = 5, b1 & 0x03
    elif not b1 & 0x02:
        n, value = 6, b1 & 0x01
    else:
        raise _Stop(st.fail(pos, f"invalid SSM record size byte {b1:#04x}"))
    if pos + 1 + n > end:
        raise _Stop(st.fail(pos, "truncated: unit data ends inside a record header"))
    for k in range(2, n + 1):
        c = int(data[pos + k])
        if c & 0xC0 != 0x80:
            raise _Stop(st.fail(pos, f"invalid SSM record size continuation byte {c:#04x}"))
        value = (value << 6) | (c & 0x3F)
    return rtype, pos + 1 + n, value


# ---------------------------------------------------------------------------------------------
# The pgm unit's data stream


class _Cursor:
    """Reads a unit's data stream record by record, straight from the mmap.

    ``pos`` is the file offset of the next record header; the current piece is
    (kind, file offset of its bytes, bytes left, LZF payload length, decoded bytes for LZF).
    ``logical`` counts decoded bytes consumed (offset in the unit's data stream)."""

    def __init__(self, ev: Evidence, st: _State, pos: int) -> None:
        self.ev = ev
        self.data = ev.data
        self.size = ev.size
        self.st = st
        self.pos = pos
        self.kind = -1
        self.at = 0  # file offset of the current piece's remaining bytes (raw)
        self.left = 0  # decoded bytes left in the current piece
        self.lzf_off = 0
        self.lzf_len = 0
        self.lzf_data: bytes | None = None
        self.lzf_total = 0
        self.logical = 0
        self.ended = False
        self.term_at = -1
        self.rec_at = pos  # file offset of the current record's header

    def _next(self) -> None:
        """Load the next record with data; _Stop at the unit's end or on damage."""
        while True:
            if self.ended:
                raise _Stop(self.st.fail(self.term_at, "pgm unit data ends before its END record"))
            start = self.rec_at = self.pos
            self.st.walked(self.ev, start)
            rtype, p, n = read_record_header(self.data, start, self.size, self.st)
            if rtype == REC_TERM:
                if p + n > self.size:
                    raise _Stop(self.st.fail(start, "truncated: termination record"))
                self.pos = p + n
                self.ended = True
                self.term_at = start
                continue
            if p + n > self.size:
                raise _Stop(
                    self.st.fail(start, f"truncated: record of {n} bytes runs past end of file")
                )
            self.pos = p + n
            if rtype == REC_RAW:
                if n == 0:
                    continue
                self.kind, self.at, self.left = REC_RAW, p, n
                return
            if rtype in (REC_LZF, REC_ZERO):
                if n < 1 or (rtype == REC_ZERO and n != 1):
                    raise _Stop(self.st.fail(start, f"SSM record of type {rtype} with size {n}"))
                kib = int(self.data[p])
                out = kib * 1024
                if out == 0 or out > MAX_DECODED:
                    raise _Stop(
                        self.st.fail(start, f"SSM record claims {out} decoded bytes (max 4096)")
                    )
                if rtype == REC_ZERO:
                    self.kind, self.left = REC_ZERO, out
                else:
                    self.kind, self.left = REC_LZF, out
                    self.lzf_off, self.lzf_len, self.lzf_data = p + 1, n - 1, None
                    self.lzf_total = out
                return
            raise _Stop(self.st.fail(start, "SSM named-data record (type 5) is not supported"))

    def _lzf(self) -> bytes:
        if self.lzf_data is None:
            self.lzf_data = lzf_decode(
                self.data[self.lzf_off : self.lzf_off + self.lzf_len].tobytes(),
                self.lzf_total,
                self.st,
                self.lzf_off - 1,
            )
        return self.lzf_data

    def read(self, n: int) -> bytes:
        """The next ``n`` decoded bytes (small fields)."""
        out = b""
        while n:
            if self.left == 0:
                self._next()
            take = min(n, self.left)
            if self.kind == REC_RAW:
                out += self.data[self.at : self.at + take].tobytes()
                self.at += take
            elif self.kind == REC_ZERO:
                out += bytes(take)
            else:
                done = self.lzf_total - self.left
                out += self._lzf()[done : done + take]
            self.left -= take
            self.logical += take
            n -= take
        return out

    def u8(self) -> int:
        return self.read(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self.read(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.read(8), "little")

    def strz(self, limit: int = 1024) -> str:
        """SSMR3PutStrZ: u32 length, then the characters (no NUL)."""
        n = self.u32()
        at = self.rec_at
        if n > limit:
            raise _Stop(self.st.fail(at, f"string of {n} bytes in the pgm unit"))
        return printable(self.read(n))  # (shown in messages and space names: one line)

    def page(self) -> tuple[int, int, int]:
        """Consume one 4 KiB page: (kind, where, LZF length) for the record table."""
        if self.left == 0:
            self._next()
        if self.kind == REC_RAW and self.left >= PAGE:
            at = self.at
            self.at += PAGE
            self.left -= PAGE
            self.logical += PAGE
            return _PLAIN, at, 0
        if self.kind == REC_ZERO and self.left >= PAGE:
            self.left -= PAGE
            self.logical += PAGE
            return _ZERO, 0, 0
        if self.kind == REC_LZF and self.left == self.lzf_total == PAGE:
            self.left = 0
            self.logical += PAGE
            return _LZF, self.lzf_off, self.lzf_len
        # A page split across records, or one part of a bigger LZF block: decode it now.
        data = self.read(PAGE)
        if not any(data):
            return _ZERO, 0, 0
        self.st.split.append(data)
        return _SPLIT, len(self.st.split) - 1, 0

    def finish(self) -> None:
        """Move past the unit's termination record; its data must be used up."""
        while not self.ended:
            if self.left:
                raise _Stop(self.st.fail(self.rec_at, "pgm unit has data after its END record"))
            try:
                self._next()
            except _Stop:
                if not self.ended:
                    raise
            else:
                raise _Stop(self.st.fail(self.rec_at, "pgm unit has data after its END record"))


def lzf_decode(payload: bytes, size: int, st: _State, at: int) -> bytes:
    """Decode one LZF record to exactly ``size`` bytes (_Stop naming the record otherwise)."""
    lzf = _lzf_module()
    if lzf is None:
        raise _Stop(
            st.fail(at, "LZF-compressed record: python package 'python-neo-lzf' is not installed")
        )
    try:
        out = lzf.decompress(payload, size)
    except Exception as exc:  # the binding raises a bare error type for corrupt input
        raise _Stop(st.fail(at, f"LZF record does not decode: {exc}")) from None
    if out is None or len(out) != size:
        raise _Stop(st.fail(at, f"LZF record does not decode to {size} bytes"))
    return out


def _lzf_module() -> Any:
    try:
        import lzf
    except ImportError:
        return None
    return lzf


class _PgmReader:
    """Walks one pgm unit's data and appends its page records to the state's table."""

    def __init__(self, ev: Evidence, st: _State, unit: _Unit) -> None:
        self.st = st
        self.unit = unit
        self.cur = _Cursor(ev, st, unit.data_offset)
        self.ev = ev
        self.mv = memoryview(ev.data)  # indexing a memoryview gives ints far faster than numpy
        self.last_ram = -1  # GPA of the previous RAM record (any RAM kind)
        self.last_idx: dict[int, tuple[int, int]] = {}  # kind group -> (range id, page index)

    def run(self) -> int:
        """Walk the unit; returns the file offset after its termination record."""
        u, cur = self.unit, self.cur
        final = u.pass_ == PASS_FINAL
        if final:
            self._structs()
        if (final and not self.st.live) or (not final and u.pass_ == 0):
            self._config()
        self._pages()
        # After END the unit must end (its TERM record).
        cur.finish()
        return cur.pos

    def _structs(self) -> None:
        """Skip the PGM structure and one PGMCPU structure per vCPU (begin/end markers)."""
        cur = self.cur
        for n in range(MAX_CPUS + 1):
            at = cur.rec_at
            if n:
                peek = self._peek_u32()
                if peek != STRUCT_BEGIN:
                    return
            marker = cur.u32()
            if marker != STRUCT_BEGIN:
                raise _Stop(self.st.fail(at, f"pgm unit: structure marker {marker:#010x}"))
            window = b""
            while True:
                window += cur.read(1)
                if window[-4:] == STRUCT_END.to_bytes(4, "little"):
                    break
                if len(window) > MAX_STRUCT:
                    raise _Stop(self.st.fail(at, "pgm unit: structure without its end marker"))

    def _peek_u32(self) -> int:
        """The next u32 of the stream without consuming it (read from a copy of the cursor)."""
        return copy.copy(self.cur).u32()

    def _gcphys(self) -> int:
        return int.from_bytes(self.cur.read(self.st.cb_gcphys), "little")

    def _config(self) -> None:
        """RAM config (u32 hole, u64 RAM size), then the ROM and MMIO2 range tables."""
        cur, st = self.cur, self.st
        st.ram_hole = cur.u32()
        st.ram_config_at = cur.rec_at
        st.ram_size = cur.u64()
        for kind in ("rom", "mmio2"):
            table = st.rom if kind == "rom" else st.mmio2
            for _ in range(MAX_RANGES + 1):
                ident = cur.u8()
                at = cur.rec_at
                if ident == 0xFF:
                    break
                device = cur.strz(64)
                instance = cur.u32()
                region = cur.u8()
                desc = cur.strz(256)
                gcphys = self._gcphys() if kind == "rom" else None
                size = self._gcphys()
                if ident == 0 or size % PAGE:
                    raise _Stop(st.fail(at, f"pgm unit: bad {kind} range entry {ident}"))
                table[ident] = _Range(kind, ident, device, instance, region, desc, gcphys, size)
            else:
                raise _Stop(st.fail(cur.rec_at, f"pgm unit: {kind} range table does not end"))

    def _space(self, name: str) -> int:
        sp = self.st.spaces.get(name)
        if sp is None:
            sp = self.st.spaces[name] = len(self.st.spaces) + 1
        return sp

    def _range_page(self, rtype: int, group: str, flagged: bool, at: int) -> tuple[_Range, int]:
        """(range, page index) of an MMIO2/ROM record: explicit, or the previous + 1."""
        cur, st = self.cur, self.st
        if flagged:
            ident = cur.u8()
            index = cur.u32()
        else:
            prev = self.last_idx.get(group)
            if prev is None:
                raise _Stop(st.fail(at, f"page record {rtype:#04x} continues no earlier page"))
            ident, index = prev[0], prev[1] + 1
        table = st.mmio2 if group == "mmio2" else st.rom
        rng = table.get(ident)
        if rng is None:
            raise _Stop(st.fail(at, f"page record for unknown {group} range id {ident}"))
        if index * PAGE >= rng.size:
            raise _Stop(st.fail(at, f"page {index} beyond {group} range {rng.desc!r}"))
        self.last_idx[group] = (ident, index)
        return rng, index

    def _add(self, key: int, kind: int, where: int, clen: int, soff: int) -> None:
        st = self.st
        if len(st.key) >= MAX_PAGE_RECORDS:
            raise _Stop(st.fail(self.cur.rec_at, f"more than {MAX_PAGE_RECORDS} page records"))
        st.key.append(key)
        st.kind.append(kind)
        st.where.append(where)
        st.clen.append(clen)
        st.soff.append(soff)

    def _record(self, key: int, has_data: bool, base: int) -> None:
        """Add a page record: its 4 KiB are consumed from the stream when it has data."""
        if not has_data:
            self._add(key, _ZERO, 0, 0, 0)
            return
        soff = base + self.cur.logical
        kind, where, clen = self.cur.page()
        self._add(key, kind, where, clen, soff)

    def _zero_run(self) -> None:
        """Add at once the implicit RAM zero records that follow in the current raw record:
        each is one 0x00 byte (the next page's type byte), and a mostly-zero guest has
        millions of them, too many for one Python step each."""
        cur, st = self.cur, self.st
        if cur.kind != REC_RAW or cur.left == 0:
            return
        view = cur.data[cur.at : cur.at + cur.left]
        nonzero = np.flatnonzero(view)
        n = int(nonzero[0]) if nonzero.size else view.size
        # stop short of the bounds; the record-by-record path then reports them
        n = min(n, MAX_PAGE_RECORDS - len(st.key), (MAX_GPA - 1 - self.last_ram) // PAGE)
        if n <= 0:
            return
        first = self.last_ram + PAGE
        st.key.frombytes(np.arange(first, first + n * PAGE, PAGE, dtype=np.int64).tobytes())
        st.kind.frombytes(bytes(n))  # _ZERO
        st.where.frombytes(bytes(8 * n))
        st.clen.frombytes(bytes(4 * n))
        st.soff.frombytes(bytes(8 * n))
        cur.at += n
        cur.left -= n
        cur.logical += n
        self.last_ram = first + (n - 1) * PAGE

    def _fast_pages(self, base: int) -> None:
        """Add the usual run of page records in one tight loop: at a record boundary, a raw
        record of type bytes (unflagged RAM zero pages, then one unflagged RAM raw page), then
        that page as one 4 KiB LZF record, 4096-byte raw record or 4 KiB zero record (how SSM
        writes a page: the small puts buffered, the page as a big write). A guest has one
        such pair per stored page, and the general path's many Python steps per record cost
        seconds per GiB. Stops, with the cursor at the record boundary, at anything else
        (other page types, flagged addresses, truncation, bounds) for the general path, which
        also reports every error; what it adds is what the general path would add."""
        cur, st = self.cur, self.st
        if cur.left or cur.ended or self.last_ram < 0:
            return
        mv, ev, size = self.mv, self.ev, cur.size
        pos, gpa, logical, count = cur.pos, self.last_ram, cur.logical, len(st.key)
        # records that may still be added: both bounds grow by one with each page record
        limit = count + min(MAX_PAGE_RECORDS - count, (MAX_GPA - 1 - gpa) // PAGE)
        release_at = st.released + RELEASE_STEP
        keys, kinds, wheres, clens, soffs = st.key, st.kind, st.where, st.clen, st.soff
        last_header = -1
        while True:
            if pos + 2 > size or (mv[pos] & ~REC_IMPORTANT) != REC_FIXED | REC_RAW:
                break
            n = mv[pos + 1]  # a type-byte record is short: one size byte (< 0x80)
            q = pos + 2 + n
            if not 0 < n < 0x80 or q + 5 > size or mv[q - 1] != PG_RAM_RAW:
                break
            m = n - 1  # unflagged RAM zero pages before the raw one: 0x00 type bytes
            if count + n > limit or (m and int.from_bytes(mv[pos + 2 : q - 1], "little")):
                break
            h, b1 = (mv[q] & ~REC_IMPORTANT), mv[q + 1]
            if b1 < 0x80:
                n2, p2 = b1, q + 2
            elif b1 & 0xE0 == 0xC0 and mv[q + 2] & 0xC0 == 0x80:
                n2, p2 = ((b1 & 0x1F) << 6) | (mv[q + 2] & 0x3F), q + 3
            elif b1 & 0xF0 == 0xE0 and mv[q + 2] & 0xC0 == 0x80 and mv[q + 3] & 0xC0 == 0x80:
                n2 = ((b1 & 0x0F) << 12) | ((mv[q + 2] & 0x3F) << 6) | (mv[q + 3] & 0x3F)
                p2 = q + 4
            else:
                break
            end = p2 + n2
            if end > size:
                break
            if h == REC_FIXED | REC_LZF and n2 >= 1 and mv[p2] == PAGE // 1024:
                kind, where, clen = _LZF, p2 + 1, n2 - 1
            elif h == REC_FIXED | REC_RAW and n2 == PAGE:
                kind, where, clen = _PLAIN, p2, 0
            elif h == REC_FIXED | REC_ZERO and n2 == 1 and mv[p2] == PAGE // 1024:
                kind, where, clen = _ZERO, 0, 0
            else:
                break
            if m:
                keys.extend(range(gpa + PAGE, gpa + n * PAGE, PAGE))
                kinds.frombytes(bytes(m))  # _ZERO, where/clen/soff 0 as _record adds them
                wheres.frombytes(bytes(8 * m))
                clens.frombytes(bytes(4 * m))
                soffs.frombytes(bytes(8 * m))
            gpa += n * PAGE
            logical += n
            keys.append(gpa)
            kinds.append(kind)
            wheres.append(where)
            clens.append(clen)
            soffs.append(base + logical)
            logical += PAGE
            count += n
            last_header = q
            pos = end
            if pos >= release_at:
                st.walked(ev, pos)
                release_at = st.released + RELEASE_STEP
        if last_header >= 0:
            cur.pos, cur.rec_at, cur.logical, self.last_ram = pos, last_header, logical, gpa

    def _pages(self) -> None:
        cur, st = self.cur, self.st
        base = st.stream_base
        while True:
            self._fast_pages(base)
            rtype = cur.u8()
            at = cur.rec_at
            if rtype == PG_END:
                return
            flagged = bool(rtype & PG_FLAG_ADDR)
            kind = rtype & ~PG_FLAG_ADDR
            if kind in (PG_RAM_ZERO, PG_RAM_RAW, PG_RAM_BALLOONED):
                if flagged:
                    gpa = self._gcphys()
                elif self.last_ram < 0:
                    raise _Stop(st.fail(at, f"page record {rtype:#04x} continues no earlier page"))
                else:
                    gpa = self.last_ram + PAGE
                if gpa % PAGE or gpa >= MAX_GPA:
                    raise _Stop(st.fail(at, f"RAM page record at unaligned or absurd GPA {gpa:#x}"))
                self.last_ram = gpa
                self._record(gpa, kind == PG_RAM_RAW, base)
                if kind == PG_RAM_ZERO:
                    self._zero_run()
            elif kind in (PG_MMIO2_RAW, PG_MMIO2_ZERO):
                rng, index = self._range_page(rtype, "mmio2", flagged, at)
                key = (self._space(f"block:{rng.desc}") << 48) | (index * PAGE)
                self._record(key, kind == PG_MMIO2_RAW, base)
            elif PG_ROM_VIRGIN <= kind <= PG_ROM_PROT:
                rng, index = self._range_page(rtype, "rom", flagged, at)
                cur.u8()  # protection
                if kind in (PG_ROM_VIRGIN, PG_ROM_SHW_RAW, PG_ROM_SHW_ZERO):
                    which = "virgin" if kind == PG_ROM_VIRGIN else "shadow"
                    key = (self._space(f"block:{rng.desc} ({which})") << 48) | (index * PAGE)
                    self._record(key, kind != PG_ROM_SHW_ZERO, base)
            else:
                raise _Stop(st.fail(at, f"unknown pgm page record type {rtype:#04x}"))


# ---------------------------------------------------------------------------------------------
# File walk


def _read_header(ev: Evidence, st: _State) -> dict[str, Any]:
    raw = ev.need(0, FILE_HEADER.size, "SSM file header")
    f = FILE_HEADER.unpack(raw)
    magic = f[0]
    if not magic.startswith(MAGIC_BASE):
        raise ImageError(st.path, 0, "not a VirtualBox saved state (no SSM magic)")
    if magic != MAGIC_V2:
        version = magic[len(MAGIC_BASE) :].split(b"\n")[0].decode("ascii", "replace")
        raise ImageError(
            st.path,
            0,
            f"VirtualBox saved state format {version!r} is not supported (only V2.0, written "
            "by VirtualBox 3.1 and later)",
        )
    (_, vmaj, vmin, build, rev, host_bits, cb_gcphys, cb_gcptr, _, units, flags, _, crc) = f
    if crc32(_with_zero_crc(raw, 60)) != crc:
        st.problems.append(st.fail(60, "SSM file header CRC-32 mismatch (header damaged)"))
    if cb_gcphys not in (4, 8):
        raise ImageError(st.path, 0x2D, f"guest-physical address size {cb_gcphys} (need 4 or 8)")
    st.cb_gcphys = cb_gcphys
    st.live = bool(flags & FLAG_LIVE_SAVE)
    return {
        "vbox_version": f"{vmaj}.{vmin}.{build}r{rev}",
        "host_bits": host_bits,
        "gcphys_bytes": cb_gcphys,
        "gcptr_bytes": cb_gcptr,
        "units_declared": units,
        "live_save": st.live,
        "stream_crc32": bool(flags & FLAG_STREAM_CRC32),
    }


def _device_unit(ev: Evidence, st: _State, pos: int) -> tuple[int, int]:
    """Walk a device unit's records to its TERM record without decoding, noting in ``st``
    where its data lies (scanned as ``region:device-state``); returns (position after the
    TERM record, decoded bytes of the unit's data)."""
    decoded = 0
    data = ev.data
    while True:
        start = pos
        st.walked(ev, start)
        rtype, p, n = read_record_header(data, pos, ev.size, st)
        if p + n > ev.size:
            raise _Stop(st.fail(start, f"truncated: record of {n} bytes runs past end of file"))
        if rtype == REC_TERM:
            return p + n, decoded
        if rtype == REC_RAW:
            out = n
        elif rtype in (REC_LZF, REC_ZERO):
            out = int(data[p]) * 1024 if n >= 1 else 0
            if out == 0 or out > MAX_DECODED or (rtype == REC_ZERO and n != 1):
                raise _Stop(st.fail(start, f"SSM record of type {rtype} with size {n} claims "
                                           f"{out} decoded bytes (1-4 KiB)"))  # fmt: skip
        else:
            raise _Stop(st.fail(start, "SSM named-data record (type 5) is not supported"))
        if len(st.dev_type) >= MAX_PAGE_RECORDS:
            raise _Stop(st.fail(start, f"more than {MAX_PAGE_RECORDS} device-state records"))
        if out and rtype != REC_ZERO:
            lzf = rtype == REC_LZF
            st.dev_type.append(rtype)
            st.dev_at.append(p + 1 if lzf else p)
            st.dev_len.append(n - 1 if lzf else n)
            st.dev_out.append(out)
            st.dev_soff.append(st.stream_base + decoded)
        decoded += out
        pos = p + n


def walk(ev: Evidence, st: _State) -> dict[str, Any]:
    """Walk every unit of the file, filling ``st``; returns metadata. Damage after the header
    becomes a problem in ``st.problems`` and ends the walk (what came before is kept)."""
    meta = _read_header(ev, st)
    pos = FILE_HEADER.size
    names: list[str] = []
    try:
        while True:
            head = ev.data[pos : pos + UNIT_HEADER.size].tobytes()
            if len(head) < UNIT_HEADER.size:
                raise _Stop(st.fail(pos, "truncated: file ends before the end-of-units marker"))
            magic, _, _, crc, version, instance, pass_, flags, cb_name = UNIT_HEADER.unpack(head)
            if magic == END_MAGIC + b"\0":
                _tail(ev, st, pos + UNIT_HEADER.size, meta)
                break
            if magic != UNIT_MAGIC + b"\0":
                raise _Stop(st.fail(pos, "expected a unit header (\\nUnit\\n) here"))
            if not 1 <= cb_name <= MAX_NAME or flags:
                raise _Stop(st.fail(pos, f"unit header with name size {cb_name}, flags {flags}"))
            name_raw = ev.data[pos + UNIT_HEADER.size : pos + UNIT_HEADER.size + cb_name].tobytes()
            if len(name_raw) < cb_name:
                raise _Stop(st.fail(pos, "truncated: unit header name"))
            if crc32(_with_zero_crc(head + name_raw, 0x14)) != crc:
                st.problems.append(st.fail(pos, "unit header CRC-32 mismatch"))
            name = name_raw.split(b"\0", 1)[0].decode("ascii", "replace")
            unit = _Unit(name, instance, version, pass_, pos, pos + UNIT_HEADER.size + cb_name)
            st.units.append(unit)
            names.append(name)
            if name == PGM_UNIT:
                if version not in PGM_VERSIONS:
                    raise _Stop(
                        st.fail(pos, f"pgm unit version {version} is not supported (11-14)")
                    )
                if pass_ != PASS_FINAL:
                    st.live = True
                st.passes.append(pass_)
                reader = _PgmReader(ev, st, unit)
                pos = reader.run()
                st.stream_base += reader.cur.logical
            else:
                pos, decoded = _device_unit(ev, st, unit.data_offset)
                st.stream_base += decoded
    except _Stop as stop:
        st.problems.append(stop.err)
    ev.release(st.released, ev.size - st.released)
    meta["units"] = sorted(set(names))
    return meta


def _tail(ev: Evidence, st: _State, pos: int, meta: dict[str, Any]) -> None:
    """Directory and footer after the end marker: checked, reported, never fatal."""
    head = ev.data[pos : pos + DIR_HEAD.size].tobytes()
    if len(head) < DIR_HEAD.size or head[:8] != DIR_MAGIC + b"\0":
        st.problems.append(st.fail(pos, "no unit directory after the end marker"))
        return
    _, crc, count = DIR_HEAD.unpack(head)
    end = pos + DIR_HEAD.size + count * DIR_ENTRY.size
    if count > 1 << 16 or end + FOOTER.size > ev.size:
        st.problems.append(st.fail(pos, f"unit directory of {count} entries runs past the file"))
        return
    body = ev.data[pos:end].tobytes()
    if crc32(_with_zero_crc(body, 8)) != crc:
        st.problems.append(st.fail(pos, "unit directory CRC-32 mismatch"))
    foot = ev.data[end : end + FOOTER.size].tobytes()
    magic, _, _, entries, _, fcrc = FOOTER.unpack(foot)
    if magic != FOOTER_MAGIC + b"\0" or crc32(_with_zero_crc(foot, 28)) != fcrc:
        st.problems.append(st.fail(end, "footer missing or CRC-32 mismatch"))
    elif entries != count:
        st.problems.append(st.fail(end, "footer and directory disagree on the unit count"))
    meta["directory_entries"] = count


# ---------------------------------------------------------------------------------------------
# From the page table to segments


def _resolve(st: _State) -> tuple[np.ndarray, np.ndarray]:
    """(winners, superseded): indexes into the page table of the records that hold the guest's
    pages (the last record of each page, zero records included), in key order (space, then
    address), and of the earlier copies that hold data, in file order."""
    key = np.frombuffer(st.key, np.int64) if len(st.key) else np.zeros(0, np.int64)
    kind = np.frombuffer(st.kind, np.int8) if len(st.kind) else np.zeros(0, np.int8)
    if key.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(key, kind="stable")
    k = key[order]
    last = np.ones(k.size, bool)
    last[:-1] = k[1:] != k[:-1]
    old = np.ones(key.size, bool)
    old[order[last]] = False
    return order[last], np.flatnonzero(old & (kind != _ZERO))


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint (first, end) ranges covering the same addresses as ``ranges``."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _inside(addr: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which of ``addr`` lie in the sorted, disjoint ``ranges``."""
    if not ranges or addr.size == 0:
        return np.zeros(addr.size, bool)
    first = np.array([a for a, _ in ranges], np.int64)
    end = np.array([b for _, b in ranges], np.int64)
    i = np.searchsorted(first, addr, side="right") - 1
    return (i >= 0) & (addr < end[np.maximum(i, 0)])


def ram_layout(ram_size: int, ram_hole: int) -> list[tuple[int, int]]:
    """The guest-physical ranges of a VirtualBox VM's RAM (``MMR3InitPaging``): RAM below 4 GiB
    up to 4 GiB minus the RAM hole, the rest from 4 GiB (bytes)."""
    below = min(ram_size, FOUR_GIB - ram_hole)
    above = min(ram_size - below, MAX_GPA - FOUR_GIB)  # an absurd size stays a number
    return [(0, below)] + ([(FOUR_GIB, FOUR_GIB + above)] if above > 0 else [])


def left_out(layout: list[tuple[int, int]], roms: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The part of ``layout`` a save never holds as RAM pages: the legacy VGA window and adapter
    area (0xA0000 to 1 MiB) and the ROM ranges ``roms`` (GPA, bytes), page-aligned outwards."""
    cut = [LEGACY_AREA] + [(g // PAGE * PAGE, -(-(g + n) // PAGE) * PAGE) for g, n in roms]
    return _merged(
        [
            (max(a, c), min(b, d))
            for a, b in layout
            for c, d in _merged(cut)
            if min(b, d) > max(a, c)
        ]
    )


def account(st: _State, image: MemoryImage) -> np.ndarray:
    """Fill ``image.coverage`` (contract 4) and return the GPAs it counts as read.

    Declared: the pgm unit's RAM config (``RamSize``); the save leaves out on purpose the part
    of that RAM that is MMIO or ROM (:func:`left_out`). Read: every page of the RAM layout that
    has a record in the file, whatever its kind (raw, zero, ballooned: the save accounts for
    each), counted once however many passes resent it. Without a RAM config nothing is declared."""
    cov = image.coverage
    key = np.frombuffer(st.key, np.int64) if len(st.key) else np.zeros(0, np.int64)
    gpa = np.unique(key[(key >> 48) == 0])
    if st.problems:
        cov.stopped_at = st.problems[0].offset
    if st.ram_size is None or st.ram_hole is None:
        cov.read = gpa.size * PAGE
        return gpa
    layout = ram_layout(st.ram_size, st.ram_hole)
    roms = [(r.gcphys, r.size) for r in st.rom.values() if r.gcphys is not None]
    out = left_out(layout, roms)
    read = gpa[_inside(gpa, layout)]
    held_out = int(np.count_nonzero(_inside(read, out)))
    cov.declared = st.ram_size
    cov.declared_by = "the pgm unit's RAM config"
    cov.declared_at = st.ram_config_at
    cov.read = read.size * PAGE
    cov.excluded = max(0, sum(b - a for a, b in out) - held_out * PAGE)
    if cov.excluded:
        names = [r.desc for r in st.rom.values() if any(a <= (r.gcphys or 0) < b for a, b in out)]
        cov.excluded_why = (
            "MMIO and ROM, not RAM: the legacy VGA window and adapter area 0xA0000-0xFFFFF"
            + (f" and ROM ranges ({', '.join(names)})" if names else "")
            + " are never saved as RAM pages"
        )
    image.meta["ram_layout"] = [f"{a:#x}-{b - 1:#x}" for a, b in layout]
    image.meta["ram_pages_outside_layout"] = int(gpa.size - read.size)
    return read


def _space_of(key: np.ndarray, names: dict[int, int]) -> np.ndarray:
    """Image space ids for the state's space numbers (0 = GPA)."""
    sp = key >> 48
    out = np.zeros(sp.size, np.int64)
    for st_sp, img_sp in names.items():
        out[sp == st_sp] = img_sp
    return out


def build(ev: Evidence, st: _State, image: MemoryImage) -> None:
    """Give ``image`` its segments: windows of the guest's pages in address order, then
    windows of the superseded copies, then one segment over the mmap (plain device-state
    records), then windows of decoded device-state records.

    A window holds every winning page of its address range — plain ones copied, LZF ones
    decoded, zero records as zero bytes — so pages that are guest neighbours are neighbours
    in the window and the engine sees one run, not a seam per stored page beside a zero page
    (seams that never meet a partner pile up in the engine's bounded edge store, which then
    forgets real ones). The engine skips all-zero pages cheaply."""
    names = {num: image.space_id(name) for name, num in st.spaces.items()}
    superseded_space = image.space_id("region:superseded")
    device_space = image.space_id("region:device-state")
    win, old = _resolve(st)
    key = np.frombuffer(st.key, np.int64) if len(st.key) else np.zeros(0, np.int64)
    kind = np.frombuffer(st.kind, np.int8) if len(st.kind) else np.zeros(0, np.int8)
    where = np.frombuffer(st.where, np.int64) if len(st.where) else np.zeros(0, np.int64)
    clen = np.frombuffer(st.clen, np.int32) if len(st.clen) else np.zeros(0, np.int32)
    soff = np.frombuffer(st.soff, np.int64) if len(st.soff) else np.zeros(0, np.int64)
    mask = (1 << 48) - 1
    # record index, address and space of every scanned copy: winners, then superseded copies
    rec = np.concatenate((win, old))
    addr = np.concatenate((key[win] & mask, soff[old]))
    space = np.concatenate((_space_of(key[win], names), np.full(old.size, superseded_space)))
    dev_type = np.frombuffer(st.dev_type, np.int8) if len(st.dev_type) else np.zeros(0, np.int8)
    dev_at = np.frombuffer(st.dev_at, np.int64) if len(st.dev_at) else np.zeros(0, np.int64)
    dev_len = np.frombuffer(st.dev_len, np.int64) if len(st.dev_len) else np.zeros(0, np.int64)
    dev_out = np.frombuffer(st.dev_out, np.int32) if len(st.dev_out) else np.zeros(0, np.int32)
    dev_soff = np.frombuffer(st.dev_soff, np.int64) if len(st.dev_soff) else np.zeros(0, np.int64)
    dev_raw = dev_type == REC_RAW
    fo = dev_at[dev_raw]
    main = Extents.build(fo, dev_soff[dev_raw], dev_len[dev_raw], fo, device_space)
    dev_lzf = np.flatnonzero(dev_type == REC_LZF)
    path = st.path
    read = account(st, image)
    image.coverage.outside = int(dev_out.sum()) + int(old.size) * PAGE
    # file bytes not stored plainly (raw pages, raw device records) are the saved state's
    # records, LZF data and headers: structure
    plain = rec[kind[rec] == _PLAIN]
    image.coverage.structure = ev.size - Ranges.of(
        np.concatenate((where[plain], fo)),
        np.concatenate((where[plain] + PAGE, fo + dev_len[dev_raw])),
    ).total()
    # a page's bytes in the file, for the plain ones (a view: rows are copied when indexed)
    pages_in_file = (
        sliding_window_view(ev.data, PAGE) if ev.size >= PAGE else np.zeros((0, PAGE), np.uint8)
    )

    def device_windows(problems: list[ImageError]) -> Iterator[Segment]:
        """The LZF records of device units, decoded into one reused window at a time."""
        if dev_lzf.size == 0:
            return
        buf = np.zeros(min(WINDOW_PAGES * PAGE, int(dev_out[dev_lzf].sum())), np.uint8)
        fill: list[tuple[int, int, int]] = []  # (window offset, stream offset, length)
        used = 0
        for j in dev_lzf.tolist():
            n = int(dev_out[j])
            if used + n > buf.size:
                yield _window(buf, fill, device_space, path)
                fill, used = [], 0
            at = int(dev_at[j])
            try:
                data = lzf_decode(ev.data[at : at + int(dev_len[j])].tobytes(), n, st, at - 1)
            except _Stop as stop:
                problems.append(stop.err)
                continue
            buf[used : used + n] = np.frombuffer(data, np.uint8)
            fill.append((used, int(dev_soff[j]), n))
            used += n
        if fill:
            yield _window(buf, fill, device_space, path)

    def page_windows(buf: np.ndarray, problems: list[ImageError]) -> Iterator[Segment]:
        """Scanned copies ``lo`` .. ``lo + WINDOW_PAGES`` into ``buf``, page k at k * PAGE; a
        page that does not decode is left out (and, if the guest's, no longer counted read)."""
        rows = buf.reshape(-1, PAGE)
        for lo in range(0, rec.size, WINDOW_PAGES):
            r = rec[lo : lo + WINDOW_PAGES]
            k = kind[r]
            n = r.size
            ok = np.ones(n, bool)
            plain = np.flatnonzero(k == _PLAIN)
            rows[plain] = pages_in_file[where[r[plain]]]
            rows[np.flatnonzero(k == _ZERO)] = 0
            for slot in np.flatnonzero((k == _LZF) | (k == _SPLIT)).tolist():
                j = int(r[slot])
                try:
                    page = _page_bytes(ev, st, int(kind[j]), int(where[j]), int(clen[j]))
                except _Stop as stop:
                    problems.append(stop.err)
                    ok[slot] = False
                    rows[slot] = 0
                    if lo + slot < win.size:  # the guest's page, not a superseded copy
                        at = int(np.searchsorted(read, key[j]))
                        image.coverage.read -= PAGE * int(at < read.size and read[at] == key[j])
                    continue
                rows[slot] = np.frombuffer(page, np.uint8)
            _release(ev, where[r], np.where(k == _LZF, clen[r], PAGE), (k == _PLAIN) | (k == _LZF))
            at = np.flatnonzero(ok)
            fo = np.where(k == _PLAIN, where[r], -1)[at]
            sel = lo + at
            ext = Extents.build(at * PAGE, addr[sel], np.full(at.size, PAGE), fo, space[sel])
            yield Segment(buf[: n * PAGE], ext, path, reused=True)

    def stream() -> Iterator[Segment]:
        problems: list[ImageError] = []
        covered = image.coverage.read
        if rec.size:
            yield from page_windows(np.zeros(min(WINDOW_PAGES, rec.size) * PAGE, np.uint8),
                                    problems)  # fmt: skip
        yield Segment(ev.data, main, path)
        yield from device_windows(problems)
        if image.coverage.read != covered:
            image.check_coverage()
        if problems:
            seen = {str(w) for w in image.warnings}
            image.warnings += [p for p in problems[1:] if str(p) not in seen]
            raise problems[0]

    image.stream = stream
    data = kind[win] != _ZERO
    gpa_pages = int(np.count_nonzero(data & ((key[win] >> 48) == 0)))
    image.meta.update(
        {
            "pages_stored": int(data.sum()),
            "gpa_pages_stored": gpa_pages,
            "superseded_copies": int(old.size),
            "page_records": len(st.key),
            "device_state_bytes": int(dev_out.sum()),
        }
    )


def _release(ev: Evidence, at: np.ndarray, n: np.ndarray, used: np.ndarray) -> None:
    """Give back the mapped file pages a window's copies came from (``at``/``n``: file offset
    and stored bytes of each copy, ``used``: which were read from the file), when they lie
    together (as they do in a save written in address order), so that resident memory does
    not grow with the file."""
    if not used.any():
        return
    lo, hi = int(at[used].min()), int((at + n)[used].max())
    if hi - lo <= 2 * int(n[used].sum()) + 2 * PAGE:
        ev.release(lo, hi - lo)


def _window(buf: np.ndarray, fill: list[tuple[int, int, int]], space: int, path: str) -> Segment:
    """A reused-window segment of decoded device-state bytes: ``fill`` lists (offset in
    ``buf``, offset in the SSM data stream, length)."""
    off, soff, n = (np.array(c, np.int64) for c in zip(*fill, strict=True))
    ext = Extents.build(off, soff, n, None, space)
    return Segment(buf[: int(off[-1] + n[-1])], ext, path, reused=True)


def _page_bytes(ev: Evidence, st: _State, kind: int, where: int, clen: int) -> bytes:
    if kind == _LZF:
        return lzf_decode(ev.data[where : where + clen].tobytes(), PAGE, st, where - 1)
    if kind == _SPLIT:
        return st.split[where]
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# Parser interface


def probe(head: bytes, path: str) -> str | None:
    return "vbox-sav" if head.startswith(MAGIC_BASE) else None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Walk the saved state's units and map its guest pages (see the module docstring)."""
    if fmt not in FORMATS:
        raise ImageError(path, None, f"unknown VirtualBox format {fmt!r}")
    with Evidence(path).closed_on_error() as ev:
        st = _State(path, ev.size)
        meta = walk(ev, st)
        if not st.passes and st.problems:
            raise st.problems[0]
        if not st.passes:
            raise ImageError(path, None, "this saved state holds no pgm unit (no guest memory)")
        image = MemoryImage(path=path, format="vbox-sav", files=[path], closers=[ev.close])
        image.meta.update(meta)
        image.meta["pgm_passes"] = [("final" if p == PASS_FINAL else p) for p in st.passes]
        if st.ram_size is not None:
            image.meta["ram_size"] = st.ram_size
        if st.ram_hole is not None:
            image.meta["ram_hole"] = st.ram_hole
        image.meta["mmio2_ranges"] = [
            f"{r.ident}: {r.desc} ({r.device}#{r.instance}, {r.size} bytes)"
            for r in st.mmio2.values()
        ]
        image.meta["rom_ranges"] = [
            f"{r.ident}: {r.desc} at {r.gcphys:#x} ({r.size} bytes)" for r in st.rom.values()
        ]
        build(ev, st, image)
        image.warnings.extend(st.problems)
        image.check_coverage()
    return image
