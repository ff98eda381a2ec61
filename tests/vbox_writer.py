"""TEST-ONLY writer of VirtualBox saved states (.sav, SSM V2.0).

Written from the same public facts as ``parsers/vbox.py`` (VirtualBox ``SSM.cpp`` and
``PGMSavedState.cpp``; docs/formats.md), not from a VirtualBox product, which cannot run here.
It writes the way SSM does: small puts go into a 4 KiB buffer flushed as a raw record; a put
over 512 bytes is written per 4 KiB block as an LZF record (when LZF output fits in 3840
bytes), a raw record, or a zero record. The pgm unit follows ``pgmR3SaveExec`` (final pass)
and ``pgmR3LiveExec`` (live passes). Not product code: nothing in ``parsers/`` imports it.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import lzf

PAGE = 4096
MAGIC = b"\x7fVirtualBox SavedState V2.0\n\0\0\0"
PASS_FINAL = 0xFFFFFFFF
STRUCT_BEGIN = 0x19200102
STRUCT_END = 0x19920406
DEFAULT_HOLE = 512 << 20  # VirtualBox's default RamHoleSize
# Its largest (CFGM "RamHoleSize", up to 4032 MB): 64 MiB of RAM below 4 GiB, so a test file
# with RAM above 4 GiB writes 16 Ki page records, not a million.
MAX_HOLE = 4032 << 20
GIB4 = 1 << 32
KIB640 = 640 << 10
MIB = 1 << 20

# Ways a page's 4 KiB reach the file: as SSM writes them ("ssm": LZF, or raw when LZF does not
# shrink it enough, or a zero record for a zero page), forced raw, or as eight 512-byte puts
# through the small-write buffer (the page then lies inside or across buffered raw records).
CODECS = ("ssm", "raw", "small")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass
class Range:
    ident: int
    desc: str
    size: int
    gcphys: int = 0  # ROM ranges only
    device: str = ""


@dataclass
class Pass:
    """Pages one pass writes. ``ram``: GPA -> 4 KiB of data, or None for a zero page record,
    or "balloon" for a ballooned page. ``mmio2``/``rom_virgin``/``rom_shadow``: (range id,
    page index) -> data or None (zero record)."""

    ram: dict[int, bytes | str | None] = field(default_factory=dict)
    mmio2: dict[tuple[int, int], bytes | None] = field(default_factory=dict)
    rom_virgin: dict[tuple[int, int], bytes] = field(default_factory=dict)
    rom_shadow: dict[tuple[int, int], bytes | None] = field(default_factory=dict)


class _Unit:
    """SSM's unit data writer: buffered small puts, blocked big puts."""

    def __init__(self, codec: str | list[str], rng: random.Random) -> None:
        self.out = bytearray()
        self.buf = bytearray()
        self.codec = codec
        self.rng = rng

    def _codec(self) -> str:
        return self.codec if isinstance(self.codec, str) else self.rng.choice(self.codec)

    def _hdr(self, rtype: int, n: int) -> bytes:
        b0 = 0x80 | 0x10 | rtype
        if n < 0x80:
            return bytes([b0, n])
        if n < 0x800:
            return bytes([b0, 0xC0 | n >> 6, 0x80 | n & 0x3F])
        if n < 0x10000:
            return bytes([b0, 0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])
        return bytes(
            [b0, 0xF0 | n >> 18, 0x80 | (n >> 12) & 0x3F, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F]
        )

    def flush(self) -> None:
        if self.buf:
            self.out += self._hdr(2, len(self.buf)) + self.buf
            self.buf = bytearray()

    def put(self, data: bytes) -> None:
        if len(data) > 512:
            self.big(data)
            return
        if len(self.buf) + len(data) > PAGE:
            self.flush()
        self.buf += data

    def big(self, data: bytes, codec: str | None = None) -> None:
        codec = codec or self._codec()
        if codec == "small":
            for k in range(0, len(data), 512):
                self.put(data[k : k + 512])
            return
        self.flush()
        while len(data) >= PAGE:
            block, data = data[:PAGE], data[PAGE:]
            if codec == "ssm" and not any(block):
                self.out += bytes([0x94, 1, 4])
            else:
                packed = lzf.compress(block, PAGE - PAGE // 16) if codec == "ssm" else None
                if packed:
                    body = bytes([4]) + packed
                    self.out += self._hdr(3, len(body)) + body
                else:
                    self.out += self._hdr(2, PAGE) + block
        if data:
            self.out += self._hdr(2, len(data)) + data

    def u8(self, v: int) -> None:
        self.put(bytes([v]))

    def u32(self, v: int) -> None:
        self.put(struct.pack("<I", v))

    def u64(self, v: int) -> None:
        self.put(struct.pack("<Q", v))

    def strz(self, s: str) -> None:
        raw = s.encode()
        self.u32(len(raw))
        self.put(raw)

    def finish(self) -> bytes:
        """The unit's records with the termination record."""
        self.flush()
        cb_unit = len(self.out) + 16
        self.out += struct.pack("<BBHIQ", 0x91, 14, 0, 0, cb_unit)
        return bytes(self.out)


def ram_ranges(ram_size: int, ram_hole: int) -> list[tuple[int, int]]:
    """(first, end) GPAs of the RAM VirtualBox 7 registers for ``ram_size`` bytes
    (``MMR3InitPaging``): "Conventional RAM" below 640 KiB, extended RAM from 1 MiB up to
    4 GiB minus the hole, the rest from 4 GiB. Nothing between 640 KiB and 1 MiB is RAM."""
    below = min(ram_size, GIB4 - ram_hole)
    out = [(0, min(ram_size, KIB640)), (MIB, below), (GIB4, GIB4 + ram_size - below)]
    return [(a, b) for a, b in out if b > a]


@dataclass
class SavFile:
    """A saved state to write. Passes: one (a plain save, final pass only) or several (a live
    save: passes 0.. then the final pass, the last one listed).

    ``complete``: as VirtualBox does, every RAM page of the declared RAM (``ram_ranges``) gets
    a record — pages no pass gives are zero-page records of the first pass (a live save's pass
    0 sends every page) —, except the pages of ROM ranges (saved as ROM records). False writes
    only the pages given: a save that lost pages. ``ram_size`` None: the smallest size in whole
    MiB whose RAM holds every page given."""

    passes: list[Pass]
    ram_size: int | None = None
    ram_hole: int = MAX_HOLE
    complete: bool = True
    mmio2: list[Range] = field(default_factory=list)
    rom: list[Range] = field(default_factory=list)
    cpus: int = 2
    codec: str | list[str] = "ssm"
    seed: int = 0
    live_flag: bool | None = None  # the header's live-save bit (default: several passes)
    extra_units: bool = True  # a device unit before and after the pgm units
    device_state: bytes = b""  # more data of the vga unit (put as SSM puts it: raw or LZF)
    cb_gcphys: int = 8

    def write(self, path: str) -> str:
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())
        return path

    def declared_size(self) -> int:
        """The RAM size the file declares (``ram_size``, or derived from the pages given)."""
        if self.ram_size is not None:
            return self.ram_size
        top = max((g for p in self.passes for g in p.ram), default=0) + PAGE
        low = GIB4 - self.ram_hole
        size = top if top <= low else low + max(0, top - GIB4)
        return -(-size // MIB) * MIB

    def _filled(self) -> list[Pass]:
        """The passes, the first one given a zero record for every page no pass gives."""
        if not self.complete:
            return self.passes
        given = {g for p in self.passes for g in p.ram}
        rom = [(r.gcphys, r.gcphys + r.size) for r in self.rom]
        first = Pass(dict(self.passes[0].ram), self.passes[0].mmio2,
                     self.passes[0].rom_virgin, self.passes[0].rom_shadow)  # fmt: skip
        for a, b in ram_ranges(self.declared_size(), self.ram_hole):
            for g in range(a, b, PAGE):
                if g not in given and not any(c <= g < d for c, d in rom):
                    first.ram[g] = None
        return [first, *self.passes[1:]]

    def to_bytes(self) -> bytes:
        rng = random.Random(self.seed)
        live = len(self.passes) > 1
        passes = self._filled()
        flag = live if self.live_flag is None else self.live_flag
        hdr = bytearray(
            struct.pack(
                "<32sHHIIBBBBIIII",
                MAGIC,
                7,
                1,
                4,
                165100,
                64,
                self.cb_gcphys,
                8,
                0,
                5,
                (2 if flag else 0),
                PAGE,
                0,
            )
        )
        hdr[60:64] = struct.pack("<I", crc32(bytes(hdr)))
        out = bytearray(hdr)
        units: list[tuple[str, int, int, int, bytes]] = []  # name, version, instance, pass, data
        if self.extra_units:
            ssm = _Unit("ssm", rng)
            for s in ("Build Type", "release", "Host OS", "linux.amd64", "", ""):
                ssm.strz(s)
            units.append(("SSM", 1, 0, PASS_FINAL if not live else 0, ssm.finish()))
        for i, p in enumerate(passes):
            final = i == len(passes) - 1
            number = PASS_FINAL if final else i
            units.append(("pgm", 14, 0, number, self._pgm(p, number, live, rng)))
        if self.extra_units:
            dev = _Unit("ssm", rng)
            dev.put(b"device state: vga registers " * 4)
            dev.big(bytes(range(256)) * 16)
            dev.put(self.device_state)
            units.append(("vga", 27, 0, PASS_FINAL, dev.finish()))
        directory = []
        for name, version, instance, number, data in units:
            off = len(out)
            raw_name = name.encode() + b"\0"
            head = bytearray(
                struct.pack(
                    "<8sQIIIIIII",
                    b"\nUnit\n\0\0",
                    off,
                    0,
                    0,
                    version,
                    instance,
                    number,
                    0,
                    len(raw_name),
                )
            )
            head += raw_name
            head[0x14:0x18] = struct.pack("<I", crc32(bytes(head)))
            out += head + data
            if number == PASS_FINAL:
                directory.append((off, instance, crc32(name.encode())))
        end = bytearray(struct.pack("<8sQIIIIIII", b"\nTheEnd\0", len(out), 0, 0, 0, 0, 0, 0, 0))
        end[0x14:0x18] = struct.pack("<I", crc32(bytes(end)))
        out += end
        d = bytearray(struct.pack("<8sII", b"\nDir\n\0\0\0", 0, len(directory)))
        for e in directory:
            d += struct.pack("<QII", *e)
        d[8:12] = struct.pack("<I", crc32(bytes(d)))
        out += d
        foot = bytearray(struct.pack("<8sQIIII", b"\nFooter\0", len(out), 0, len(directory), 0, 0))
        foot[28:32] = struct.pack("<I", crc32(bytes(foot)))
        out += foot
        return bytes(out)

    def _pgm(self, p: Pass, number: int, live: bool, rng: random.Random) -> bytes:
        u = _Unit(self.codec, rng)
        if number == PASS_FINAL:
            u.u32(STRUCT_BEGIN)
            u.put(bytes(1 + 8 + 4 + 4))  # old mapping fields + cBalloonedPages
            u.u32(STRUCT_END)
            for _ in range(self.cpus):
                u.u32(STRUCT_BEGIN)
                u.put(b"\1" + struct.pack("<QI", (1 << 64) - 1, 5) + bytes(32))
                u.u32(STRUCT_END)
        if number == 0 or (number == PASS_FINAL and not live):
            u.u32(self.ram_hole)
            u.u64(self.declared_size())
            for r in self.rom:
                u.u8(r.ident)
                u.strz(r.device)
                u.u32(0)
                u.u8(0)
                u.strz(r.desc)
                u.put(r.gcphys.to_bytes(self.cb_gcphys, "little"))
                u.put(r.size.to_bytes(self.cb_gcphys, "little"))
            u.u8(0xFF)
            for r in self.mmio2:
                u.u8(r.ident)
                u.strz(r.device or "vga")
                u.u32(0)
                u.u8(0)
                u.strz(r.desc)
                u.put(r.size.to_bytes(self.cb_gcphys, "little"))
            u.u8(0xFF)
        self._ranged(u, p.rom_virgin, 0x04, True)
        self._ranged(u, p.rom_shadow, 0x05, True)
        self._ranged(u, p.mmio2, 0x02, False)
        last = None
        for gpa in sorted(p.ram):
            data = p.ram[gpa]
            if data is None:
                rtype = 0x00
            elif data == "balloon":
                rtype = 0x08
            else:
                rtype = 0x01
            if last is not None and gpa == last + PAGE:
                u.u8(rtype)
            else:
                u.u8(rtype | 0x80)
                u.put(gpa.to_bytes(self.cb_gcphys, "little"))
            if rtype == 0x01:
                assert isinstance(data, bytes) and len(data) == PAGE
                u.big(data)
            last = gpa
        u.u8(0xFF)
        return u.finish()

    def _ranged(self, u: _Unit, pages: dict, raw_type: int, rom: bool) -> None:
        """MMIO2 / ROM records: explicit (range id, index) unless the next index of a range."""
        last = None
        for ident, index in sorted(pages):
            data = pages[(ident, index)]
            rtype = raw_type if data is not None else raw_type + 1
            if last == (ident, index - 1):
                u.u8(rtype)
            else:
                u.u8(rtype | 0x80)
                u.u8(ident)
                u.u32(index)
            if rom:
                u.u8(1)  # protection
            if data is not None:
                u.big(data)
            last = (ident, index)


def write_sav_from_raw(raw_path: str, out_path: str, chunk: int = 1 << 20) -> int:
    """Stream a flat raw image into a one-pass saved state at ``out_path`` as SSM writes it
    (LZF / raw / zero records), reading ``chunk`` bytes at a time: memory does not grow with the
    image. The image's size is the RAM size (default RAM hole); its byte k is GPA k below the
    hole, the rest is RAM from 4 GiB; its bytes at 640 KiB - 1 MiB are left out, as VirtualBox
    has no RAM there. Returns the guest bytes written."""
    size = os.path.getsize(raw_path)
    sav = SavFile([Pass()], ram_size=size, ram_hole=DEFAULT_HOLE, extra_units=False)
    below = min(size, GIB4 - DEFAULT_HOLE)
    head = sav.to_bytes()
    # Reuse the header; write the pgm unit by hand, streaming.
    file_header = head[:64]
    rng = random.Random(0)
    with open(raw_path, "rb") as src, open(out_path, "wb") as out:
        out.write(file_header)
        unit_off = out.tell()
        raw_name = b"pgm\0"
        hdr = bytearray(struct.pack("<8sQIIIIIII", b"\nUnit\n\0\0", unit_off, 0, 0, 14, 0,
                                    PASS_FINAL, 0, len(raw_name)))  # fmt: skip
        hdr += raw_name
        hdr[0x14:0x18] = struct.pack("<I", crc32(bytes(hdr)))
        out.write(hdr)
        u = _Unit("ssm", rng)
        u.u32(STRUCT_BEGIN)
        u.put(bytes(17))
        u.u32(STRUCT_END)
        u.u32(sav.ram_hole)
        u.u64(size)
        u.u8(0xFF)
        u.u8(0xFF)
        written = 0
        offset = 0  # in the raw image
        last = -1  # GPA of the previous page record
        stored = 0
        while True:
            data = src.read(chunk)
            if not data:
                break
            for k in range(0, len(data) - PAGE + 1, PAGE):
                pg = data[k : k + PAGE]
                at, offset = offset, offset + PAGE
                if KIB640 <= at < MIB:
                    continue
                gpa = at if at < below else GIB4 + at - below
                rtype = 0x01 if any(pg) else 0x00
                if gpa == last + PAGE:
                    u.u8(rtype)
                else:
                    u.u8(rtype | 0x80)
                    u.u64(gpa)
                if rtype:
                    u.big(pg)
                last = gpa
                stored += PAGE
            u.flush()
            out.write(u.out)
            written += len(u.out)
            u.out = bytearray()
        u.u8(0xFF)
        u.flush()
        body = bytes(u.out)
        cb_unit = written + len(body) + 16
        out.write(body + struct.pack("<BBHIQ", 0x91, 14, 0, 0, cb_unit))
        end = bytearray(struct.pack("<8sQIIIIIII", b"\nTheEnd\0", out.tell(), 0, 0, 0, 0, 0, 0, 0))
        end[0x14:0x18] = struct.pack("<I", crc32(bytes(end)))
        out.write(end)
        d = bytearray(struct.pack("<8sII", b"\nDir\n\0\0\0", 0, 1))
        d += struct.pack("<QII", unit_off, 0, crc32(b"pgm"))
        d[8:12] = struct.pack("<I", crc32(bytes(d)))
        out.write(d)
        foot = bytearray(struct.pack("<8sQIIII", b"\nFooter\0", out.tell(), 0, 1, 0, 0))
        foot[28:32] = struct.pack("<I", crc32(bytes(foot)))
        out.write(foot)
    return stored
