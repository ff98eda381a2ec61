"""Hyper-V saved states: ``.vmrs`` (Windows Server 2016 and later, a "HyperVStorage"
container) and the legacy ``.bin`` + ``.vsv`` pair (Windows Server 2008 - 2012 R2).

Microsoft documents only a Windows DLL for these files (VmSavedStateDumpProvider); what is
below follows public reverse-engineering notes, which disagree in places (docs/formats.md,
"Hyper-V", says which source says what). Every reading they allow is accepted:

- **Container** (dissect.hypervisor ``descriptor/c_hyperv.py`` + ``hyperv.py``; VMkatz
  ``src/hyperv/vmrs.rs``; the VMRS reader in Pascal Beyer's snapshot tool): two 46-byte headers
  at 0x0 and 0x1000, each with a CRC-32 and a 16-bit sequence number: the valid one with the
  newer sequence number wins. The object table is at 0x2000 (dissect), at twice the header's
  last field (Beyer) or at the offset in the header's field at 26 (VMkatz); the first of
  these that holds the object-table signature is used. Object-table entries of type 2 are key
  tables; entries of type 1 chain further object tables.
- **Keys**: key tables hold entries (type, flags, size, parent, name, value); a value of 2 KiB
  or more is a *file object pointer* (u32 size, u64 absolute file offset).
  ``RamBlock<N>`` values hold guest RAM, 1 MiB each; ``RamMemoryBlock<N>`` values (Beyer) say
  where runs of RamBlocks sit in guest-physical memory (u64 page count at 8, u64 base page at
  24): that is how the MMIO gap below 4 GiB of a Generation 1 VM is skipped. Without them
  (VMkatz's reading) RamBlock N is mapped at N MiB, with a warning.
- **RamBlock encoding**: a value of exactly 1 MiB is raw memory. Otherwise a sequence of u32
  tags: 0xFFFFFFFF end; 0xFFFFFFFE one page filled with a u64 pattern; 0xFFFFFFFD a run of
  pattern pages (u32 count + u64 pattern per VMkatz, u64 pattern + u32 count per Beyer);
  0xFFFFFFFC a variable-size page (u32 size + data, one page, per VMkatz; u32 decoded size +
  u32 size + data per Beyer); any other value n <= 4096 is n bytes of one page: stored as is
  when n is 4096, else compressed. Which field order a block uses is decided per block: the
  reading whose tags add up to the block's 256 pages wins. The page codec is LZNT1 per VMkatz
  and XPRESS (MS-XCA plain LZ77, Windows' compression format 3) per Beyer: each page is tried
  as LZNT1 when it starts with an LZNT1 chunk header, else (or then) as XPRESS, and must
  decode to exactly its size.

Legacy ``.bin`` files are guest RAM, read identity-mapped (VMkatz) — its layout past the MMIO
gap is not publicly documented, so a large one gets a warning. A ``.bin`` has no magic: it is
taken as Hyper-V memory only beside its ``.vsv`` (same name), which is listed as a companion.
The ``.vsv`` (device state, undocumented layout) is scanned whole as ``region:device-state``,
addressed by its file offset: device buffers can hold guest data too. Likewise in a ``.vmrs``,
the value of every key that is not a ``RamBlock<N>`` (device state, configuration, the
``RamMemoryBlock`` runs) is scanned as ``region:device-state`` at its file offset.

Coverage (contract 4): a ``.vmrs`` declares its guest RAM through the ``RamMemoryBlock`` runs
(or, without them, 1 MiB per ``RamBlock`` up to the highest index); pages of every RamBlock read
(stored, compressed and decoded, or pattern fills) count as read, so a damaged or missing
RamBlock is a declared-vs-read error. Nothing in a legacy ``.bin`` or its ``.vsv`` declares the
RAM size publicly: a ``.bin`` only reports what it holds.

Every page is laid into bounded windows in RAM page order: raw pages copied (keeping their file
offset), compressed pages decoded through libfwnt (``pyfwnt``), each into at most its size,
pattern pages (zero ones included) filled, so that guest neighbours are neighbours in a window
and a secret straddling two pages is found whatever tags hold them.
"""

from __future__ import annotations

import os
import re
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
    Remark,
    Segment,
)

FORMATS = ["hyperv-vmrs", "hyperv-bin"]

PAGE = 4096
BLOCK = 1 << 20  # bytes of guest RAM in one RamBlock value
BLOCK_PAGES = BLOCK // PAGE

