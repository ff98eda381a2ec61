"""kdump-compressed dumps ("diskdump" format): QEMU ``dump-guest-memory`` with a kdump format,
``virsh dump --memory-only --format kdump-*``, makedumpfile. Both the plain file (``KDUMP``
signature) and makedumpfile's *flattened* stream (``makedumpfile`` signature, what QEMU
writes to a file), which is read through an interval map without reassembling it.

Layout (offsets in blocks of ``block_size`` bytes): header, sub header (+ notes), two bitmaps
(PFNs that are RAM; PFNs stored in the file), one 24-byte page descriptor per stored PFN, page
data. A page is stored raw (read zero-copy from the mmap) or compressed with zlib, LZO,
snappy or zstd (decoded one page at a time into bounded windows). GPA = PFN * block_size.
"""

from __future__ import annotations

import functools
import heapq
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from parsers import clock
from parsers.base import (
    Evidence,
    Extents,
    Fills,
    ImageError,
    MemoryImage,
    Ranges,
    Segment,
    file_regions,
)
from parsers.elf import note_meta, vmcoreinfo_meta

FORMATS = ["kdump"]

SIGNATURES = (b"KDUMP   ", b"DISKDUMP")  # makedumpfile / QEMU; the older diskdump
FLAT_SIGNATURE = b"makedumpfile\0\0\0\0"

# disk_dump_header up to the timestamp, then the timestamp (a struct timeval in the dumping
# kernel's layout: 22 bytes for 64-bit guests, 10 for 32-bit), then HDR_TAIL.
HDR_HEAD = (
    "8s"  # signature "KDUMP   "
    "I"  # header_version (QEMU writes 6)
    "65s 65s 65s 65s 65s 65s"  # utsname: sysname nodename release version machine domainname
)
TIMESTAMP_SIZE = {64: 22, 32: 10}


class HeaderTail(NamedTuple):
    """The disk_dump_header fields after the timestamp (layout HDR_TAIL)."""

    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    total_ram_blocks: int
    device_blocks: int
    written_blocks: int
    current_cpu: int
    nr_cpus: int


HDR_TAIL = (
    "I"  # status: compression of the pages (STATUS_*), 0x8 incomplete dump
    "I"  # block_size: page size in bytes; every offset below counts in blocks
    "I"  # sub_hdr_size: blocks of the sub header (+ notes), right after block 0
    "I"  # bitmap_blocks: blocks of both bitmaps together, half each
    "I"  # max_mapnr: PFNs covered by the bitmaps (32-bit; max_mapnr_64 from version 6)
    "I"  # total_ram_blocks
    "I"  # device_blocks
    "I"  # written_blocks
    "I"  # current_cpu
    "I"  # nr_cpus
)
# kdump_sub_header at offset block_size, 64-bit guests.
SUB64 = (
    "Q"  # phys_base
    "I"  # dump_level
    "I"  # split: this file holds only PFNs start_pfn..end_pfn of a split dump
    "Q"  # start_pfn (v2-5)
    "Q"  # end_pfn (v2-5)
    "Q"  # offset_vmcoreinfo (v3+): file offset of the VMCOREINFO text
    "Q"  # size_vmcoreinfo
    "Q"  # offset_note (v4+): file offset of the ELF notes
    "Q"  # note_size
    "Q"  # offset_eraseinfo (v5+)
    "Q"  # size_eraseinfo
    "Q"  # start_pfn_64 (v6+)
    "Q"  # end_pfn_64 (v6+)
    "Q"  # max_mapnr_64 (v6+)
)
# The same for 32-bit guests: sizes are u32, file offsets u64, packed.
SUB32 = "I I I I I Q I Q I Q I Q Q Q"


class SubHeader(NamedTuple):
    """kdump_sub_header fields (layout SUB64 / SUB32)."""

    phys_base: int
    dump_level: int
    split: int
    start_pfn: int
    end_pfn: int
    offset_vmcoreinfo: int
    size_vmcoreinfo: int
    offset_note: int
    note_size: int
    offset_eraseinfo: int
    size_eraseinfo: int
    start_pfn_64: int
    end_pfn_64: int
    max_mapnr_64: int


# Page descriptor: one per set bit of the 2nd bitmap, in PFN order.
PAGE_DESC = np.dtype(
    [
        ("offset", "u8"),  # file offset of the page data (0 = lost, in an incomplete dump)
        ("size", "u4"),  # bytes stored
        ("flags", "u4"),  # PAGE_* compression of this page; 0 = raw, size == block_size
        ("page_flags", "u8"),  # the guest kernel's struct page flags (unused)
    ]
)

# Flattened stream: a 4096-byte header, then records (be64 offset, be64 size, data) that
# belong at ``offset`` of the assembled file; offset = size = -1 ends the stream.
FLAT_HEADER = struct.Struct(">16s q q")  # signature, type (1), version (1)
FLAT_HEADER_SIZE = 4096
FLAT_RECORD = struct.Struct(">q q")
FLAT_END = -1

STATUS_INCOMPLETE = 0x8
PAGE_ZLIB, PAGE_LZO, PAGE_SNAPPY, PAGE_ZSTD = 0x1, 0x2, 0x4, 0x20
CODEC_NAMES = {PAGE_ZLIB: "zlib", PAGE_LZO: "lzo", PAGE_SNAPPY: "snappy", PAGE_ZSTD: "zstd"}
CODEC_BITS = PAGE_ZLIB | PAGE_LZO | PAGE_SNAPPY | PAGE_ZSTD

