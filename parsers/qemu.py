"""QEMU migration streams (``QEVM`` version 3), as written by ``migrate`` to a file, by
``virsh dump`` without ``--memory-only``, inside libvirt save files and inside qcow2 internal
snapshots (``docs/formats.md`` §4).

The walker reads only record headers. Guest pages are never copied: for a file we mmap, each
``PAGE`` record's payload becomes one extent of a single fixed segment (zero copy); for a
decompressed stream, the walker runs over bounded windows and each window is a reused segment
whose extents point at the page payloads inside it. Page offsets inside RAMBlocks are turned
into guest-physical addresses by :mod:`parsers.qemu_gpa`; blocks without a GPA go to a named
address space ``block:<name>``.

Handled: the file header, CONFIGURATION (machine type) with its subsections (target page bits,
capabilities, uuid), START/PART/END/FULL sections, footers, commands, the ``ram`` section's
records (MEM_SIZE block list, ZERO/fill, PAGE, CONTINUE, EOS, HOOK, MULTIFD_FLUSH, zlib
COMPRESS_PAGE), the mapped-ram layout (QEMU >= 9.0, libvirt ``sparse``) and the trailing VM
description JSON. XBZRLE pages and unknown iterative sections stop the walk with a clear error
naming the offset; what came before is still scanned.
"""

from __future__ import annotations

import json
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from parsers import clock, qemu_gpa
from parsers.base import GPA_SPACE, Evidence, Extents, Fills, ImageError, MemoryImage, Segment

FORMATS = ["qemu-migration"]

MAGIC = b"QEVM\x00\x00\x00\x03"  # be32 "QEVM" + be32 QEMU_VM_FILE_VERSION 3

# Top-level "section type" bytes (migration/savevm.c QEMU_VM_*).
SEC_EOF = 0x00
SEC_START = 0x01  # be32 section_id, u8 len, idstr, be32 instance_id, be32 version_id, payload
SEC_PART = 0x02  # be32 section_id, payload
SEC_END = 0x03  # be32 section_id, payload
SEC_FULL = 0x04  # header as START, then the device's vmstate
SEC_SUBSECTION = 0x05  # u8 len, name, be32 version_id, fields
SEC_VMDESC = 0x06  # be32 json_len, JSON
SEC_CONFIG = 0x07  # be32 len, machine type name, subsections
SEC_COMMAND = 0x08  # be16 cmd, be16 len, len bytes
SEC_FOOTER = 0x7E  # be32 section_id

SECTION_ID = struct.Struct(">I")  # be32 section_id (PART/END/FOOTER)
START_TAIL = struct.Struct(">II")  # be32 instance_id, be32 version_id (after idstr)
COMMAND = struct.Struct(">HH")  # be16 command id, be16 payload length
BE64 = struct.Struct(">Q")  # ram record word: page offset | flags; also lengths
BE32 = struct.Struct(">I")
MAPPED_RAM_HDR = struct.Struct(
    ">I"  # version, 1
    "Q"  # page_size (bytes)
    "Q"  # bitmap_offset: absolute file offset of the block's page bitmap
    "Q"  # pages_offset: absolute file offset of page 0 of the block
)
CMD_PACKAGED = 7  # payload is be32 N; the next N bytes are nested sections

# ram record flags (migration/ram.c RAM_SAVE_FLAG_*), in the low bits of the record word.
F_FULL = 0x001  # obsolete since 2009
F_ZERO = 0x002  # u8 fill byte: the page is that byte repeated
F_MEM_SIZE = 0x004  # RAMBlock list follows; the address bits carry the total size
F_PAGE = 0x008  # one raw page follows
F_EOS = 0x010  # end of this section's records
F_CONTINUE = 0x020  # same block as the previous page record: no block name follows
F_XBZRLE = 0x040  # delta against the previous copy of the page
F_HOOK = 0x080  # RDMA registration hook, no payload
F_COMPRESS_PAGE = 0x100  # be32 len + one zlib-compressed page
F_MULTIFD_FLUSH = 0x200  # multifd sync marker, no payload
PAGE_KINDS = F_ZERO | F_PAGE | F_XBZRLE | F_COMPRESS_PAGE
KNOWN_FLAGS = PAGE_KINDS | F_MEM_SIZE | F_EOS | F_CONTINUE | F_HOOK | F_MULTIFD_FLUSH

RAM_SECTION_VERSION = 4
DEFAULT_PAGE_SIZE = 4096
MAX_BLOCKS = 4096  # far more RAMBlocks than any machine has
VMDESC_SEARCH = 16 << 20  # bytes after the RAM searched for the VM description JSON
WINDOW = 16 << 20  # decompressed bytes walked per window
INFLATE_BATCH = 4096  # compressed pages inflated per segment
PEEK = 1 << 20  # decompressed prefix read at open time for the metadata
RUN_PROBE = 16  # same-kind records in a row before a run is decoded with numpy
RUN_MAX = 1 << 16  # records decoded per numpy batch
MIN_PAGE = 1 << 9  # smallest target page size a stream may declare (target page bits 9)
TABLE_RESERVE = 8  # spare extent rows on each side of a mapped stream's pages, for its regions
MAP_MAX = 256 << 20  # bytes of page bitmap per RAM block (8 TiB of 4 KiB pages); past it, count
BLOCK_LIST = "the stream's RAM block list"  # what declares guest RAM in a stream (coverage)
SIGN_BIT = 1 << 63  # record words at or above this hold no page offset (array("q") bound)
# page_pos of a page accounted for but not mapped from the buffer: a fill page (one byte
# repeated, e.g. a zero page), a zlib-compressed one (inflated in a window of its own)
FILL, INFLATED = -1, -2


@dataclass
class _Block:
    name: str
    size: int  # used_length, bytes
    space: int = GPA_SPACE
    starts: np.ndarray | None = None  # GPA pieces: block offsets, lengths, GPAs
    lengths: np.ndarray | None = None
    gpas: np.ndarray | None = None
    mapped: tuple[int, int] | None = None  # mapped-ram (bitmap_offset, pages_offset)