SIGNATURE = 0x01282014  # HyperVStorage header
HEADER_OFFSETS = (0x0, 0x1000)
# HyperVStorageHeader, 46 bytes (dissect names; VMkatz's names in brackets):
HEADER = struct.Struct(
    "<I"  # signature
    "I"  # checksum: CRC-32 of the 46 bytes with this field zero
    "H"  # sequence_number: the valid header with the newer one is active
    "I"  # version (0x400 seen by dissect)
    "Q"  # unknown
    "I"  # alignment (0x1000..0x10000)
    "Q"  # replay_log_offset [data_offset: VMkatz reads the object table here]
    "Q"  # replay_log_size [data_size]
    "I"  # header_size [undo_size]; Beyer's object table is at twice this value
)
OBJECT_TABLE_SIGNATURE = 0x01110001
OBJECT_TABLE_OFFSET = 0x2000  # dissect
OBJECT_TABLE = struct.Struct("<II")  # signature, number of entries
OBJECT_ENTRY = struct.Struct(
    "<B"  # type: 1 object table, 2 key table, 3 file, 4 free, 6 replay log, 7 change tracking
    "I"  # checksum
    "Q"  # offset in the file
    "I"  # size
    "B"  # allocated (dissect skips entries with 0)
)
OBJ_OBJECT_TABLE = 1
OBJ_KEY_TABLE = 2
KEY_TABLE = struct.Struct("<HHHI")  # signature 2, table index, sequence number, checksum
KEY_TABLE_SIGNATURE = 2
KEY_ENTRY = struct.Struct(
    "<H"  # low byte: data type (1 free .. 9 node); high byte: flags (1 = file object pointer)
    "I"  # size of the whole entry
    "H"  # parent table index (0: a root key)
    "I"  # parent entry offset inside that table
    "I"  # checksum
    "I"  # insertion sequence
    "B"  # data offset: length of the NUL-terminated name; the value follows it
)
KEY_FREE = 1
KEY_ARRAY = 7
KEY_NODE = 9  # a key that only parents others
FLAG_FILE_OBJECT = 0x01
FILE_OBJECT = struct.Struct("<IQ")  # value size, absolute file offset

TAG_END = 0xFFFFFFFF
TAG_FILL = 0xFFFFFFFE  # + u64 pattern: one page
TAG_FILL_RUN = 0xFFFFFFFD  # + (u32 count, u64 pattern) or (u64 pattern, u32 count)
TAG_VARIABLE = 0xFFFFFFFC  # + u32 size + data, or u32 decoded size + u32 size + data
# Field orders of the two disputed tags, tried in this order per block:
DIALECTS = (("pattern-count", "sized"), ("count-pattern", "one-page"),
            ("pattern-count", "one-page"), ("count-pattern", "sized"))  # fmt: skip

MAX_OBJECT_TABLES = 64
MAX_OBJECTS = 1 << 20
MAX_KEY_TABLE = 64 << 20  # bytes of one key table read
MAX_KEYS = 1 << 20
MAX_BLOCKS = 1 << 22  # 4 TiB of RamBlocks
WINDOW_PAGES = 1024  # pages per reused window (4 MiB)
MAX_WARNINGS = 8
BIN_EXT = ".bin"
VSV_EXT = ".vsv"
BIN_GAP_WARNING = 3 << 30  # a .bin larger than this may hold RAM past the MMIO gap

_RAMBLOCK = re.compile(r"RamBlock(\d+)$")
_MEMBLOCK = re.compile(r"RamMemoryBlock(\d+)$")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class _Bad(Exception):
    """A damaged structure: ``at`` is its file offset."""

    def __init__(self, at: int, message: str) -> None:
        super().__init__(message)
        self.at = at
        self.message = message


# ---------------------------------------------------------------------------------------------
# Container


@dataclass
class _Key:
    name: str
    dtype: int
    flags: int
    table: int
    offset: int  # inside its table
    parent: tuple[int, int]
    value_at: int  # file offset of the value
    value_size: int
    entry_at: int  # file offset of the entry


@dataclass
class _Container:
    header_at: int
    sequence: int
    version: int
    object_table_at: int
    object_table_reading: str
    keys: list[_Key] = field(default_factory=list)
    warnings: list[ImageError] = field(default_factory=list)


def _headers(ev: Evidence, path: str) -> tuple[int, tuple, list[ImageError]]:
    """The active header (offset, fields) and complaints about the other."""
    good, notes = [], []
    for off in HEADER_OFFSETS:
        raw = ev.read(off, HEADER.size)
        if len(raw) < HEADER.size:
            notes.append(ImageError(path, off, "truncated: HyperVStorage header"))
            continue
        f = HEADER.unpack(raw)
        if f[0] != SIGNATURE:
            notes.append(ImageError(path, off, f"no HyperVStorage signature ({f[0]:#010x})"))
            continue
        if crc32(raw[:4] + b"\0\0\0\0" + raw[8:]) != f[1]:
            notes.append(ImageError(path, off, "HyperVStorage header CRC-32 mismatch"))
            continue
        good.append((off, f))
    if not good:
        raise ImageError(path, 0, "no valid HyperVStorage header (" + "; ".join(
            n.message for n in notes) + ")")  # fmt: skip
    if len(good) == 2:
        (o1, f1), (o2, f2) = good
        # 16-bit sequence numbers wrap: the one a step ahead of the other is newer (VMkatz).
        newer = (f2[2] - f1[2]) & 0xFFFF
        active = good[1] if 0 < newer < 0x8000 else good[0]
        return active[0], active[1], []
    return good[0][0], good[0][1], notes