BITS32_MACHINES = ("i386", "i486", "i586", "i686", "arm", "armv7l", "ppc", "mips", "s390")
MAX_NOTES = 16 << 20  # notes and VMCOREINFO are read for metadata only, up to this size
#: 2nd-bitmap bytes per batch = 64 Ki PFNs (256 MiB of 4 KiB pages), 1.5 MiB of descriptors:
#: a batch's page lists are held while it is decoded, so peak memory stops growing with the
#: dump past one batch
BATCH_BYTES = 8 << 10
WINDOW_BYTES = 4 << 20  # decompression window, bytes
WALK_RELEASE = 64 << 20  # bytes of a flattened stream walked between giving pages back
# Raw pages stored back to back form zero-copy segments of the mmap when at least MIN_RUN
# long (shorter runs are copied into windows: cheaper than a segment, and the engine then
# never scans the compressed bytes around them); a segment spans at most MAX_RUN pages.
MIN_RUN = 16
MAX_RUN = 1 << 16


def probe(head: bytes, path: str) -> str | None:
    """``kdump`` for a plain kdump header or a makedumpfile flattened stream."""
    if head[:8] in SIGNATURES or head[:16] == FLAT_SIGNATURE:
        return "kdump"
    return None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Read the headers and bitmaps of ``path`` (counts only) and return a streaming image:
    decompression windows for compressed (and isolated raw) pages, zero-copy views of the
    mmap for runs of raw pages. Raises ImageError when the headers or bitmaps are unreadable; bad
    pages are counted and, once every readable page was yielded, the stream raises an
    ImageError for the first kind and lists the others in image.warnings."""
    with Evidence(path).closed_on_error() as ev:
        image = MemoryImage(path=path, format="kdump", files=[path], closers=[ev.close])
        src: _Source = _Plain(ev, path)
        if ev.read(0, 16) == FLAT_SIGNATURE:
            src = _Flat(ev, path, image)
            image.meta["container"] = "makedumpfile flattened"
        dump = _Dump.read(src, path, image)
    image.stream = lambda: _pages(dump, image)
    return image


# --------------------------------------------------------------------------- sources


class _Source(Protocol):
    """The assembled kdump file: ``view`` its bytes, ``locate`` page data in the real file."""

    ev: Evidence
    path: str
    size: int  # bytes of the assembled file

    def view(self, offset: int, size: int, what: str) -> np.ndarray:
        """Exactly ``size`` bytes at assembled ``offset`` (zero-copy when possible), else
        ImageError naming ``what``."""
        ...

    def locate(self, offset: np.ndarray, size: np.ndarray) -> np.ndarray:
        """File positions of assembled ranges stored in one piece; -1 for the others."""
        ...

    def place(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The file pieces storing the assembled ranges ``[lo, hi)`` (sorted, disjoint):
        (first, end, index of the range each piece belongs to), in file order per range."""
        ...

    def container(self) -> list[tuple[str, int, int]]:
        """(kind, first, end) file bytes outside the assembled file's data: the flattened
        stream's own header, superseded record data and bytes after its end."""
        ...