class _PageMap:
    """Which pages of each RAM block the stream held (one bit per page), so a page sent twice
    (live migration resends dirty pages) counts once against the block list. A block whose
    map would take more than MAP_MAX bytes is counted by record instead."""

    def __init__(self, sizes: list[int], page_size: int) -> None:
        self.ps = page_size
        self.sizes = sizes
        self.whole: set[int] = set()  # blocks accounted for entirely (mapped-ram)
        self.maps = [
            np.zeros(-(-(s // page_size) // 8), np.uint8) if s // page_size // 8 <= MAP_MAX
            else None
            for s in sizes
        ]  # fmt: skip
        self.counted = 0  # pages of blocks without a map

    def mark(self, blk: np.ndarray, addr: np.ndarray) -> None:
        """Note pages at block offsets ``addr`` (bytes) of blocks ``blk`` (all inside)."""
        for b in np.unique(blk).tolist():
            m = self.maps[b]
            idx = addr[blk == b] // self.ps
            if m is None:
                self.counted += idx.size
            else:
                np.bitwise_or.at(m, idx >> 3, np.left_shift(1, idx & 7).astype(np.uint8))

    def pages(self) -> int:
        """Distinct pages noted."""
        return self.counted + sum(
            self.sizes[b] // self.ps if b in self.whole else int(np.bitwise_count(m).sum())
            for b, m in enumerate(self.maps)
            if m is not None or b in self.whole
        )


class _Incomplete(Exception):
    """The buffer ends inside the item being parsed (more bytes are needed)."""


@dataclass
class Walker:
    """State machine over a QEVM stream, fed buffer by buffer.

    Positions passed to :meth:`walk` are buffer offsets; ``base`` is the stream offset of
    buffer byte 0 (the driver moves it as windows slide). ``fail(stream_offset, message)``
    makes the ImageError for this container (file offset or decompressed-stream offset).
    Page payload positions found in the current buffer accumulate in ``page_pos`` /
    ``page_addr`` (block offsets) with block switches in ``block_marks``; :meth:`take_extents`
    turns them into an Extents table and clears them.
    """

    fail: Callable[[int, str], ImageError]
    machine: str | None = None
    max_ram_below_4g: int | None = None
    file_size: int | None = None  # set when buffer offsets are file offsets (mapped-ram)
    base: int = 0
    phase: str = "header"  # header, top (between sections), ram (records), devices (RAM done)
    page_size: int = DEFAULT_PAGE_SIZE
    capabilities: list[str] = field(default_factory=list)
    uuid: str | None = None
    blocks: list[_Block] = field(default_factory=list)
    mem_total: int = 0  # MEM_SIZE total, bytes
    sections: dict[int, str] = field(default_factory=dict)
    last_section: int | None = None
    ram_ended: bool = False
    cur_block: int = -1
    page_pos: array = field(default_factory=lambda: array("q"))
    page_addr: array = field(default_factory=lambda: array("q"))
    block_marks: list[tuple[int, int]] = field(default_factory=list)  # (page index, block)
    compressed: list[tuple[int, int, int, int]] = field(default_factory=list)  # pos,len,blk,addr
    pages: int = 0
    zero_pages: int = 0
    compressed_pages: int = 0
    layout_notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    main_ram: int = 0  # bytes of main RAM (the blocks with a GPA)
    carried_block: int = -1  # current block when the buffer being walked began
    seen: _PageMap | None = None  # pages accounted for, per block (from the block list on)
    mem_size_at: int | None = None  # stream offset of the MEM_SIZE record (the block list)
    header_end: int | None = None  # stream offset just past the block list
    devices_at: int | None = None  # stream offset where device state begins
    stopped: int | None = None  # stream offset of the item the walk failed in
    payload_end: int = 0  # stream offset just past the last page payload taken
    fills: Fills | None = None  # the fill pages of the last take_extents
    beyond: int = 0  # page records refused for lying beyond their RAM block

    # ---- driving -------------------------------------------------------------------------

    def walk(self, buf: Any, p: int, n: int, final: bool) -> int:
        """Walk complete items in ``buf[p:n]``; return where the first incomplete one starts.

        With ``final`` the buffer is the end of the stream: an incomplete item is a truncation
        error. Raises ImageError for anything undecodable.
        """
        while self.phase != "devices":
            start = p
            try:
                if self.phase == "header":
                    p = self._header(buf, p, n)
                elif self.phase == "top":
                    p = self._top(buf, p, n)
                else:
                    p = self._ram(buf, p, n)
            except _Incomplete:
                p = start
            except ImageError:
                self.stopped = max(self.base + start, self.payload_end)
                raise
            if p == start:
                break
        if final and self.phase != "devices":
            where = "inside a record" if p < n else "before the end of guest RAM"
            raise self.fail(self.base + p, f"truncated: stream ends {where}")
        return p

    # ---- top level -------------------------------------------------------------------------

    def _need(self, p: int, size: int, n: int) -> None:
        if p + size > n:
            raise _Incomplete

    def _header(self, buf: Any, p: int, n: int) -> int:
        self._need(p, 8, n)
        if bytes(buf[p : p + 8]) != MAGIC:
            raise self.fail(self.base + p, "not a QEMU migration stream (no QEVM version 3 magic)")
        self.phase = "top"
        return p + 8

    def _name(self, buf: Any, p: int, n: int) -> tuple[str, int]:
        """u8 length + bytes; returns (name, next position)."""
        self._need(p, 1, n)
        ln = buf[p]
        self._need(p + 1, ln, n)
        return bytes(buf[p + 1 : p + 1 + ln]).decode("latin-1"), p + 1 + ln

    def _top(self, buf: Any, p: int, n: int) -> int:
        self._need(p, 1, n)
        kind = buf[p]
        at = self.base + p
        if kind == SEC_CONFIG:
            return self._configuration(buf, p + 1, n)
        if kind in (SEC_START, SEC_FULL):
            self._need(p + 1, 4, n)
            (sid,) = SECTION_ID.unpack_from(buf, p + 1)
            idstr, q = self._name(buf, p + 5, n)
            self._need(q, START_TAIL.size, n)
            _, version = START_TAIL.unpack_from(buf, q)
            q += START_TAIL.size
            self.sections[sid] = idstr
            self.last_section = sid
            if idstr == "ram":
                if version != RAM_SECTION_VERSION:
                    raise self.fail(at, f"ram section version {version} not supported (need 4)")
                self.phase = "ram"
                return q
            if kind == SEC_FULL:
                return self._devices(p)
            raise self.fail(
                at, f"iterative section {idstr!r} has no known layout; cannot walk past it"
            )
        if kind in (SEC_PART, SEC_END):
            self._need(p + 1, 4, n)
            (sid,) = SECTION_ID.unpack_from(buf, p + 1)
            idstr = self.sections.get(sid)
            if idstr is None:
                raise self.fail(at, f"section part for unknown section id {sid}")
            if idstr != "ram":
                raise self.fail(at, f"iterative section {idstr!r} has no known layout")
            self.last_section = sid
            self.ram_ended = kind == SEC_END
            self.phase = "ram"
            return p + 5
        if kind == SEC_FOOTER:
            self._need(p + 1, 4, n)
            (sid,) = SECTION_ID.unpack_from(buf, p + 1)
            if sid != self.last_section:
                raise self.fail(at, f"section footer for id {sid}, expected {self.last_section}")
            return p + 5
        if kind == SEC_COMMAND:
            self._need(p + 1, COMMAND.size, n)
            cmd, ln = COMMAND.unpack_from(buf, p + 1)
            if cmd == CMD_PACKAGED:
                self._need(p + 1 + COMMAND.size, 4, n)
                return p + 1 + COMMAND.size + 4  # nested sections follow inline
            self._need(p + 1 + COMMAND.size, ln, n)
            return p + 1 + COMMAND.size + ln
        if kind in (SEC_EOF, SEC_VMDESC):
            return self._devices(p)
        raise self.fail(at, f"unknown section type {kind:#04x}")

    def _devices(self, p: int) -> int:
        """Device state begins: every RAM page came before it."""
        if not self.ram_ended and self.blocks:
            self.warnings.append("stream has no final ram section (live migration cut short?)")
        self.phase = "devices"
        self.devices_at = self.base + p
        return p

    def _configuration(self, buf: Any, p: int, n: int) -> int:
        self._need(p, 4, n)
        (ln,) = BE32.unpack_from(buf, p)
        if ln > 255:
            raise self.fail(self.base + p, f"machine type name of {ln} bytes")
        self._need(p + 4, ln, n)
        machine = bytes(buf[p + 4 : p + 4 + ln]).decode("latin-1")
        p += 4 + ln
        while True:
            self._need(p, 1, n)
            if buf[p] != SEC_SUBSECTION:
                break
            at = self.base + p
            name, p = self._name(buf, p + 1, n)
            self._need(p, 4, n)
            p += 4  # version_id
            if name == "configuration/target-page-bits":
                self._need(p, 4, n)
                (bits,) = BE32.unpack_from(buf, p)
                if not 9 <= bits <= 16:
                    raise self.fail(at, f"target page bits {bits} out of range")
                self.page_size = 1 << bits
                p += 4
            elif name == "configuration/capabilities":
                self._need(p, 4, n)
                (count,) = BE32.unpack_from(buf, p)
                if count > 256:
                    raise self.fail(at, f"{count} migration capabilities announced")
                p += 4
                caps = []
                for _ in range(count):
                    cap, p = self._name(buf, p, n)
                    caps.append(cap)
                self.capabilities = caps
            elif name == "configuration/uuid":
                self._need(p, 16, n)
                raw = bytes(buf[p : p + 16]).hex()
                self.uuid = f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
                p += 16
            else:
                raise self.fail(at, f"unknown configuration subsection {name!r}")
        self.machine = machine
        return p

    # ---- ram records -----------------------------------------------------------------------

    def _ram(self, buf: Any, p: int, n: int) -> int:
        """Records of one ram section part: the page and zero-page records continuing the
        current block (all of a bulk save but a block's first) through :meth:`_continuing`,
        the others one by one."""
        fmask = self.page_size - 1
        short = (F_PAGE | F_CONTINUE, F_ZERO | F_CONTINUE)
        while p + 8 <= n:
            if self.cur_block >= 0:
                p = self._continuing(buf, p, n)
                if p + 8 > n:
                    break
            (w,) = BE64.unpack_from(buf, p)
            f = w & fmask
            if f in short and self.cur_block >= 0 and w < SIGN_BIT:
                break  # a continuing record cut off by the buffer's end
            try:
                p = self._ram_record(buf, p, n, w - f, f)
            except _Incomplete:
                break
            if self.phase != "ram":
                return p
        return p

    def _continuing(self, buf: Any, p: int, n: int) -> int:
        """Consume the page and zero-page records continuing the current block from ``p``, as
        far as they lie whole in the buffer; returns the position after them. Per record only
        its word is read and its position kept (the stream's hottest loop: M's 1 GiB holds
        262,144 such records, page and zero page alternating every two on average); their
        kinds and addresses are then worked out with numpy. After RUN_PROBE records of one
        kind in a row, the run is decoded with numpy (:meth:`_run`). A word with the top bit
        set is no page offset: left to :meth:`_ram_record`, which refuses it."""
        fmask = self.page_size - 1
        page_cont, zero_cont = F_PAGE | F_CONTINUE, F_ZERO | F_CONTINUE
        rec = self.page_size + 8
        unpack = BE64.unpack_from
        starts: list[int] = []
        keep = starts.append
        last, same = -1, 0
        while p + 8 <= n:
            (w,) = unpack(buf, p)
            f = w & fmask
            if f == page_cont:
                size = rec
            elif f == zero_cont:
                size = 9
            else:
                break
            if w >= SIGN_BIT or p + size > n:
                break
            same = same + 1 if f == last else 0
            last = f
            if same >= RUN_PROBE:
                self._commit(buf, starts)
                starts.clear()
                p = self._run(buf, p, n, size, f)
                same = 0
                continue
            keep(p)
            p += size
        self._commit(buf, starts)
        return p

    def _commit(self, buf: Any, starts: list[int]) -> None:
        """Add the continuing records at stream positions ``starts`` (their words checked by
        :meth:`_continuing`) to the page lists: a page's payload position, FILL for a zero
        page (a fill page holds no secret: accounted for, not scanned), and its address."""
        if not starts:
            return
        at = np.array(starts, np.int64)
        raw = np.frombuffer(buf, np.uint8)[at[:, None] + np.arange(8)]
        words = raw.view(">u8").ravel().astype(np.int64)  # < SIGN_BIT: fits
        flags = words & (self.page_size - 1)
        page = flags == (F_PAGE | F_CONTINUE)
        self.page_pos.frombytes(np.where(page, at + 8, FILL).tobytes())
        self.page_addr.frombytes((words - flags).tobytes())
        self.zero_pages += int(page.size - np.count_nonzero(page))

    def _run(self, buf: Any, p: int, n: int, size: int, code: int) -> int:
        """Consume the run of ``size``-byte records with flags ``code`` starting at ``p`` (at
        least one), probing geometrically growing batches; returns the next position."""
        batch = RUN_PROBE
        while True:
            k = min(batch, (n - p) // size)
            if k == 0:
                return p
            words = np.ndarray((k,), ">u8", buffer=buf, offset=p, strides=(size,))
            flags = words & np.uint64(self.page_size - 1)
            bad = np.flatnonzero(flags != code)
            m = int(bad[0]) if bad.size else k
            if code & F_PAGE:
                pos = np.arange(p + 8, p + 8 + m * size, size, dtype=np.int64)
            else:
                pos = np.full(m, FILL, np.int64)
                self.zero_pages += m
            self.page_pos.frombytes(pos.tobytes())
            self.page_addr.frombytes((words[:m] - np.uint64(code)).astype(np.int64).tobytes())
            p += m * size
            if m < k or k < batch:
                return p
            batch = min(batch * 8, RUN_MAX)

    def _ram_record(self, buf: Any, p: int, n: int, addr: int, f: int) -> int:
        at = self.base + p
        if f & ~KNOWN_FLAGS:
            raise self.fail(at, f"unknown ram record flags {f:#x} (stream desynchronised?)")
        if f == F_EOS:
            self.phase = "top"
            return p + 8
        if f in (F_HOOK, F_MULTIFD_FLUSH):
            return p + 8
        if f == F_MEM_SIZE:
            return self._block_list(buf, p + 8, n, addr, at)
        kind = f & PAGE_KINDS
        if kind not in (F_ZERO, F_PAGE, F_XBZRLE, F_COMPRESS_PAGE) or f & ~(kind | F_CONTINUE):
            raise self.fail(at, f"ram record with flags {f:#x} cannot be decoded")
        if kind == F_XBZRLE:
            raise self.fail(at, "XBZRLE-encoded page: delta pages are not supported")
        q = p + 8
        blk = self.cur_block
        if not f & F_CONTINUE:
            name, q = self._name(buf, q, n)
            blk = self._block_index(name, at)
        elif blk < 0:
            raise self.fail(at, "page record continues a block but no block was named yet")
        if addr + self.page_size > self.blocks[blk].size:
            raise self.fail(at, f"page offset {addr:#x} beyond RAM block {self.blocks[blk].name!r}")
        if kind == F_ZERO:
            self._need(q, 1, n)
            end = q + 1
        elif kind == F_PAGE:
            self._need(q, self.page_size, n)
            end = q + self.page_size
        else:
            self._need(q, 4, n)
            (clen,) = BE32.unpack_from(buf, q)
            if clen > 2 * self.page_size + 64:
                raise self.fail(at, f"compressed page of {clen} bytes")
            self._need(q + 4, clen, n)
            end = q + 4 + clen
        # Commit state only now that the whole record is in the buffer.
        if blk != self.cur_block:
            self.block_marks.append((len(self.page_pos), blk))
            self.cur_block = blk
        if kind == F_ZERO:
            self.zero_pages += 1
        elif kind == F_COMPRESS_PAGE:
            self.compressed.append((q + 4, clen, blk, addr))
            self.compressed_pages += 1
        self.page_pos.append(q if kind == F_PAGE else FILL if kind == F_ZERO else INFLATED)
        self.page_addr.append(addr)
        return end

    def _block_index(self, name: str, at: int) -> int:
        for i, b in enumerate(self.blocks):
            if b.name == name:
                return i
        raise self.fail(at, f"page for RAM block {name!r} not in the stream's block list")

    def _block_list(self, buf: Any, p: int, n: int, total: int, at: int) -> int:
        """MEM_SIZE: (name, used_length[, mr_addr][, mapped-ram header]) until the sizes add up
        to ``total``. Parsed whole before any state changes."""
        ignore_shared = "x-ignore-shared" in self.capabilities
        mapped = "mapped-ram" in self.capabilities
        blocks: list[_Block] = []
        seen = 0
        while seen < total:
            if len(blocks) >= MAX_BLOCKS:
                raise self.fail(at, "RAM block list does not end")
            name, p = self._name(buf, p, n)
            self._need(p, 8, n)
            (size,) = BE64.unpack_from(buf, p)
            p += 8
            if size == 0 or size % self.page_size or seen + size > total:
                raise self.fail(at, f"RAM block {name!r}: size {size:#x} does not fit the list")
            if ignore_shared:
                self._need(p, 8, n)
                p += 8  # mr_addr: parent-relative, not a GPA
            block = _Block(name, size)
            if mapped:
                self._need(p, MAPPED_RAM_HDR.size, n)
                block.mapped, p = self._mapped_header(buf, p, size, at)
            blocks.append(block)
            seen += size
        self.blocks = blocks
        self.mem_total = total
        self.mem_size_at = at
        self.header_end = self.base + p
        self.seen = _PageMap([b.size for b in blocks], self.page_size)
        self._map_blocks()
        return p

    def _mapped_header(self, buf: Any, p: int, size: int, at: int) -> tuple[tuple[int, int], int]:
        version, page_size, bitmap_off, pages_off = MAPPED_RAM_HDR.unpack_from(buf, p)
        if self.file_size is None:
            raise self.fail(at, "mapped-ram stream inside a compressed or embedded container")
        if version != 1 or page_size != self.page_size:
            raise self.fail(at, f"mapped-ram header version {version}, page size {page_size}")
        bitmap_len = (size // page_size + 63) // 64 * 8
        if (
            pages_off < self.base + p + MAPPED_RAM_HDR.size  # the stream must move forward
            or pages_off % page_size
            or bitmap_off + bitmap_len > self.file_size
            or pages_off + size > self.file_size
        ):
            raise self.fail(at, "mapped-ram bitmap or pages lie outside the file")
        # The writer seeks past the block's page area before writing the next stream bytes.
        return (bitmap_off, pages_off), pages_off + size - self.base

    def _map_blocks(self) -> None:
        if self.machine is None:
            self.layout_notes.append("no machine type: every RAM block reported by name")
            return
        lay = qemu_gpa.layout(
            self.machine, [(b.name, b.size) for b in self.blocks], self.max_ram_below_4g
        )
        self.layout_notes = lay.notes
        self.main_ram = lay.main_ram
        for b in self.blocks:
            pieces = lay.pieces.get(b.name)
            if pieces:
                b.starts = np.array([pc.start for pc in pieces], np.int64)
                b.lengths = np.array([pc.length for pc in pieces], np.int64)
                b.gpas = np.array([pc.gpa for pc in pieces], np.int64)

    # ---- results ---------------------------------------------------------------------------

    def assign_spaces(self, image: MemoryImage) -> None:
        """Give every block without a GPA its named space in ``image``."""
        for b in self.blocks:
            if b.gpas is None:
                b.space = image.space_id(f"block:{b.name}")

    def addresses(self, blk: np.ndarray, addr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(address, space) of pages given block indexes and block offsets (bytes)."""
        out = addr.copy()
        space = np.zeros(addr.size, np.int64)
        for b in np.unique(blk):
            block = self.blocks[int(b)]
            sel = blk == b
            space[sel] = block.space
            if block.gpas is not None:
                a = addr[sel]
                k = np.searchsorted(block.starts, a, side="right") - 1
                out[sel] = block.gpas[k] + (a - block.starts[k])
        return out, space

    def take_extents(self, file_offset_base: int | None) -> Extents:
        """Extents of the page payloads found since the last call (buffer offsets), and clear.

        ``file_offset_base``: file offset of buffer byte 0 when the buffer is the file itself,
        None for a decompression window (file offsets -1)."""
        pos = np.array(self.page_pos, np.int64)
        addr = np.array(self.page_addr, np.int64)
        if pos.size:
            self.payload_end = max(self.payload_end, self.base + int(pos.max()) + self.page_size)
        # Block of each page: the block current when the buffer began, then each switch.
        # (repeated per stretch between switches: no per-page temporaries; a later switch at
        # the same page wins, its earlier one repeating 0 times)
        first = np.array([0] + [m[0] for m in self.block_marks] + [pos.size], np.int64)
        value = np.array([self.carried_block] + [m[1] for m in self.block_marks], np.int32)
        blk = np.repeat(value, np.diff(np.minimum(first, pos.size)))
        self.page_pos = array("q")
        self.page_addr = array("q")
        self.block_marks = []
        self.carried_block = self.cur_block
        sizes = np.array([b.size for b in self.blocks] or [0], np.int64)
        ok = (blk >= 0) & (addr >= 0) & (addr + self.page_size <= sizes[np.maximum(blk, 0)])
        if not ok.all():
            self.beyond += int((~ok).sum())
            pos, addr, blk = pos[ok], addr[ok], blk[ok]
        if self.seen is not None:
            self.seen.mark(blk, addr)
        fill = pos == FILL
        self.fills = self._fills(blk[fill], addr[fill])
        mapped = pos >= 0
        pos, addr, blk = pos[mapped], addr[mapped], blk[mapped]
        addr_out, space = self.addresses(blk, addr)
        self.pages += pos.size
        fo = None if file_offset_base is None else pos + file_offset_base
        return Extents.build(pos, addr_out, np.full(pos.size, self.page_size), fo, space)

    def notes(self) -> list[str]:
        """The walk's warnings (messages), the pages refused by every take_extents included."""
        beyond = [f"{self.beyond} page records lie beyond their RAM block"] if self.beyond else []
        return self.warnings + beyond

    def _fills(self, blk: np.ndarray, addr: np.ndarray) -> Fills:
        """The fill pages at block offsets ``addr`` of blocks ``blk`` (stream order) as guest
        ranges: pages continuing each other in a block are one range, a page sent again at
        once is counted once (a hostile stream repeating one zero page stays one range), and
        a range whose last page is not where its first one's address says (it crosses into
        another piece of the machine's memory map) is left out: it only spares seams."""
        ps = self.page_size
        new = np.ones(addr.size, bool)
        step = addr[1:] - addr[:-1]
        new[1:] = (blk[1:] != blk[:-1]) | ((step != ps) & (step != 0))
        first = np.flatnonzero(new)
        last = np.concatenate((first[1:], [addr.size]))[: first.size] - 1
        a0, space = self.addresses(blk[first], addr[first])
        a1, _ = self.addresses(blk[last], addr[last])
        ok = a1 - a0 == addr[last] - addr[first]
        return Fills(space[ok], a0[ok], a1[ok] + ps)

    def mapped_extents(self, data: np.ndarray, warn: Callable[[str], None]) -> Extents:
        """Extents of the pages a mapped-ram file stores (bitmap bit set), in file offsets."""
        ps = self.page_size
        parts = []
        for i, b in enumerate(self.blocks):
            if b.mapped is None:
                continue
            bitmap_off, pages_off = b.mapped
            npages = b.size // ps
            words = data[bitmap_off : bitmap_off + (npages + 63) // 64 * 8]
            bits = np.unpackbits(words, bitorder="little")[:npages].astype(bool)
            if not bits.any():
                warn(
                    f"mapped-ram block {b.name!r} has an empty page bitmap (interrupted save?): "
                    "its whole page area is scanned"
                )
                bits[:] = True
            idx = np.flatnonzero(bits).astype(np.int64) * ps
            if self.seen is not None:  # a page the bitmap leaves out is a zero page
                self.seen.whole.add(i)
            addr, space = self.addresses(np.full(idx.size, i, np.int64), idx)
            parts.append((pages_off + idx, addr, space))
            self.pages += idx.size
        if not parts:
            return Extents.build([], [], [])
        pos = np.concatenate([p[0] for p in parts])
        return Extents.build(
            pos,
            np.concatenate([p[1] for p in parts]),
            np.full(pos.size, ps),
            pos,
            np.concatenate([p[2] for p in parts]),
        )

    def inflate(
        self, buf: Any, records: list[tuple[int, int, int, int]], file: str
    ) -> Iterator[Segment]:
        """Segments of COMPRESS_PAGE pages (``records``: buffer position, compressed length,
        block, block offset), INFLATE_BATCH pages per reused buffer. A record that does not
        inflate to exactly one page is an ImageError."""
        ps = self.page_size
        out = np.zeros(min(INFLATE_BATCH, max(1, len(records))) * ps, np.uint8)
        for start in range(0, len(records), INFLATE_BATCH):
            part = records[start : start + INFLATE_BATCH]
            for k, (pos, clen, _, _) in enumerate(part):
                d = zlib.decompressobj()
                try:
                    page = d.decompress(bytes(buf[pos : pos + clen]), ps + 1)
                except zlib.error as exc:
                    msg = f"compressed page does not inflate: {exc}"
                    raise self.fail(self.base + pos, msg) from None
                if len(page) != ps or not d.eof:
                    raise self.fail(self.base + pos, "compressed page is not one page long")
                out[k * ps : (k + 1) * ps] = np.frombuffer(page, np.uint8)
            blk = np.array([c[2] for c in part], np.int64)
            addr, space = self.addresses(blk, np.array([c[3] for c in part], np.int64))
            pos = np.arange(len(part), dtype=np.int64) * ps
            ext = Extents.build(pos, addr, np.full(len(part), ps), None, space)
            yield Segment(out[: len(part) * ps], ext, file, reused=True)

    def meta(self) -> dict[str, Any]:
        """What the stream says about the guest (for MemoryImage.meta)."""
        blocks = []
        for b in self.blocks:
            entry: dict[str, Any] = {"name": b.name, "size": b.size}
            if b.gpas is None:
                entry["gpa"] = None
            else:  # [block offset, GPA, length] per piece
                pieces = zip(b.starts, b.gpas, b.lengths, strict=True)
                entry["gpa"] = [[int(s), int(g), int(ln)] for s, g, ln in pieces]
            blocks.append(entry)
        out: dict[str, Any] = {"blocks": blocks, "page_size": self.page_size}
        if self.machine:
            out["machine"] = self.machine
        if self.main_ram:
            out["ram_size"] = self.main_ram
        if self.capabilities:
            out["capabilities"] = self.capabilities
        if self.uuid:
            out["stream_uuid"] = self.uuid
        if "mapped-ram" in self.capabilities:
            out["mapped_ram"] = True
        if self.layout_notes:
            out["gpa_notes"] = self.layout_notes
        return out


def parse_vmdesc(tail: bytes) -> tuple[dict[str, Any] | None, int | None]:
    """The VM description JSON at the end of a stream (``0x06``, be32 length, JSON), found in
    ``tail`` (the bytes after the RAM). Returns a summary (None when absent or unreadable) and
    the offset in ``tail`` just past the JSON, where the stream ends (None when not found)."""
    at = tail.find(b'{"page_size"')
    while at >= 5:
        if tail[at - 5] == SEC_VMDESC:
            (ln,) = BE32.unpack_from(tail, at - 4)
            try:
                desc = json.loads(tail[at : at + ln])
            except (ValueError, UnicodeDecodeError):
                return None, None
            devices = desc.get("devices") if isinstance(desc, dict) else None
            if not isinstance(devices, list):
                return None, None
            return {
                "page_size": desc.get("page_size"),
                "devices": len(devices),
                "device_names": sorted(
                    {str(d.get("name")) for d in devices[:4096] if isinstance(d, dict)}
                ),
            }, min(at + ln, len(tail))
        at = tail.find(b'{"page_size"', at + 1)
    return None, None


def account(walker: Walker, image: MemoryImage, stopped_at: int | None) -> None:
    """Fill ``image.coverage`` from what ``walker`` saw (contract 4): the RAM block list
    declares every block's size; each page the stream held (stored, fill or zlib page) counts
    once. ``stopped_at``: file offset where the walk stopped short, if it did. Without a block
    list, what a container declared (libvirt XML) stays the declaration. Several streams in
    one image (a qcow2's snapshots) each declare their own RAM: the declarations add up, as the
    pages read do, so one snapshot's surplus cannot hide another's shortfall."""
    cov = image.coverage
    cov.stopped_at = stopped_at
    if walker.blocks:
        earlier = cov.declared if cov.declared_by == BLOCK_LIST else 0
        cov.declared = earlier + walker.mem_total
        cov.declared_by = BLOCK_LIST
        cov.declared_at = walker.mem_size_at if not earlier else None
    pages = walker.seen.pages() if walker.seen is not None else 0
    cov.read += pages * walker.page_size
    if "x-ignore-shared" in walker.capabilities and cov.declared:
        cov.excluded = max(0, cov.declared - cov.read)
        cov.excluded_why = "x-ignore-shared: shared RAM blocks are not in the stream"


def stream_regions(
    walker: Walker, start: int, end: int, stop: int | None, desc_end: int | None
) -> list[tuple[str, int, int]]:
    """The stream's bytes outside guest memory, as (kind, first, end) stream offsets, for a
    stream occupying ``[start, end)``: the header (file header, configuration, block list),
    device state (from the first device section to the end of the VM description), what
    follows the stream (trailing) and, when the walk failed at ``stop``, everything from
    there (unreferenced: it may hold pages the walker could not decode). Record headers
    between pages are decoded structure, not regions (docs/formats.md)."""
    out = []
    mapped = "mapped-ram" in walker.capabilities  # its header runs past the page areas
    head_end = walker.header_end if walker.header_end is not None and not mapped else None
    if head_end is None and not mapped:
        head_end = walker.devices_at if walker.devices_at is not None else stop
    if head_end is not None:
        out.append(("header", start, min(head_end, end)))
    if walker.devices_at is not None:
        tail_end = min(desc_end, end) if desc_end is not None else end
        out.append(("device-state", walker.devices_at, tail_end))
        out.append(("trailing", tail_end, end))
    elif stop is not None:
        out.append(("unreferenced", stop, end))
    return [(k, a, b) for k, a, b in out if b > a]


class _PageTable:
    """A mapped stream's page extents, added window by window to columns made once for the
    most pages ``nbytes`` of stream can hold (a stored page takes its payload and an 8-byte
    record word, at the smallest page size): rows never written cost no memory, the per-page
    temporaries of :meth:`Walker.take_extents` stay one window's, and the table is not copied
    when done (issue 12: built in one go, a 1 GiB guest's table peaked ~21 MiB at open, which
    the heap kept). TABLE_RESERVE rows before and after the pages take the stream's regions."""

    def __init__(self, nbytes: int) -> None:
        rows = 2 * TABLE_RESERVE + max(nbytes, 0) // (MIN_PAGE + 8) + 1
        self.cols = [np.empty(rows, np.int64) for _ in range(5)]
        self.n = 0  # page rows written (from row TABLE_RESERVE on)

    def add(self, ext: Extents) -> None:
        """Append ``ext`` (extents after every one added so far)."""
        at = TABLE_RESERVE + self.n
        for col, part in zip(self.cols, _columns(ext), strict=True):
            col[at : at + len(ext)] = part
        self.n += len(ext)

    def total(self) -> int:
        """Bytes of the pages added."""
        return int(self.cols[2][TABLE_RESERVE : TABLE_RESERVE + self.n].sum())

    def finish(self, regions: Extents) -> Extents:
        """The pages and ``regions`` (sorted) as one table, views of the columns when the
        regions lie before and after the pages and fit the reserve, else a sorted copy."""
        lo, hi = TABLE_RESERVE, TABLE_RESERVE + self.n
        head = int(np.searchsorted(regions.buf_offset, self.cols[0][lo] if self.n else 0))
        tail = len(regions) - head
        if head > TABLE_RESERVE or tail > TABLE_RESERVE:
            pages = Extents(*(c[lo:hi] for c in self.cols))
            return Extents.concat(pages, regions)
        for col, part in zip(self.cols, _columns(regions), strict=True):
            col[lo - head : lo] = part[:head]
            col[hi : hi + tail] = part[head:]
        out = Extents(*(c[lo - head : hi + tail] for c in self.cols))
        if not (out.buf_offset[1:] >= out.buf_offset[:-1]).all():  # a region among the pages
            return Extents.build(*_columns(out))
        return out


def _columns(ext: Extents) -> tuple[np.ndarray, ...]:
    """The columns of ``ext`` in the order Extents takes them."""
    return ext.buf_offset, ext.addr, ext.length, ext.file_offset, ext.space


# ---- the two ways to feed the walker ---------------------------------------------------------


def open_mapped(
    ev: Evidence,
    start: int,
    image: MemoryImage,
    machine: str | None,
    options: dict[str, Any],
    before: list[tuple[str, int, int]] = (),
) -> None:
    """Walk the stream that starts at file offset ``start`` of the mmapped ``ev`` and make
    ``image`` scan its pages in place: one fixed segment (zero copy), plus inflated windows
    when the stream holds zlib-compressed pages; the file's other bytes in ``region:*``
    spaces (the container's ``before`` pieces, (kind, first, end) file offsets, and the
    stream's own). Fills ``image.coverage`` (the caller checks it). Problems after a readable
    prefix become warnings; a stream unreadable from the start is an ImageError."""
    path = ev.path

    def fail(off: int, msg: str) -> ImageError:
        return ImageError(path, off, msg)

    walker = Walker(fail, machine=machine, file_size=ev.size)
    walker.max_ram_below_4g = options.get("max_ram_below_4g")
    buf = memoryview(ev.data)
    stop = None
    walker.base = 0
    table = _PageTable(ev.size - start)

    def take() -> None:  # the pages of the window just walked
        walker.assign_spaces(image)
        table.add(walker.take_extents(0))

    try:
        end = _walk_released(walker, ev, buf, start, take)
    except ImageError as err:
        if not walker.blocks:
            raise
        image.warnings.append(err)
        end = ev.size
    take()  # (what the window that failed held before its failure)
    mapped = "mapped-ram" in walker.capabilities
    if mapped:
        ext = walker.mapped_extents(
            ev.data, lambda m: image.warnings.append(ImageError(path, None, m))
        )
    for note in walker.notes():
        image.warnings.append(ImageError(path, None, note))
    desc, desc_end = (None, None)
    if walker.phase == "devices":
        devices = ev.data[end : end + VMDESC_SEARCH].tobytes()
        desc, desc_end = parse_vmdesc(devices)
        if desc:
            image.meta["vmdesc"] = desc
            desc_end = end + desc_end
        image.meta.update(clock.qemu_rtc(devices))
    if walker.stopped is not None:
        stop = max(walker.stopped, walker.payload_end)
    pieces = list(before) + stream_regions(walker, start, ev.size, stop, desc_end)
    regions = image.region_extents(pieces, 0, 0)
    account(walker, image, stop)
    image.coverage.outside += image.region_bytes(regions)
    pages = ext.total() if mapped else table.total()
    image.coverage.structure += ev.size - pages - image.region_bytes(regions)
    main = Segment(ev.data, Extents.concat(ext, regions) if mapped else table.finish(regions), path)
    if walker.compressed:
        records = walker.compressed

        def stream() -> Iterator[Segment]:
            yield main
            yield from walker.inflate(buf, records, path)

        image.stream = stream
    else:
        image.fixed_segments = [main]
    image.meta.update(walker.meta())
    image.meta["compressed_pages"] = walker.compressed_pages
    image.meta["pages"] = walker.pages + walker.compressed_pages
    image.meta["zero_pages"] = walker.zero_pages


def _walk_released(
    walker: Walker, ev: Evidence, buf: memoryview, start: int, take: Callable[[], None]
) -> int:
    """``walker.walk`` over the mapped file from ``start`` to its end, WINDOW bytes at a
    time, calling ``take()`` after each window and giving back the pages walked: every page
    of a stream holds a record header, so walking it in one go would leave the whole file
    resident. Returns where the walk ended."""
    p, window, released = start, WINDOW, start
    while True:
        n = min(ev.size, p + window)
        q = walker.walk(buf, p, n, final=n == ev.size)
        take()
        ev.release(released, q - released)
        if n == ev.size or walker.phase == "devices":
            return q
        # an item longer than the window (none is, in a real stream): widen until it fits
        window = WINDOW if q > p else 2 * window
        released = max(released, q)
        p = q


class StreamSource(Protocol):
    """A byte source for :func:`stream_segments`: ``read(n)`` returns up to n bytes (b"" at
    the end or at the first unreadable byte, then ``problem`` says why); ``close()`` releases
    it; ``fail(stream_offset, message)`` makes the ImageError for an offset in the
    (decompressed) stream."""

    problem: ImageError | None

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...

    def fail(self, offset: int, message: str) -> ImageError: ...


def stream_segments(
    src: StreamSource,
    image: MemoryImage,
    machine: str | None,
    options: dict[str, Any],
    limit: Callable[[int], int],
    window: int | None = None,
) -> Iterator[Segment]:
    """Walk the stream ``src`` in bounded windows, yielding one reused segment per window (its
    extents point at page payloads inside it) plus inflated windows for compressed pages,
    then the stream's bytes outside guest memory (header, device state, what follows the
    stream or a point where the walk failed) in ``region:*`` spaces at their stream offsets.
    ``limit(mem_total)`` is the most stream bytes allowed given the RAM size the stream
    declared (0 if not yet known): past it the stream is a decompression bomb. Adds what was
    read to ``image.coverage`` (not checked here: a container may hold several streams).
    Raises ImageError after yielding what was readable. Closes ``src``."""
    walker = Walker(src.fail, machine=machine)
    walker.max_ram_below_4g = options.get("max_ram_below_4g")
    slack = 1 << 20  # one record larger than this is refused
    arr = np.zeros((window or WINDOW) + slack, np.uint8)
    buf = memoryview(arr)
    fill = p = 0
    eof = False
    err: ImageError | None = None
    header_done = False
    rest_at = 0  # stream offset where the bytes after guest RAM begin

    def bomb(at: int) -> ImageError:
        return src.fail(
            at,
            f"stream expands past {limit(walker.mem_total)} bytes, far more than the guest "
            "RAM it declares (decompression bomb?)",
        )

    try:
        while err is None:
            while fill < arr.size and not eof:
                data = src.read(arr.size - fill)
                if not data:
                    eof = True
                    break
                arr[fill : fill + len(data)] = np.frombuffer(data, np.uint8)
                fill += len(data)
                if walker.base + fill > limit(walker.mem_total):
                    err = bomb(walker.base + fill)
                    break
            try:
                p = walker.walk(buf, 0, fill, final=False)
            except ImageError as exc:
                err = exc
            walker.assign_spaces(image)
            ext = walker.take_extents(None)
            if err is None and eof and walker.phase != "devices":
                where = "inside a record" if p < fill else "before the end of guest RAM"
                err = src.problem or src.fail(walker.base + p, f"truncated: stream ends {where}")
                walker.stopped = walker.base + p
            if walker.phase == "devices":
                rest_at = walker.devices_at or 0
            elif err is not None:
                rest_at = max(walker.stopped or walker.base + p, walker.payload_end)
            if not header_done and (walker.header_end is not None or err or walker.devices_at):
                header_done = True
                head = [("header", walker.base, walker.header_end or rest_at)]
                head = [h for h in head if h[2] > h[1]]
                image.coverage.outside += sum(b - a for _, a, b in head)
                ext = Extents.concat(ext, image.region_extents(head, walker.base, None))
            if len(ext):
                yield Segment(arr[:fill], ext, image.path, reused=True, fills=walker.fills)
            if walker.compressed:
                yield from walker.inflate(buf, walker.compressed, image.path)
                walker.compressed = []
            if err is not None or walker.phase == "devices":
                break
            if p == 0 and fill == arr.size:
                err = src.fail(walker.base, "record larger than the decode window")
                rest_at = walker.base
                break
            arr[: fill - p] = arr[p:fill].copy()
            walker.base += p
            fill -= p
        carry = arr[max(0, rest_at - walker.base) : fill].tobytes()
        err = yield from _stream_rest(src, image, walker, carry, rest_at, eof, err, bomb, limit)
        for note in walker.notes():
            image.warnings.append(ImageError(image.path, None, note))
        account(walker, image, None)
        if err is not None:
            raise err
    finally:
        src.close()


def _stream_rest(
    src: StreamSource,
    image: MemoryImage,
    walker: Walker,
    carry: bytes,
    at: int,
    eof: bool,
    err: ImageError | None,
    bomb: Callable[[int], ImageError],
    limit: Callable[[int], int],
) -> Iterator[Segment]:
    """Segments of the stream's bytes from stream offset ``at`` (``carry`` holds the first of
    them) to its end, outside guest memory: device state up to the end of the VM description
    and trailing bytes after it; or, after a failed walk, unreferenced bytes. Read in windows
    of at most WINDOW bytes, within the bomb limit. Returns the error to raise (``err``, or
    a bomb)."""
    devices = walker.phase == "devices"
    tail = carry
    while devices and len(tail) < VMDESC_SEARCH and not eof:
        data = src.read(VMDESC_SEARCH - len(tail))
        eof = not data
        tail += data
    kind_after = "device-state" if devices else "unreferenced"
    pieces = [(kind_after, at, at + len(tail))]
    if devices:
        image.meta.update(clock.qemu_rtc(tail))
        desc, desc_end = parse_vmdesc(tail)
        if desc:
            image.meta["vmdesc"] = desc
            end = at + desc_end
            pieces = [("device-state", at, end), ("trailing", end, at + len(tail))]
            kind_after = "trailing"
    pos = at
    while tail:
        if pos + len(tail) > limit(walker.mem_total):
            return err or bomb(pos + len(tail))
        pieces = [(k, a, b) for k, a, b in pieces if b > a]
        image.coverage.outside += sum(b - a for _, a, b in pieces)
        ext = image.region_extents(pieces, pos, None)
        yield Segment(np.frombuffer(tail, np.uint8), ext, image.path, reused=True)
        pos += len(tail)
        tail = b"" if eof else src.read(WINDOW)
        pieces = [(kind_after, pos, pos + len(tail))]
    if src.problem is not None and err is None and devices:
        return src.problem
    return err


def peek_meta(
    prefix: bytes,
    fail: Callable[[int, str], ImageError],
    machine: str | None,
    options: dict[str, Any],
) -> Walker:
    """Walk the first bytes of a stream for its metadata (machine, blocks); pages ignored.
    Raises ImageError when the stream is unreadable from the start."""
    walker = Walker(fail, machine=machine)
    walker.max_ram_below_4g = options.get("max_ram_below_4g")
    try:
        walker.walk(memoryview(prefix), 0, len(prefix), final=False)
    except ImageError:
        if not walker.blocks:
            raise
        # a later record is bad: the scan itself reports it after the readable pages
    return walker


# ---- the format module interface ------------------------------------------------------------


def probe(head: bytes, path: str) -> str | None:
    return "qemu-migration" if head.startswith(MAGIC) else None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Map a raw QEVM stream file: pages scanned in place through mmap."""
    with Evidence(path).closed_on_error() as ev:
        image = MemoryImage(path=path, format="qemu-migration", files=[path], closers=[ev.close])
        open_mapped(ev, 0, image, options.get("machine"), options)
    image.meta["compression"] = "none"
    image.check_coverage()
    return image