def _object_table_candidates(f: tuple) -> list[tuple[str, int]]:
    """Where the object table may lie, per source, in the order tried."""
    return [
        ("fixed 0x2000 (dissect.hypervisor)", OBJECT_TABLE_OFFSET),
        ("twice the header size (Beyer)", 2 * f[8]),
        ("header field at 26 (VMkatz)", f[6]),
    ]


def read_container(ev: Evidence, path: str) -> _Container:
    at, f, notes = _headers(ev, path)
    table_at, reading = -1, ""
    for name, off in _object_table_candidates(f):
        raw = ev.read(off, 4) if 0 < off < ev.size else b""
        if len(raw) == 4 and int.from_bytes(raw, "little") == OBJECT_TABLE_SIGNATURE:
            table_at, reading = off, name
            break
    if table_at < 0:
        raise ImageError(path, at, "no object table (signature 0x01110001) at 0x2000, at twice "
                         "the header size, nor at the header's offset field")  # fmt: skip
    c = _Container(at, f[2], f[3], table_at, reading, warnings=list(notes))
    tables: list[int] = [table_at]
    key_tables: dict[int, tuple[int, int, int]] = {}  # index -> (sequence, offset, size)
    seen = 0
    while tables:
        if len(tables) + seen > MAX_OBJECT_TABLES:
            c.warnings.append(ImageError(path, tables[0], "too many chained object tables"))
            break
        t = tables.pop(0)
        seen += 1
        head = ev.read(t, OBJECT_TABLE.size)
        if len(head) < OBJECT_TABLE.size:
            c.warnings.append(ImageError(path, t, "truncated: object table"))
            continue
        sig, n = OBJECT_TABLE.unpack(head)
        if sig != OBJECT_TABLE_SIGNATURE:
            c.warnings.append(ImageError(path, t, f"object table signature {sig:#010x}"))
            continue
        fits = (ev.size - t - OBJECT_TABLE.size) // OBJECT_ENTRY.size
        if n > min(fits, MAX_OBJECTS):
            c.warnings.append(ImageError(path, t, f"object table of {n} entries runs past the "
                                         "end of file; reading those that fit"))  # fmt: skip
            n = min(fits, MAX_OBJECTS)
        body = ev.read(t + OBJECT_TABLE.size, n * OBJECT_ENTRY.size)
        for k in range(n):
            etype, _, off, size, allocated = OBJECT_ENTRY.unpack_from(body, k * OBJECT_ENTRY.size)
            if not allocated:
                continue
            if etype == OBJ_OBJECT_TABLE and off != t:
                tables.append(off)
            elif etype == OBJ_KEY_TABLE:
                kt = ev.read(off, KEY_TABLE.size)
                if len(kt) < KEY_TABLE.size or off + size > ev.size or size > MAX_KEY_TABLE:
                    c.warnings.append(ImageError(path, t + OBJECT_TABLE.size + k *
                                                 OBJECT_ENTRY.size,
                                                 "key table outside the file"))  # fmt: skip
                    continue
                ksig, index, seq, _ = KEY_TABLE.unpack(kt)
                if ksig != KEY_TABLE_SIGNATURE:
                    c.warnings.append(ImageError(path, off, f"key table signature {ksig}"))
                    continue
                # Several tables of one index: the newest sequence number is current (dissect).
                if index not in key_tables or seq > key_tables[index][0]:
                    key_tables[index] = (seq, off, size)
    for index, (_, off, size) in sorted(key_tables.items()):
        _read_keys(ev, path, index, off, size, c)
    return c


def _read_keys(ev: Evidence, path: str, index: int, off: int, size: int, c: _Container) -> None:
    raw = ev.data[off : off + size].tobytes()
    p = KEY_TABLE.size
    while p + KEY_ENTRY.size <= size:
        if len(c.keys) >= MAX_KEYS:
            c.warnings.append(ImageError(path, off + p, f"more than {MAX_KEYS} keys"))
            return
        tf, esize, pidx, poff, _, _, name_len = KEY_ENTRY.unpack_from(raw, p)
        if esize == 0:
            return
        if esize < KEY_ENTRY.size or p + esize > size:
            c.warnings.append(ImageError(path, off + p, f"key entry of {esize} bytes runs past "
                                         "its table"))  # fmt: skip
            return
        dtype, flags = tf & 0xFF, tf >> 8
        if dtype != KEY_FREE and name_len:
            name = raw[p + KEY_ENTRY.size : p + KEY_ENTRY.size + name_len - 1]
            value_at = p + KEY_ENTRY.size + name_len
            v_at, v_size = off + value_at, max(0, esize - KEY_ENTRY.size - name_len)
            if flags & FLAG_FILE_OBJECT and value_at + FILE_OBJECT.size <= p + esize:
                v_size, v_at = FILE_OBJECT.unpack_from(raw, value_at)
            elif dtype == KEY_ARRAY and value_at + 4 <= p + esize:
                v_size = int.from_bytes(raw[value_at : value_at + 4], "little")
                v_at = off + value_at + 4
                if value_at + 4 + v_size > p + esize:
                    c.warnings.append(ImageError(path, off + p, "key value runs past its entry"))
                    v_size = 0
            c.keys.append(_Key(name.decode("utf-8", "replace"), dtype, flags, index, p,
                               (pidx, poff), v_at, v_size, off + p))  # fmt: skip
        p += esize