class _Plain:
    """A plain kdump file: assembled offset == file offset."""

    def __init__(self, ev: Evidence, path: str) -> None:
        self.ev, self.path, self.size = ev, path, ev.size

    def view(self, offset: int, size: int, what: str) -> np.ndarray:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ImageError(self.path, offset, f"truncated: {what} ({size} bytes) past EOF")
        return self.ev.data[offset : offset + size]

    def locate(self, offset: np.ndarray, size: np.ndarray) -> np.ndarray:
        return np.where((offset >= 0) & (offset + size <= self.size), offset, -1)

    def place(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = np.clip(lo, 0, self.size), np.clip(hi, 0, self.size)
        keep = np.flatnonzero(b > a)
        return a[keep], b[keep], keep

    def container(self) -> list[tuple[str, int, int]]:
        return []


class _Flat:
    """A makedumpfile flattened stream, mapped as sorted non-overlapping intervals
    ``[start, end)`` of the assembled file stored at file position ``pos`` (last writer
    wins where records overlap)."""

    def __init__(self, ev: Evidence, path: str, image: MemoryImage) -> None:
        self.ev, self.path = ev, path
        _sig, ftype, version = FLAT_HEADER.unpack(ev.need(0, FLAT_HEADER.size, "flat header"))
        if ftype != 1 or version != 1:
            raise ImageError(path, 16, f"flattened header type {ftype} version {version} unknown")
        starts, sizes, poss, tail = _flat_records(ev, path, image)
        self.start, self.end, self.pos = _resolve_overlaps(starts, sizes, poss)
        self.size = int(self.end[-1]) if self.end.size else 0
        image.meta["flat_records"] = int(starts.size)
        # record headers and the end record (16 bytes each, fully decoded) are structure
        won = np.argsort(self.pos, kind="stable")
        wlo = self.pos[won]
        whi = wlo + (self.end - self.start)[won]
        self._outside = [("header", 0, FLAT_HEADER_SIZE)]
        self._outside += [("superseded", a, b) for a, b in _minus(poss, poss + sizes, wlo, whi)]
        self._outside.append(("trailing", tail, ev.size))

    def view(self, offset: int, size: int, what: str) -> np.ndarray:
        if size == 0:
            return np.zeros(0, np.uint8)
        i = int(np.searchsorted(self.end, offset, side="right"))
        if i < self.start.size and self.start[i] <= offset and offset + size <= self.end[i]:
            p = int(self.pos[i] + offset - self.start[i])
            return self.ev.data[p : p + size]
        # Spread over several records: gather the pieces (callers ask for bounded sizes; a
        # damaged header's offset may lie beyond any int64, so that is checked first).
        beyond = offset < 0 or size > self.ev.size or offset + size > self.size
        j = i if beyond else int(np.searchsorted(self.start, offset + size, side="left"))
        lo = np.maximum(self.start[i:j], offset) if not beyond else self.start[:0]
        hi = np.minimum(self.end[i:j], offset + size) if not beyond else self.end[:0]
        if beyond or int((hi - lo).sum()) != size:
            raise ImageError(
                self.path,
                None,
                f"{what} ({size} bytes at assembled offset {offset:#x}) is not in the "
                "flattened stream (truncated or damaged)",
            )
        # Intervals are sorted and disjoint, so covering ``size`` bytes means no holes: the
        # file position of every output byte, built without a Python loop over pieces.
        lens = hi - lo
        first = self.pos[i:j] + lo - self.start[i:j]
        before = np.concatenate(([0], np.cumsum(lens)[:-1]))
        where = np.repeat(first - before, lens) + np.arange(size)
        return self.ev.data[where]

    def locate(self, offset: np.ndarray, size: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.end, offset, side="right")
        j = np.minimum(i, max(self.start.size - 1, 0))
        if self.start.size == 0:
            return np.full(offset.shape, -1, np.int64)
        ok = (i < self.start.size) & (self.start[j] <= offset) & (offset + size <= self.end[j])
        return np.where(ok, self.pos[j] + offset - self.start[j], -1)

    def place(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # every interval a range overlaps, one piece each, without a Python loop
        i = np.searchsorted(self.end, lo, side="right")
        n = np.maximum(np.searchsorted(self.start, hi, side="left") - i, 0)
        which = np.repeat(np.arange(lo.size), n)
        k = i[which] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        a = np.maximum(self.start[k], lo[which])
        b = np.minimum(self.end[k], hi[which])
        first = self.pos[k] + a - self.start[k]
        return first, first + b - a, which

    def container(self) -> list[tuple[str, int, int]]:
        return self._outside


def _minus(
    lo: np.ndarray, hi: np.ndarray, cut_lo: np.ndarray, cut_hi: np.ndarray
) -> list[tuple[int, int]]:
    """The ranges ``[lo, hi)`` (sorted, disjoint) less the ranges ``[cut_lo, cut_hi)``
    (sorted, disjoint, each inside one of them), as merged (first, end) pairs."""
    edges = np.unique(np.concatenate((lo, hi, cut_lo, cut_hi)))
    if edges.size < 2:
        return []
    at = edges[:-1]

    def inside(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.searchsorted(a, at, side="right") - np.searchsorted(b, at, side="right")

    left = (inside(lo, hi) - inside(cut_lo, cut_hi)) > 0
    # runs of consecutive kept edge intervals become one range
    flip = np.diff(np.concatenate(([0], left.astype(np.int8), [0])))
    return list(zip(at[flip[:-1] == 1].tolist(), edges[1:][flip[1:] == -1].tolist(),
                    strict=True))  # fmt: skip


def _flat_records(
    ev: Evidence, path: str, image: MemoryImage
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Walk the flattened records (headers only): assembled offset, size, file position of
    each, and the file offset where the stream ends (after its end record, or where the walk
    stopped). Kept in typed arrays: a big dump has millions of records (QEMU writes 16 KiB
    ones)."""
    starts, sizes, poss = array("q"), array("q"), array("q")
    pos = FLAT_HEADER_SIZE
    buf = memoryview(ev.data)  # struct reads a memoryview faster than an ndarray
    walked = 0  # file offset below which the walk gave the mapped pages back
    while True:
        if pos - walked >= WALK_RELEASE:
            # headers 16 KiB apart fault in (nearly) every page of the file around them:
            # give them back as the walk goes, or the whole dump is resident before a page
            # is read
            walked = _give_back(ev, walked, pos)
        if pos + FLAT_RECORD.size > ev.size:
            image.warnings.append(
                ImageError(path, pos, "truncated: flattened stream ends without its end record")
            )
            break
        offset, size = FLAT_RECORD.unpack_from(buf, pos)
        if offset == FLAT_END and size == FLAT_END:
            pos += FLAT_RECORD.size
            break
        if offset < 0 or size < 0:
            image.warnings.append(
                ImageError(path, pos, f"bad flattened record (offset {offset}, size {size})")
            )
            break
        if pos + FLAT_RECORD.size + size > ev.size:
            image.warnings.append(
                ImageError(path, pos, f"truncated: flattened record of {size} bytes past EOF")
            )
            size = ev.size - pos - FLAT_RECORD.size
        if size:
            starts.append(offset)
            sizes.append(size)
            poss.append(pos + FLAT_RECORD.size)
        pos += FLAT_RECORD.size + size
    _give_back(ev, walked, pos)
    if not starts:
        raise ImageError(path, FLAT_HEADER_SIZE, "flattened stream holds no data")
    return (np.frombuffer(starts, np.int64), np.frombuffer(sizes, np.int64),
            np.frombuffer(poss, np.int64), pos)  # fmt: skip


def _resolve_overlaps(
    start: np.ndarray, size: np.ndarray, pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted non-overlapping (start, end, pos) where the latest record wins. Records that
    overlap nothing pass through vectorized; overlapping clusters are swept with a heap."""
    import heapq

    rank = np.arange(start.size)
    order = np.lexsort((rank, start))
    s, e, p, r = start[order], start[order] + size[order], pos[order], rank[order]
    runmax = np.maximum.accumulate(e)
    new = np.concatenate(([True], s[1:] >= runmax[:-1]))
    bounds = np.flatnonzero(np.concatenate((new, [True])))
    lone = np.diff(bounds) == 1
    out_s, out_e, out_p = [s[bounds[:-1][lone]]], [e[bounds[:-1][lone]]], [p[bounds[:-1][lone]]]
    for a, b in zip(bounds[:-1][~lone], bounds[1:][~lone], strict=True):
        cs, ce, cp, cr = s[a:b].tolist(), e[a:b].tolist(), p[a:b].tolist(), r[a:b].tolist()
        edges = sorted(set(cs) | set(ce))
        heap: list[tuple[int, int]] = []
        k = 0
        ps, pe, pp = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            while k < len(cs) and cs[k] <= lo:
                heapq.heappush(heap, (-cr[k], k))
                k += 1
            while heap and ce[heap[0][1]] <= lo:
                heapq.heappop(heap)
            if heap:
                w = heap[0][1]
                fp = cp[w] + lo - cs[w]
                if pe and pe[-1] == lo and pp[-1] + (lo - ps[-1]) == fp:
                    pe[-1] = hi  # the same record continues: one interval
                else:
                    ps.append(lo)
                    pe.append(hi)
                    pp.append(fp)
        out_s.append(np.asarray(ps, np.int64))
        out_e.append(np.asarray(pe, np.int64))
        out_p.append(np.asarray(pp, np.int64))
    s2, e2, p2 = np.concatenate(out_s), np.concatenate(out_e), np.concatenate(out_p)
    order = np.argsort(s2, kind="stable")
    return s2[order], e2[order], p2[order]


# --------------------------------------------------------------------------- headers


@dataclass
class _Dump:
    """What the headers say, validated against the (assembled) file size."""

    src: _Source
    order: str  # "<" or ">"
    block_size: int  # bytes per page
    max_mapnr: int  # PFNs covered by the bitmaps
    bitmap2: int  # assembled offset of the 2nd bitmap (PFNs stored in the file)
    descs: int  # assembled offset of the first page descriptor
    ndesc: int  # descriptors the 2nd bitmap asks for
    incomplete: bool
    tally: dict[str, list[int]] = field(default_factory=dict)
    #: (kind, first, end) file offsets of the parts that are not page data, for the regions
    #: of a plain dump: VMCOREINFO, notes and erase info (``metadata``), the header and sub
    #: header blocks (``header``), bitmaps and page descriptors (``structure``, not scanned)
    parts: list[tuple[str, int, int]] = field(default_factory=list)

    @classmethod
    def read(cls, src: _Source, path: str, image: MemoryImage) -> _Dump:
        order, bits, head, hdr = _header(src, path)
        version, uts = head[1], [u.split(b"\0", 1)[0].decode("ascii", "replace") for u in head[2:]]
        bs = hdr.block_size
        layout = struct.Struct(order + (SUB64 if bits == 64 else SUB32))
        sub = SubHeader._make(layout.unpack(src.view(bs, layout.size, "sub header").tobytes()))
        max_mapnr = sub.max_mapnr_64 if version >= 6 and sub.max_mapnr_64 else hdr.max_mapnr
        image.meta.update(
            {
                "kdump_version": version,
                "guest_bits": bits,
                "byte_order": "little" if order == "<" else "big",
                "utsname_release": uts[2],
                "utsname_machine": uts[4],
                "block_size": bs,
                "compression": _compression_names(hdr.status),
                "nr_cpus": hdr.nr_cpus,
                "dump_level": sub.dump_level,
            }
        )
        image.meta = {k: v for k, v in image.meta.items() if v not in ("", None)}
        image.meta.update(clock.kdump(src.view(0, 0x1A0, "kdump header").tobytes(), order, bits))
        if sub.split:
            # One part of a split dump: the other PFN ranges are in other files.
            image.meta["split_pfns"] = [sub.start_pfn_64, sub.end_pfn_64]
        _sub_meta(src, image, version, sub, order)
        incomplete = bool(hdr.status & STATUS_INCOMPLETE)
        if incomplete:
            image.warnings.append(
                ImageError(path, None, "dump marked incomplete (status 0x8): some pages are lost")
            )
        bm_off = (1 + hdr.sub_hdr_size) * bs
        half = hdr.bitmap_blocks * bs // 2
        need = -(-max_mapnr // 8)
        if need > half:
            image.warnings.append(
                ImageError(
                    path,
                    None,
                    f"max_mapnr {max_mapnr} needs {need} bitmap bytes but the bitmaps hold "
                    f"{half}; PFNs past {half * 8} ignored",
                )
            )
            max_mapnr = half * 8
        descs = (1 + hdr.sub_hdr_size + hdr.bitmap_blocks) * bs
        dump = cls(src, order, bs, max_mapnr, bm_off + half, descs, 0, incomplete)
        ram = dump._popcount(bm_off, "1st bitmap")
        dump.ndesc = dump._popcount(dump.bitmap2, "2nd bitmap")
        texts = [(sub.offset_vmcoreinfo, sub.size_vmcoreinfo, 3), (sub.offset_note,
                 sub.note_size, 4), (sub.offset_eraseinfo, sub.size_eraseinfo, 5)]
        dump.parts = [("metadata", a, a + n) for a, n, since in texts if version >= since and n]
        dump.parts += [("header", 0, bm_off),
                       ("structure", bm_off, descs + dump.ndesc * PAGE_DESC.itemsize)]
        image.meta["ram_size"] = ram * bs
        image.meta["pages_stored"] = dump.ndesc
        cov = image.coverage
        cov.declared, cov.declared_at = ram * bs, bm_off
        cov.declared_by = "the dump's 1st bitmap (RAM pages)"
        if ram > dump.ndesc:
            image.meta["pages_excluded"] = ram - dump.ndesc  # left out by the dump level
            cov.excluded = (ram - dump.ndesc) * bs
            cov.excluded_why = (
                f"{ram - dump.ndesc:,} pages left out by the dump (dump level {sub.dump_level})"
            )
        return dump

    def _popcount(self, offset: int, what: str) -> int:
        """Set bits among the first max_mapnr of the bitmap at ``offset``, read in batches."""
        total = 0
        nbytes = -(-self.max_mapnr // 8)
        for lo in range(0, nbytes, BATCH_BYTES):
            chunk = self.src.view(offset + lo, min(BATCH_BYTES, nbytes - lo), what)
            total += int(np.bitwise_count(_mask_tail(chunk, lo, self.max_mapnr)).sum())
        return total

    def warn(self, what: str, at: int, count: int = 1) -> None:
        """Count ``count`` bad pages of kind ``what``; ``at`` is the (assembled) offset of
        the first one's descriptor, kept for the report."""
        self.tally.setdefault(what, [0, at])[0] += count

    def problems(self) -> list[ImageError]:
        """One error per kind of bad page counted so far (and the count cleared)."""
        where = isinstance(self.src, _Plain)
        out = [
            ImageError(self.src.path, at if where else None, f"{count} page(s) {what}")
            for what, (count, at) in self.tally.items()
        ]
        self.tally.clear()
        return out


def _header(src: _Source, path: str) -> tuple[str, int, tuple, HeaderTail]:
    """Byte order, guest bits (64/32) and the fields of the disk_dump_header. The layout is
    not stated in the file: take the first reading whose version, block size and bitmaps
    make sense, trying the utsname machine's word size first (only a hint: QEMU writes the
    64-bit layout with machine "i686" for an i386 guest)."""
    head_s = {o: struct.Struct(o + HDR_HEAD) for o in "<>"}
    size = head_s["<"].size + TIMESTAMP_SIZE[64] + struct.calcsize("<" + HDR_TAIL)
    raw = src.view(0, min(size, src.size), "kdump header").tobytes()
    if len(raw) < size:
        raise ImageError(path, 0, "truncated: kdump header")
    machine = raw[12 + 4 * 65 : 12 + 5 * 65].split(b"\0", 1)[0].decode("ascii", "replace")
    bits_order = (32, 64) if machine.startswith(BITS32_MACHINES) else (64, 32)
    too_big: ImageError | None = None
    for order in "<>":
        head = head_s[order].unpack_from(raw)
        if head[0] not in SIGNATURES or not 0 < head[1] < 64:
            continue
        for bits in bits_order:
            at = head_s[order].size + TIMESTAMP_SIZE[bits]
            tail = HeaderTail._make(struct.unpack_from(order + HDR_TAIL, raw, at))
            bs = tail.block_size
            if not (512 <= bs <= 1 << 20 and bs & (bs - 1) == 0 and tail.bitmap_blocks > 0):
                continue
            metadata = (1 + tail.sub_hdr_size + tail.bitmap_blocks) * bs
            if metadata <= src.size:
                return order, bits, head, tail
            too_big = too_big or ImageError(
                path,
                0,
                f"truncated or damaged: header, sub header and bitmaps take {metadata} bytes, "
                f"the dump has {src.size}",
            )
    raise too_big or ImageError(path, 0, "not a readable kdump header (no plausible block size)")


def _sub_meta(src: _Source, image: MemoryImage, version: int, sub: SubHeader, order: str) -> None:
    """VMCOREINFO (v3+) and ELF notes (v4+) named by the sub header: metadata only."""
    parts = []
    if version >= 3:
        parts.append(("VMCOREINFO", sub.offset_vmcoreinfo, sub.size_vmcoreinfo))
    if version >= 4:
        parts.append(("notes", sub.offset_note, sub.note_size))
    for what, offset, size in parts:
        if not size:
            continue
        try:
            if size > MAX_NOTES:
                raise ImageError(src.path, None, f"{what} of {size} bytes is implausibly large")
            blob = src.view(offset, size, what).tobytes()
        except ImageError as err:
            image.warnings.append(err)
            continue
        if what == "VMCOREINFO":
            image.meta.update(vmcoreinfo_meta(blob))
        else:
            meta, _ = note_meta(blob, order)
            if "vcpus" in meta:
                image.meta["vcpus"] = meta.pop("vcpus")
            image.meta.update(meta)


def _compression_names(status: int) -> str:
    names = [n for bit, n in CODEC_NAMES.items() if status & bit]
    return "+".join(names) if names else "none"


def _mask_tail(chunk: np.ndarray, lo: int, max_mapnr: int) -> np.ndarray:
    """The bitmap bytes of ``chunk`` (starting at bitmap byte ``lo``) with bits >= max_mapnr
    cleared."""
    last_bit = max_mapnr - lo * 8
    if last_bit >= chunk.size * 8:
        return chunk
    bits = np.unpackbits(chunk, bitorder="little")
    bits[last_bit:] = 0
    return np.packbits(bits, bitorder="little")


# --------------------------------------------------------------------------- pages


class _BadPage(Exception):
    """A compressed page that does not decode to exactly one block."""


def _codecs() -> dict[int, tuple[Callable[[Any, int], bytes] | None, str]]:
    """Decoder per PAGE_* flag: a function (data, block_size) -> page bytes raising _BadPage,
    or None and the reason it is missing (optional packages are imported here, at scan time).
    Every decoder writes into a buffer of one block, so no page can expand past it."""
    out: dict[int, tuple[Callable[[Any, int], bytes] | None, str]] = {PAGE_ZLIB: (_zlib, "")}
    try:
        import lzokay

        def lzo(data: Any, bs: int) -> bytes:
            # lzokay returns the whole buffer: a stream decoding to fewer bytes than a block
            # comes back zero-padded (the page is still scanned), a longer one is an error.
            try:
                return bytes(lzokay.decompress(bytes(data), bs))
            except lzokay.LzokayError as exc:
                raise _BadPage(str(exc)) from None

        out[PAGE_LZO] = (lzo, "")
    except ImportError:
        out[PAGE_LZO] = (None, "python package 'lzokay' is not installed (pip install lzokay)")
    try:
        import cramjam

        def into(fn: Callable[[bytes, bytearray], int]) -> Callable[[Any, int], bytes]:
            def decode(data: Any, bs: int) -> bytes:
                page = bytearray(bs)
                try:
                    n = fn(bytes(data), page)
                except cramjam.DecompressionError as exc:
                    raise _BadPage(str(exc)) from None
                return bytes(page[:n])

            return decode

        out[PAGE_SNAPPY] = (into(cramjam.snappy.decompress_raw_into), "")
        out[PAGE_ZSTD] = (into(cramjam.zstd.decompress_into), "")
    except ImportError:
        reason = "python package 'cramjam' is not installed (pip install cramjam)"
        out[PAGE_SNAPPY] = (None, reason)
        out[PAGE_ZSTD] = (None, reason)
    return out


def _zlib(data: Any, bs: int) -> bytes:
    d = zlib.decompressobj()
    try:
        page = d.decompress(data, bs)
    except zlib.error as exc:
        raise _BadPage(str(exc)) from None
    if d.unconsumed_tail or not d.eof:
        raise _BadPage("zlib stream longer than one block or unfinished")
    return page


class _Window:
    """A reusable decompression buffer of whole pages and the PFNs decoded into it."""

    def __init__(self, bs: int) -> None:
        self.bs = bs
        self.slots = max(1, WINDOW_BYTES // bs)
        self.buf = np.zeros(self.slots * bs, np.uint8)
        self.pfns: list[int] = []
        self.fpos: list[int] = []

    def put(self, pfn: int, page: Any, fpos: int = -1) -> bool:
        """Store one page; True when the window is full."""
        k = len(self.pfns)
        self.buf[k * self.bs : (k + 1) * self.bs] = np.frombuffer(page, np.uint8)
        self.pfns.append(pfn)
        self.fpos.append(fpos)
        return len(self.pfns) == self.slots

    def segment(self, path: str) -> Segment:
        n = len(self.pfns)
        ext = Extents.build(
            np.arange(n, dtype=np.int64) * self.bs,
            np.asarray(self.pfns, np.int64) * self.bs,
            np.full(n, self.bs, np.int64),
            file_offset=np.asarray(self.fpos, np.int64),
        )
        self.pfns, self.fpos = [], []
        return Segment(self.buf, ext, path, reused=True)


# (pfn, file position or -1, stored size, codec flag, assembled offset, descriptor offset)
_Page = tuple[int, int, int, int, int, int]


def _pages(dump: _Dump, image: MemoryImage) -> Iterator[Segment]:
    """Decode the pages in PFN order: compressed (and oddly placed raw) pages through
    windows, yielded as they fill; runs of raw pages stored back to back as zero-copy views
    of the mmap (see _Runs). Bad pages are counted; once everything readable has been
    yielded, the first kind is raised as ImageError (part of the dump was unreadable) and the
    other kinds are added to image.warnings."""
    src, bs, path = dump.src, dump.block_size, image.path
    image.coverage.read = 0
    codecs = _codecs()
    window = _Window(bs)
    runs = _Runs(src, bs, path)
    state = _RawState()
    desc_dtype = PAGE_DESC.newbyteorder(dump.order)
    nbytes = -(-dump.max_mapnr // 8)
    k = 0  # descriptor index of the batch's first PFN
    held, raw = Ranges(), Ranges()  # assembled bytes of page data: all of it, raw pages
    given = 0  # file offset below which the mapped pages were given back

    zeros: list[np.ndarray] = []  # PFNs of all-zero pages met since the last segment yielded

    def with_fills(seg: Segment) -> Segment:
        """``seg`` with the all-zero pages met since the last one as its fills (the engine
        keeps no seam beside them)."""
        if zeros:
            seg.fills = Fills.pages(np.sort(np.concatenate(zeros)) * bs, bs)
            zeros.clear()
        return seg

    def in_order(
        segments: list[tuple[int, Segment]], short: list[tuple[int, int]], copy: Iterator[_Page],
        zero: np.ndarray,
    ) -> Iterator[Segment]:
        """Raw runs, short raw pages and pages to decode of a batch, merged in PFN order
        (each list is): a run yielded ahead of the compressed pages before it would leave
        all their edges waiting for each other in the engine (seams), and their file pages
        mapped until those pages are decoded. The batch's all-zero pages (``zero``, sorted)
        below a segment's last PFN go with it as fills, taken by slices, not page by page."""
        nonlocal given
        taken = 0  # of ``zero``, how many went into ``zeros``

        def met(pfn: int) -> None:
            nonlocal taken
            upto = int(np.searchsorted(zero, pfn))
            if upto > taken:
                zeros.append(zero[taken:upto])
                taken = upto

        runs_at = ((pfn, 0, seg) for pfn, seg in segments)
        short_at = ((pfn, 1, fp) for pfn, fp in short)
        copy_at = ((page[0], 2, page) for page in copy)
        for pfn, kind, item in heapq.merge(runs_at, short_at, copy_at, key=lambda e: e[0]):
            if kind == 0:
                met(pfn)
                yield with_fills(item)
            elif kind == 1:
                if window.put(pfn, src.ev.data[item : item + bs], item):
                    met(pfn)
                    yield with_fills(window.segment(path))
            else:
                data = _decode(dump, codecs, item)
                if data is ALL_ZERO:
                    zeros.append(np.array([pfn], np.int64))
                elif data is not None and window.put(pfn, data, item[1] if item[3] == 0 else -1):
                    met(pfn)
                    yield with_fills(window.segment(path))
                    # page data lies in PFN order: what precedes this page was decoded (or
                    # scanned in place): give its mapped pages back, or the whole dump
                    # stays resident
                    given = _give_back(src.ev, given, item[1])
        if taken < zero.size:
            zeros.append(zero[taken:])

    try:
        for lo in range(0, nbytes, BATCH_BYTES):
            chunk = src.view(dump.bitmap2 + lo, min(BATCH_BYTES, nbytes - lo), "2nd bitmap")
            bits = np.unpackbits(_mask_tail(chunk, lo, dump.max_mapnr), bitorder="little")
            pfns = np.flatnonzero(bits) + lo * 8
            if pfns.size == 0:
                continue
            at = dump.descs + k * PAGE_DESC.itemsize
            have = max(0, min(pfns.size, (src.size - at) // PAGE_DESC.itemsize))
            if have < pfns.size:
                dump.warn("without a page descriptor (truncated dump)",
                          at + have * PAGE_DESC.itemsize, dump.ndesc - k - have)  # fmt: skip
            table = src.view(at, have * PAGE_DESC.itemsize, "page descriptors")
            desc = np.frombuffer(table, desc_dtype)
            raw_fp, raw_pfn, copy, zero = _classify(dump, desc, pfns[:have], at, state,
                                                    (held, raw))  # fmt: skip
            last = have < pfns.size or lo + BATCH_BYTES >= nbytes
            yield from in_order(*runs.add(raw_fp, raw_pfn, last), copy, zero)
            if have < pfns.size:
                break
            k += have
        none = np.zeros(0, np.int64)
        yield from in_order(*runs.add(none, none, True), [], none)
        if window.pfns:
            yield with_fills(window.segment(path))
        yield from _regions(dump, image, held, raw)
    except ImageError:
        _settle(dump, image, k)
        _add_warnings(image, dump.problems())
        raise
    _settle(dump, image, dump.ndesc)
    problems = dump.problems()
    _add_warnings(image, problems[1:])
    if problems:
        raise problems[0]


def _give_back(ev: Evidence, given: int, upto: int) -> int:
    """Release the mapped file bytes ``[given, upto)`` (see Evidence.release); returns the
    new low mark."""
    if upto > given:
        ev.release(given, upto - given)
        return upto
    return given


def _regions(
    dump: _Dump, image: MemoryImage, data: Ranges, raw: Ranges
) -> Iterator[Segment]:
    """The file's bytes that are neither page data nor decoded structure, scanned as
    ``region:*`` at their file offsets. Of the assembled dump: the header and sub header
    blocks (``header``), VMCOREINFO, notes and erase info (``metadata``), bytes between page
    data (``unreferenced``) and after the last page (``trailing``); of a flattened stream
    (see _Source.container): its own header (``header``), record data a later record
    overwrote (``superseded``), bytes after its end record (``trailing``). Bitmaps,
    descriptors, compressed page data (``data`` less ``raw``, the raw pages: guest memory
    stored as it is) and a flattened stream's 16-byte record headers count as structure."""
    src, ev = dump.src, dump.src.ev
    pieces = file_regions(src.size, dump.parts, data.pairs())
    pieces = [(k, a, b) for k, a, b in pieces if k != "structure"]
    first, end, which = src.place(np.array([a for _, a, _ in pieces], np.int64),
                                  np.array([b for _, _, b in pieces], np.int64))  # fmt: skip
    kinds = [pieces[w][0] for w in which.tolist()]
    regions = _merged(list(zip(kinds, first.tolist(), end.tolist(), strict=True))
                      + src.container())  # fmt: skip
    yield from image.region_segments(ev, regions)
    raw_first, raw_end, _ = src.place(raw.lo, raw.hi)
    stored = int((raw_end - raw_first).sum())
    image.coverage.structure += ev.size - sum(b - a for _, a, b in regions) - stored


def _merged(pieces: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``pieces`` (kind, first, end; disjoint) sorted, neighbours of one kind joined, empty
    ones dropped."""
    out: list[tuple[str, int, int]] = []
    for kind, a, b in sorted((p for p in pieces if p[2] > p[1]), key=lambda p: p[1]):
        if out and out[-1][0] == kind and out[-1][2] == a:
            out[-1] = (kind, out[-1][1], b)
        else:
            out.append((kind, a, b))
    return out


def _settle(dump: _Dump, image: MemoryImage, walked: int) -> None:
    """Contract 4 once the pages were read: ``walked`` descriptors were reached, of which the
    counted bad pages were unreadable (all-zero pages count as read: nothing to scan)."""
    bad = sum(count for count, _ in dump.tally.values())
    image.coverage.read = max(0, walked - bad) * dump.block_size
    image.check_coverage()


def _add_warnings(image: MemoryImage, problems: list[ImageError]) -> None:
    seen = {str(w) for w in image.warnings}  # a rerun of the stream adds none twice
    image.warnings += [p for p in problems if str(p) not in seen]


ALL_ZERO = object()  # _decode's answer for a page of zeros: nothing to scan, but known memory


def _decode(dump: _Dump, codecs: dict, page: _Page) -> Any:
    """The bytes of one page (a view for raw pages); ALL_ZERO for an all-zero page; None
    after counting why the page is unreadable."""
    _pfn, fpos, size, codec, asm_off, desc_at = page
    src, bs = dump.src, dump.block_size
    try:
        data = src.ev.data[fpos : fpos + size] if fpos >= 0 else src.view(asm_off, size, "page")
    except ImageError:
        dump.warn("whose data is missing from the flattened stream", desc_at)
        return None
    if codec == 0:
        return data if data.any() else ALL_ZERO  # an all-zero page holds nothing to find
    fn, reason = codecs[codec]
    if fn is None:
        dump.warn(f"compressed with {CODEC_NAMES[codec]} not readable: {reason}", desc_at)
        return None
    try:
        out = fn(data, bs)
    except _BadPage:
        out = b""
    if len(out) != bs:
        dump.warn(f"whose {CODEC_NAMES[codec]} data does not decode to one page", desc_at)
        return None
    return ALL_ZERO if out == _zeros(bs) else out  # (a memcmp: far cheaper than counting)


@functools.cache
def _zeros(n: int) -> bytes:
    return bytes(n)


@dataclass
class _RawState:
    """Carried across batches: where the zero-copy raw pages end, and which repeated page
    positions hold all-zero data (bounded cache)."""

    last_end: int = -1
    zero: dict[int, bool] = field(default_factory=dict)


def _page_rows(cols: tuple[np.ndarray, ...], step: int = 4096) -> Iterator[_Page]:
    """The rows of equal-length ``cols`` as page tuples, made ``step`` rows at a time: a
    batch's tuples all at once (up to 64 Ki pages, ~16 MB of small objects) fragment the heap
    batch after batch, and peak RSS grew with the dump."""
    for a in range(0, cols[0].size, step):
        yield from zip(*(c[a : a + step].tolist() for c in cols), strict=True)


def _classify(
    dump: _Dump, desc: np.ndarray, pfns: np.ndarray, desc_at: int, state: _RawState,
    spans: tuple[Ranges, Ranges],
) -> tuple[np.ndarray, np.ndarray, Iterator[_Page], np.ndarray]:
    """Split a batch of descriptors: raw pages stored in one piece at increasing file
    positions are returned as (file positions, PFNs) for zero-copy reading (increasing, so
    no two share file bytes); raw pages that
    repeat earlier data (QEMU points every zero page at one shared zero page) are dropped
    when all zero; everything else is returned for copying/decoding. Bad descriptors are
    counted in dump.tally; the PFNs of the all-zero repeats come last. ``spans`` gathers the
    assembled ranges of the good pages' data (all, raw)."""
    src, bs = dump.src, dump.block_size
    n = pfns.size
    dat = desc_at + np.arange(n, dtype=np.int64) * PAGE_DESC.itemsize
    size = desc["size"].astype(np.int64)
    codec = desc["flags"].astype(np.int64) & CODEC_BITS
    big = desc["offset"] >= np.uint64(1 << 62)
    off = np.where(big, 0, desc["offset"]).astype(np.int64)
    lost = (off == 0) & ~big
    one_codec = (codec & (codec - 1)) == 0
    bad = ~lost & (big | (size <= 0) | (size > bs) | ~one_codec | ((codec == 0) & (size != bs)))
    past = ~lost & ~bad & (off + size > src.size)
    good = ~lost & ~bad & ~past
    lost_what = (
        "lost (page data offset 0, incomplete dump)"
        if dump.incomplete
        else "with page data offset 0 (damaged descriptor)"
    )
    for mask, what in (
        (lost, lost_what),
        (bad, "with an impossible page descriptor (size or flags)"),
        (past, "with data past the end of the file (truncated dump)"),
    ):
        cnt = int(mask.sum())
        if cnt:
            dump.warn(what, int(dat[np.argmax(mask)]), cnt)
    fpos = np.full(n, -1, np.int64)
    if good.any():
        fpos[good] = src.locate(off[good], size[good])
    spans[0].add(off[good], off[good] + size[good])
    spans[1].add(off[good & (codec == 0)], off[good & (codec == 0)] + bs)
    ri = np.flatnonzero(good & (codec == 0) & (fpos >= 0))
    sel = np.zeros(0, np.int64)
    taken = np.zeros(n, bool)
    if ri.size:
        ends = fpos[ri] + bs
        prev = np.maximum.accumulate(np.concatenate(([state.last_end], ends)))[:-1]
        ok = fpos[ri] >= prev
        state.last_end = max(state.last_end, int(ends.max()))
        sel = ri[ok]
        taken[sel] = True
        again = ri[~ok]  # pages repeating stored data: QEMU's zero pages share one
        if again.size:
            where, which = np.unique(fpos[again], return_inverse=True)
            zero_at = np.empty(where.size, bool)
            for k, p in enumerate(where.tolist()):  # few: one per distinct repeated page
                z = state.zero.get(p)
                if z is None:
                    if len(state.zero) >= 4096:
                        state.zero.clear()
                    z = state.zero[p] = not src.ev.data[p : p + bs].any()
                zero_at[k] = z
            taken[again] = zero_at[which]  # a repeat of an all-zero page: nothing to scan
    rest = np.flatnonzero(good & ~taken)
    copy = _page_rows((pfns[rest], fpos[rest], size[rest], codec[rest], off[rest], dat[rest]))
    zero = np.zeros(n, bool)
    zero[ri] = taken[ri]
    zero[sel] = False  # (of the raw pages taken: the repeats of an all-zero page)
    return fpos[sel], pfns[sel], copy, pfns[zero]


class _Runs:
    """Gathers raw pages (file position, PFN; positions increasing) into runs stored back
    to back in the file. A run of MIN_RUN+ pages becomes a zero-copy segment whose buffer is
    exactly the run's bytes of the mmap (at most MAX_RUN pages each); shorter runs are
    handed back for copying. The last run stays open until the next batch may extend it."""

    def __init__(self, src: _Source, bs: int, path: str) -> None:
        self.src, self.bs, self.path = src, bs, path
        self.fp = np.zeros(0, np.int64)
        self.pfn = np.zeros(0, np.int64)

    def add(
        self, fp: np.ndarray, pfn: np.ndarray, final: bool
    ) -> tuple[list[tuple[int, Segment]], list[tuple[int, int]]]:
        """(first PFN, segment) for the runs completed by these pages, and (PFN, file
        position) of the pages of short completed runs."""
        fp, pfn = np.concatenate((self.fp, fp)), np.concatenate((self.pfn, pfn))
        if fp.size == 0:
            return [], []
        starts = np.flatnonzero(np.concatenate(([True], fp[1:] != fp[:-1] + self.bs)))
        ends = np.concatenate((starts[1:], [fp.size]))
        keep_from = fp.size
        if not final and ends[-1] - starts[-1] < MAX_RUN:
            keep_from = int(starts[-1])  # the last run may go on in the next batch
            starts, ends = starts[:-1], ends[:-1]
        self.fp, self.pfn = fp[keep_from:], pfn[keep_from:]
        long_run = (ends - starts) >= MIN_RUN
        segments = []
        for a, b in zip(starts[long_run].tolist(), ends[long_run].tolist(), strict=True):
            for lo in range(a, b, MAX_RUN):
                hi = min(b, lo + MAX_RUN)
                base = int(fp[lo])
                ext = Extents.build(
                    fp[lo:hi] - base, pfn[lo:hi] * self.bs, np.full(hi - lo, self.bs),
                    file_offset=fp[lo:hi],
                )  # fmt: skip
                view = self.src.ev.data[base : base + (hi - lo) * self.bs]
                segments.append((int(pfn[lo]), Segment(view, ext, self.path)))
        short = np.flatnonzero(np.repeat(~long_run, ends - starts))
        return segments, list(zip(pfn[short].tolist(), fp[short].tolist(), strict=True))