def key_paths(c: _Container) -> dict[int, str]:
    """Full key path of every key (by list index), following parent links (bounded)."""
    by_place = {(k.table, k.offset): i for i, k in enumerate(c.keys)}
    out: dict[int, str] = {}
    for i, k in enumerate(c.keys):
        parts, cur, hops = [k.name], k, 0
        while cur.parent[0] and hops < 64:
            j = by_place.get(cur.parent)
            if j is None:
                break
            cur = c.keys[j]
            parts.append(cur.name)
            hops += 1
        out[i] = "/".join(reversed(parts))
    return out


# ---------------------------------------------------------------------------------------------
# Page codecs


def _fwnt() -> Any:
    try:
        import pyfwnt
    except ImportError:
        return None
    return pyfwnt


def decode_page(data: bytes, size: int) -> tuple[bytes, str]:
    """Decode one compressed page to exactly ``size`` bytes, telling LZNT1 and XPRESS apart
    (the LZNT1 chunk-header signature, then whichever decodes to exactly ``size``). Raises
    ValueError when neither does; the output buffer never exceeds ``size`` + 1 bytes."""
    fwnt = _fwnt()
    if fwnt is None:
        raise ValueError("python package 'libfwnt-python' is not installed")
    order = ["xpress", "lznt1"]
    if len(data) >= 2 and (int.from_bytes(data[:2], "little") & 0x7000) == 0x3000:
        order.reverse()
    for codec in order:
        try:
            if codec == "lznt1":
                out = fwnt.lznt1_decompress(data, size)
            else:
                out = fwnt.lzxpress_decompress(data, size + 1)
        except (OSError, ValueError, TypeError):
            continue
        if len(out) == size:
            return bytes(out), codec
    raise ValueError(f"page decodes to {size} bytes neither as LZNT1 nor as XPRESS")


# ---------------------------------------------------------------------------------------------
# RamBlocks


# A piece of a block: (first page in block, pages, kind, file offset, stored size, pattern)
_RAW, _FILL, _PACKED = 0, 1, 2


def _walk_block(data: bytes, base: int, fd_order: str, fc_mode: str) -> tuple[list, int]:
    """Pieces of a tag-encoded RamBlock under one reading of the disputed tags; raises _Bad."""
    pieces: list[tuple[int, int, int, int, int, int]] = []
    p, page, n = 0, 0, len(data)
    while p + 4 <= n and page < BLOCK_PAGES:
        tag = int.from_bytes(data[p : p + 4], "little")
        at = base + p
        if tag == TAG_END:
            return pieces, page
        if tag == TAG_FILL:
            if p + 12 > n:
                raise _Bad(at, "fill tag runs past the RamBlock")
            pieces.append((page, 1, _FILL, 0, 0, int.from_bytes(data[p + 4 : p + 12], "little")))
            page += 1
            p += 12
        elif tag == TAG_FILL_RUN:
            if p + 16 > n:
                raise _Bad(at, "pattern-run tag runs past the RamBlock")
            if fd_order == "count-pattern":
                count = int.from_bytes(data[p + 4 : p + 8], "little")
                pattern = int.from_bytes(data[p + 8 : p + 16], "little")
            else:
                pattern = int.from_bytes(data[p + 4 : p + 12], "little")
                count = int.from_bytes(data[p + 12 : p + 16], "little")
            if not 1 <= count <= BLOCK_PAGES - page:
                raise _Bad(at, f"pattern run of {count} pages")
            pieces.append((page, count, _FILL, 0, 0, pattern))
            page += count
            p += 16
        elif tag == TAG_VARIABLE:
            if fc_mode == "sized":
                if p + 12 > n:
                    raise _Bad(at, "variable-size tag runs past the RamBlock")
                out = int.from_bytes(data[p + 4 : p + 8], "little")
                size = int.from_bytes(data[p + 8 : p + 12], "little")
                start = p + 12
            else:
                if p + 8 > n:
                    raise _Bad(at, "variable-size tag runs past the RamBlock")
                out, size = PAGE, int.from_bytes(data[p + 4 : p + 8], "little")
                start = p + 8
            if out == 0 or out % PAGE or out // PAGE > BLOCK_PAGES - page:
                raise _Bad(at, f"variable-size page decoding to {out} bytes")
            if size == 0 or size > out or start + size > n:
                raise _Bad(at, f"variable-size page of {size} bytes")
            kind = _RAW if size == out else _PACKED
            pieces.append((page, out // PAGE, kind, base + start, size, 0))
            page += out // PAGE
            p = start + size
        elif 0 < tag <= PAGE:
            if p + 4 + tag > n:
                raise _Bad(at, f"page of {tag} bytes runs past the RamBlock")
            kind = _RAW if tag == PAGE else _PACKED
            pieces.append((page, 1, kind, base + p + 4, tag, 0))
            page += 1
            p += 4 + tag
        else:
            raise _Bad(at, f"unknown RamBlock page tag {tag:#010x}")
    if page < BLOCK_PAGES and p + 4 > n and p != n:
        raise _Bad(base + p, "RamBlock ends inside a tag")
    return pieces, page


def parse_block(ev: Evidence, at: int, size: int) -> tuple[list, str]:
    """Pieces of the RamBlock value at file offset ``at``; the reading used is returned.
    A value of exactly 1 MiB is raw memory. Raises _Bad (the first reading's complaint)."""
    if size == BLOCK:
        return [(0, BLOCK_PAGES, _RAW, at, BLOCK, 0)], "raw"
    data = ev.data[at : at + size].tobytes()
    # The tags are read from this copy: give the mapped pages back, or opening a .vmrs would
    # leave every RamBlock resident (they stay in the page cache for the stream).
    ev.release(at, size)
    first: _Bad | None = None
    partial = None
    for fd, fc in DIALECTS:
        try:
            pieces, pages = _walk_block(data, at, fd, fc)
        except _Bad as bad:
            first = first or bad
            continue
        if pages == BLOCK_PAGES:
            return pieces, f"{fd}/{fc}"
        partial = partial or (pieces, f"{fd}/{fc} ({pages} pages)")
    if partial is not None:
        return partial
    assert first is not None
    raise first


# ---------------------------------------------------------------------------------------------
# Image


@dataclass
class _Layout:
    """Global RAM page index -> GPA: runs (first page index, pages, GPA)."""

    starts: np.ndarray
    pages: np.ndarray
    gpas: np.ndarray
    source: str

    def gpa(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(GPA or -1, mapped mask) for global page indexes."""
        if self.starts.size == 0:  # a damaged file may declare no memory run at all
            return np.full(idx.shape, -1, np.int64), np.zeros(idx.shape, bool)
        k = np.searchsorted(self.starts, idx, side="right") - 1
        k = np.maximum(k, 0)
        ok = (idx >= self.starts[k]) & (idx < self.starts[k] + self.pages[k])
        return np.where(ok, self.gpas[k] + (idx - self.starts[k]) * PAGE, -1), ok


def _layout(ev: Evidence, c: _Container, paths: dict[int, str], nblocks: int,
            warn: list[ImageError], path: str) -> _Layout:  # fmt: skip
    runs: dict[int, tuple[int, int, int]] = {}
    for i, k in enumerate(c.keys):
        m = _MEMBLOCK.search(k.name)
        if not m:
            continue
        raw = ev.read(k.value_at, 32) if k.value_size >= 32 else b""
        if len(raw) < 32:
            warn.append(ImageError(path, k.entry_at, f"{paths[i]}: value shorter than 32 bytes"))
            continue
        _, pages, previous, base = struct.unpack("<QQQQ", raw)
        runs[int(m.group(1))] = (pages, previous, base)
    if not runs:
        msg = (
            "no RamMemoryBlock keys: RamBlock N is mapped at N MiB (VMkatz's reading); "
            "addresses past the MMIO gap may be wrong"
        )
        warn.append(Remark(path, None, msg))
        n = nblocks * BLOCK_PAGES
        return _Layout(np.array([0]), np.array([n]), np.array([0]), "identity (no RamMemoryBlock)")
    starts, pages, gpas = [], [], []
    cursor = 0
    for idx in sorted(runs):
        npages, _, base = runs[idx]
        if npages <= 0 or base >= 1 << 40 or npages > MAX_BLOCKS * BLOCK_PAGES:
            warn.append(ImageError(path, None, f"RamMemoryBlock{idx}: absurd run of {npages} "
                                   f"pages at page {base:#x}"))  # fmt: skip
            continue
        starts.append(cursor)
        pages.append(npages)
        gpas.append(base * PAGE)
        # Beyer assigns whole RamBlocks to each run in order.
        cursor += -(-npages // BLOCK_PAGES) * BLOCK_PAGES
    return _Layout(np.array(starts, np.int64), np.array(pages, np.int64),
                   np.array(gpas, np.int64), "RamMemoryBlock runs")  # fmt: skip


def _open_vmrs(path: str) -> MemoryImage:
    with Evidence(path).closed_on_error() as ev:
        c = read_container(ev, path)
        warnings: list[ImageError] = list(c.warnings)
        paths = key_paths(c)
        blocks: dict[int, _Key] = {}
        for i, k in enumerate(c.keys):
            m = _RAMBLOCK.search(k.name)
            if m and not _MEMBLOCK.search(k.name):
                n = int(m.group(1))
                if n >= MAX_BLOCKS:
                    warnings.append(ImageError(path, k.entry_at, f"{paths[i]}: absurd index"))
                    continue
                blocks[n] = k
        if not blocks:
            raise ImageError(path, None, "no RamBlock keys: this .vmrs holds no guest memory "
                             "(a running VM's runtime state, or a configuration file)")  # fmt: skip
        layout = _layout(ev, c, paths, max(blocks) + 1, warnings, path)
        image = MemoryImage(path=path, format="hyperv-vmrs", files=[path], closers=[ev.close])
        state = _device_state(ev, c, paths, warnings, path)
        _build(ev, image, blocks, layout, state, warnings)
        cov = image.coverage
        if layout.source.startswith("RamMemoryBlock"):
            cov.declared, cov.declared_by = (
                int(layout.pages.sum()) * PAGE,
                "the RamMemoryBlock runs",
            )
        else:
            cov.declared, cov.declared_by = (
                (max(blocks) + 1) * BLOCK,
                "the RamBlock keys (1 MiB each)",
            )
        cov.outside = sum(n for _, n in state)
        image.meta.update({
            "container_version": f"{c.version:#x}",
            "active_header": f"{c.header_at:#x} (sequence {c.sequence})",
            "object_table": f"{c.object_table_at:#x}, {c.object_table_reading}",
            "keys": len(c.keys),
            "ram_blocks": len(blocks),
            "device_state_bytes": sum(n for _, n in state),
            "gpa_layout": layout.source,
            "ram_size": int(layout.pages.sum()) * PAGE,
            "memory_runs": [f"{int(g):#x} +{int(n) * PAGE:#x}"
                            for g, n in zip(layout.gpas, layout.pages, strict=True)],
        })  # fmt: skip
        image.warnings = _capped(warnings, path)
        image.check_coverage()
    return image


def _capped(warnings: list[ImageError], path: str) -> list[ImageError]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    more = len(warnings) - MAX_WARNINGS
    return warnings[:MAX_WARNINGS] + [ImageError(path, None, f"{more} more problems like these")]


def _device_state(ev: Evidence, c: _Container, paths: dict[int, str],
                  warnings: list[ImageError], path: str) -> list[tuple[int, int]]:  # fmt: skip
    """File ranges (offset, bytes) of the values of every key but ``RamBlock<N>`` and nodes:
    device state, scanned as ``region:device-state``. Overlapping values are merged (every
    byte once); a value reaching past the end of the file is cut there, with a warning."""
    spans = []
    for i, k in enumerate(c.keys):
        if k.dtype == KEY_NODE or k.value_size <= 0 or _RAMBLOCK.search(k.name):
            continue
        if k.value_at >= ev.size or k.value_at + k.value_size > ev.size:
            msg = f"{paths[i]}: {k.value_size}-byte value at {k.value_at:#x} runs past the file"
            warnings.append(ImageError(path, k.entry_at, msg))
            if k.value_at >= ev.size:
                continue
        spans.append((k.value_at, min(k.value_at + k.value_size, ev.size)))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in merged]


def _build(ev: Evidence, image: MemoryImage, blocks: dict[int, _Key], layout: _Layout,
           state: list[tuple[int, int]], warnings: list[ImageError]) -> None:  # fmt: skip
    """Every page the RamBlocks hold is laid into bounded windows in RAM page order (raw pages
    copied, keeping their file offset; compressed pages decoded; pattern pages, zero ones
    included, filled), so that guest neighbours are neighbours in a window: a page beside a
    zero-pattern page leaves no memory edge that never meets a partner (such edges fill the
    engine's bounded edge store, which then forgets real ones). The device state (file ranges
    ``state``) is one segment over the mmap after them."""
    path = image.path
    # pieces in RAM page order: global first page, pages, kind, file offset, stored size
    p_first, p_count, p_kind, p_at, p_size = (array("q") for _ in range(5))
    p_pattern = array("Q")
    readings: dict[str, int] = {}
    for n in sorted(blocks):
        k = blocks[n]
        if k.value_size == 0 or k.value_at + k.value_size > ev.size:
            msg = f"RamBlock{n}: {k.value_size}-byte value at {k.value_at:#x} is outside the file"
            warnings.append(ImageError(path, k.entry_at, msg))
            continue
        try:
            pieces, reading = parse_block(ev, k.value_at, k.value_size)
        except _Bad as bad:
            warnings.append(ImageError(path, bad.at, f"RamBlock{n}: {bad.message}"))
            continue
        readings[reading] = readings.get(reading, 0) + 1
        for first, count, kind, at, size, pattern in pieces:
            p_first.append(n * BLOCK_PAGES + first)
            p_count.append(count)
            p_kind.append(kind)
            p_at.append(at)
            p_size.append(size)
            p_pattern.append(pattern)
    dev_at, dev_n = np.asarray(state, np.int64).reshape(-1, 2).T
    dev_space = image.space_id("region:device-state") if state else 0
    main = Extents.build(dev_at, dev_at, dev_n, dev_at, dev_space)
    image.meta["block_encodings"] = readings
    first, count, kind, at, size = (
        np.frombuffer(col, np.int64) if len(col) else np.zeros(0, np.int64)
        for col in (p_first, p_count, p_kind, p_at, p_size)
    )  # fmt: skip
    pattern = np.frombuffer(p_pattern, np.uint64) if len(p_pattern) else np.zeros(0, np.uint64)
    start = np.cumsum(count) - count  # each piece's first slot in the stream of held pages
    total = int(count.sum())
    held = np.repeat(first, count) + _within(list(p_count)) // PAGE
    image.coverage.read = int(layout.gpa(held)[1].sum()) * PAGE  # pages with a guest address
    # the file bytes not stored plainly as guest memory or device state are the container's
    # (headers, tables, keys) or compressed pages: structure
    raw = kind == _RAW
    image.coverage.structure = ev.size - Ranges.of(
        np.concatenate((at[raw], dev_at)),
        np.concatenate((at[raw] + count[raw] * PAGE, dev_at + dev_n)),
    ).total()

    def stream() -> Iterator[Segment]:
        buf = np.zeros(min(WINDOW_PAGES, total) * PAGE, np.uint8)
        rows, words = buf.reshape(-1, PAGE), buf.view("<u8").reshape(-1, PAGE // 8)
        # a page's bytes in the file, for the raw ones (a view: rows are copied when indexed)
        in_file = (
            sliding_window_view(ev.data, PAGE) if ev.size >= PAGE else np.zeros((0, PAGE), np.uint8)
        )
        problems: list[ImageError] = []
        lost = 0  # pages that could not be decoded
        last: tuple[int, np.ndarray | None] = (-1, None)  # the last compressed piece decoded
        for lo in range(0, total, WINDOW_PAGES):
            hi = min(lo + WINDOW_PAGES, total)
            js = np.arange(np.searchsorted(start, lo, "right") - 1, np.searchsorted(start, hi))
            pj = np.repeat(js, np.minimum(start[js] + count[js], hi) - np.maximum(start[js], lo))
            within = np.arange(lo, hi) - start[pj]  # page number inside its piece
            k = kind[pj]
            fo = np.where(k == _RAW, at[pj] + within * PAGE, -1)
            raw = np.flatnonzero(k == _RAW)
            rows[raw] = in_file[fo[raw]]
            fill = np.flatnonzero(k == _FILL)
            words[fill] = pattern[pj[fill], None]
            ok = np.ones(hi - lo, bool)
            for j in js[kind[js] == _PACKED].tolist():
                a, b = max(int(start[j]), lo), min(int(start[j] + count[j]), hi)
                if last[0] != j:
                    try:
                        data = ev.data[at[j] : at[j] + size[j]].tobytes()
                        last = (j, np.frombuffer(decode_page(data, int(count[j]) * PAGE)[0],
                                                 np.uint8))  # fmt: skip
                    except ValueError as exc:
                        problems.append(ImageError(path, int(at[j]), f"compressed page: {exc}"))
                        lost += int(count[j])
                        last = (j, None)
                if last[1] is None:
                    ok[a - lo : b - lo] = False
                    rows[a - lo : b - lo] = 0
                else:
                    s = int(start[j])
                    rows[a - lo : b - lo] = last[1].reshape(-1, PAGE)[a - s : b - s]
            slots = np.flatnonzero(ok)
            idx = (first[pj] + within)[slots]
            yield _window(buf[: (hi - lo) * PAGE], slots, idx, fo[slots], layout, image, path)
            stored = js[kind[js] != _FILL]
            if stored.size:
                f_lo, f_hi = int(at[stored].min()), int((at + size)[stored].max())
                if f_hi - f_lo <= 2 * int(size[stored].sum()) + 2 * PAGE:  # they lay together
                    ev.release(f_lo, f_hi - f_lo)  # resident memory does not grow with the file
        yield Segment(ev.data, main, path)
        if problems:
            image.coverage.read -= lost * PAGE
            image.check_coverage()
            seen = {str(w) for w in image.warnings}
            image.warnings += [p for p in _capped(problems[1:], path) if str(p) not in seen]
            raise problems[0]

    image.stream = stream


def _within(counts: list[int]) -> np.ndarray:
    """For runs of ``counts`` pages: each page's byte offset inside its run."""
    total = int(sum(counts))
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.repeat(np.cumsum([0, *counts[:-1]]), counts)
    return (np.arange(total, dtype=np.int64) - starts) * PAGE


def _window(buf: np.ndarray, slots: np.ndarray, idx: np.ndarray, fo: np.ndarray,
            layout: _Layout, image: MemoryImage, path: str) -> Segment:  # fmt: skip
    """The reused-window segment of pages ``idx`` (global RAM page numbers) at pages ``slots``
    of ``buf`` (offset slot * PAGE; ``fo``: file offsets, -1 for decoded or filled pages)."""
    gpa, ok = layout.gpa(idx)
    space = np.zeros(idx.size, np.int64)
    if (~ok).any():
        space[~ok] = image.space_id("block:RamBlocks past the memory runs")
    addr = np.where(ok, gpa, idx * PAGE)
    ext = Extents.build(slots * PAGE, addr, np.full(idx.size, PAGE), fo, space)
    return Segment(buf, ext, path, reused=True)


# ---------------------------------------------------------------------------------------------
# Legacy .bin + .vsv


def _has_ext(path: str, ext: str) -> bool:
    return path.casefold().endswith(ext)


def _sibling(path: str, ext: str) -> str | None:
    """``<stem><ext>`` beside ``path`` in any letter case, if it exists."""
    directory, base = os.path.split(path)
    stem = os.path.splitext(base)[0].casefold()
    try:
        names = sorted(os.listdir(directory or "."))
    except OSError:
        return None
    for name in names:
        if name.casefold() == stem + ext:
            return os.path.join(directory, name)
    return None


def _open_bin(path: str) -> MemoryImage:
    if _has_ext(path, VSV_EXT):
        mem = _sibling(path, BIN_EXT)
        if mem is None:
            raise ImageError(path, None, "Hyper-V .vsv without its .bin (guest memory) beside it")
        vsv: str | None = path
        path = mem
    else:
        vsv = _sibling(path, VSV_EXT)
    ev = Evidence(path)
    if ev.size == 0:
        ev.close()
        raise ImageError(path, 0, "empty .bin file")
    warnings: list[ImageError] = []
    if ev.size % PAGE:
        warnings.append(ImageError(path, ev.size - ev.size % PAGE,
                                   "not a whole number of pages (truncated?)"))  # fmt: skip
    if ev.size > BIN_GAP_WARNING:
        warnings.append(Remark(path, None, "legacy .bin read identity-mapped (VMkatz's reading): "
                               "addresses past the MMIO gap below 4 GiB may be wrong"))  # fmt: skip
    image = MemoryImage(
        path=path,
        format="hyperv-bin",
        files=[path, *([vsv] if vsv else [])],
        meta={"ram_size": ev.size, "layout": "identity", "vsv": vsv},
        warnings=warnings,
        fixed_segments=[Segment(ev.data, Extents.single(ev.size, addr=0, file_offset=0), path)],
        closers=[ev.close],
    )
    if vsv:
        _add_vsv(image, vsv)
    image.coverage.read = ev.size  # nothing public declares the RAM size of a .bin
    image.check_coverage()
    return image


def _add_vsv(image: MemoryImage, vsv: str) -> None:
    """Scan the ``.vsv`` whole as ``region:device-state`` (address = file offset). One that
    cannot be read is a warning: the guest memory in the ``.bin`` is still scanned."""
    try:
        ev = Evidence(vsv)
    except ImageError as err:
        image.warnings.append(err)
        return
    image.closers.append(ev.close)
    if ev.size:
        ext = Extents.build([0], [0], [ev.size], [0], [image.space_id("region:device-state")])
        image.fixed_segments.append(Segment(ev.data, ext, vsv))
    image.meta["vsv_size"] = ev.size
    image.coverage.outside = ev.size


# ---------------------------------------------------------------------------------------------
# Parser interface


def probe(head: bytes, path: str) -> str | None:
    """A ``.vmrs`` by its signature; a ``.bin`` only beside its ``.vsv``."""
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == SIGNATURE:
        return "hyperv-vmrs"
    if _has_ext(path, BIN_EXT) and _sibling(path, VSV_EXT):
        return "hyperv-bin"
    return None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    if fmt == "hyperv-vmrs":
        return _open_vmrs(path)
    if fmt == "hyperv-bin":
        return _open_bin(path)
    raise ImageError(path, None, f"unknown Hyper-V format {fmt!r}")


def primary(paths: list[str]) -> list[list[str]]:
    """Group ``.bin`` + ``.vsv`` pairs: [bin, vsv] per pair (the .vsv is not scanned alone)."""
    groups = []
    for p in paths:
        if _has_ext(p, BIN_EXT):
            vsv = _sibling(p, VSV_EXT)
            if vsv:
                groups.append([p, *[q for q in paths if os.path.abspath(q) ==
                                    os.path.abspath(vsv)]])  # fmt: skip
    return groups
