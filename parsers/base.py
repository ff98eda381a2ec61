"""The guest-memory model every parser returns.

A :class:`MemoryImage` is a map, not a copy: it yields :class:`Segment` objects, each a
contiguous byte buffer (a zero-copy view of an ``mmap`` of the evidence file, or a reusable
decompression window) plus an :class:`Extents` table saying which buffer bytes are which guest
bytes. Addresses live in *address spaces*: space 0 is guest-physical memory (GPA); other spaces
are named blocks that have no GPA (a QEMU ``vga.vram`` RAMBlock, say), addressed by their offset
inside the block.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GPA_SPACE = 0  # index of the guest-physical address space in MemoryImage.spaces
# Guest-physical addresses at or beyond this are not real RAM (x86-64 and AArch64 stop at 52
# bits); a header claiming one is damaged, and extents must stay within int64.
MAX_GPA = 1 << 62
REGION_PREFIX = "region:"  # spaces of file bytes outside guest memory, scanned anyway
#: the kinds of ``region:<kind>`` spaces (docs/formats.md, "Bytes outside guest memory")
REGION_KINDS = (
    "header",  # a format's headers and tables (libvirt XML and its padding, ELF/kdump headers)
    "device-state",  # a QEMU stream's device sections (CPU registers, device buffers)
    "trailing",  # bytes after the format's end marker or last structure
    "slack",  # allocated but unused bytes (qcow2 cluster tails past the vmstate)
    "superseded",  # older copies of pages a later record replaces
    "padding",  # alignment gaps between structures
    "metadata",  # checkpoint groups and tags other than memory (VMware)
    "unreferenced",  # file bytes inside the format's span that no structure accounts for
    "disk",  # a qcow2 image's guest disk data clusters (cardholder data on disk counts too)
    "vmstate",  # a qcow2 snapshot's VM state clusters when --snapshot chose another one
)
REGION_WINDOW = 4 << 20  # most file bytes one region segment spans, bytes
#: suffix of a region space addressed by offsets in decoded data (a decompressed stream, a
#: qcow2 image's virtual disk) rather than in the file: a space of its own, so those addresses
#: never meet the file's (no false neighbours laid side by side, no duplicate merged away)
DECODED = "~decoded"


def region_kind(space_name: str) -> str | None:
    """The region kind (REGION_KINDS) of an address space's name, None for guest memory."""
    if not space_name.startswith(REGION_PREFIX):
        return None
    return space_name[len(REGION_PREFIX) :].removesuffix(DECODED)


class ImageError(Exception):
    """A clear, one-line complaint about an input file: which file, which byte offset, what.

    ``offset`` is a byte offset in ``file`` (None when the problem is not at one place).
    """

    def __init__(self, file: str, offset: int | None, message: str) -> None:
        super().__init__(message)
        self.file = file
        self.offset = offset
        self.message = message

    def __str__(self) -> str:
        where = f" at offset {self.offset:#x}" if self.offset is not None else ""
        return f"{self.file}{where}: {self.message}"


class Remark(ImageError):
    """A note about an image that does not mean any of it went unread (e.g. "addresses may
    be wrong"): shown as a warning, without the error exit status. Every other ImageError a
    parser puts in ``MemoryImage.warnings`` is a damaged or unreadable part."""


@dataclass
class Coverage:
    """What an image declares about its guest memory against what was read of it (contract
    4; docs/architecture.md). All sizes in bytes.

    - ``declared``: guest memory the image says it holds (RAM block list, kdump 1st bitmap,
      VMware memSize or regions, PT_LOAD sizes, LiME ranges ...), None when it says nothing;
      ``declared_by`` names that field, ``declared_at`` its file offset (None: not one place);
    - ``excluded``: of ``declared``, what the format leaves out on purpose (kdump dump level,
      ELF ``begin/length`` filter), with ``excluded_why``: stated, never an error;
    - ``read``: guest memory accounted for: bytes mapped in extents of guest spaces plus pages
      the format stores as fill (QEMU zero pages, kdump shared zero page); each page once;
    - ``stopped_at``: file offset where reading stopped short, when known;
    - ``outside``: file bytes outside guest memory scanned anyway (``region:*`` extents);
    - ``structure``: file bytes the parser decodes as structure and does not scan (record
      headers of 8-16 bytes that cannot hold a secret, bitmaps, page descriptors).
    A parser fills these as it reads; :meth:`MemoryImage.check_coverage` compares them once
    everything was read.
    """

    declared: int | None = None
    declared_by: str = ""
    declared_at: int | None = None
    excluded: int = 0
    excluded_why: str = ""
    read: int = 0
    stopped_at: int | None = None
    outside: int = 0
    structure: int = 0

    @property
    def missing(self) -> int:
        """Declared bytes neither read nor excluded on purpose (0 when nothing is declared)."""
        if self.declared is None:
            return 0
        return max(0, self.declared - self.excluded - self.read)

    def to_dict(self) -> dict[str, Any]:
        """The figures for ``info``, reports and the state database (None-valued ones left out)."""
        out = {
            "declared": self.declared,
            "declared_by": self.declared_by or None,
            "read": self.read,
            "missing": self.missing,
            "excluded": self.excluded,
            "excluded_why": self.excluded_why or None,
            "outside": self.outside,
            "structure": self.structure,
        }
        return {k: v for k, v in out.items() if v is not None}


def file_regions(
    size: int, spans: list[tuple[str, int, int]], guest: list[tuple[int, int]]
) -> list[tuple[str, int, int]]:
    """The bytes ``[0, size)`` of a file that are not guest memory, as (kind, first, end).

    ``spans`` are the format's structures (kind, first, end) in priority order: where two
    overlap (a hostile table), the earlier keeps the bytes; ``guest`` are the (first, end)
    ranges holding guest memory, left out. Bytes in neither are ``unreferenced`` before the
    end of the last structure or guest range, ``trailing`` after it."""
    cuts = {0, size}
    for _, a, b in spans:
        cuts.update((min(max(a, 0), size), min(max(b, 0), size)))
    for a, b in guest:
        cuts.update((min(max(a, 0), size), min(max(b, 0), size)))
    edges = sorted(cuts)
    g = sorted(guest)
    last = max([b for _, _, b in spans] + [b for _, b in guest] + [0])
    out: list[tuple[str, int, int]] = []
    gi = 0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        while gi < len(g) and g[gi][1] <= lo:
            gi += 1
        if gi < len(g) and g[gi][0] <= lo < g[gi][1]:
            continue  # guest memory
        kind = next((k for k, a, b in spans if a <= lo < b), None)
        kind = kind or ("unreferenced" if lo < last else "trailing")
        if out and out[-1][0] == kind and out[-1][2] == lo:
            out[-1] = (kind, out[-1][1], hi)
        else:
            out.append((kind, lo, hi))
    return out


class Ranges:
    """The union of byte ranges ``[first, end)`` added in batches (int64 arrays): bytes that
    several ranges share count once. Batches are merged when they outgrow the ranges kept,
    so the work stays linear in the ranges added; ``lo``/``hi`` are the merged ranges,
    sorted and disjoint."""

    def __init__(self) -> None:
        self._lo = np.zeros(0, np.int64)
        self._hi = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._npending = 0

    @classmethod
    def of(cls, first: np.ndarray, end: np.ndarray) -> Ranges:
        out = cls()
        out.add(first, end)
        return out

    def add(self, first: np.ndarray, end: np.ndarray) -> None:
        self._pending.append((np.asarray(first, np.int64), np.asarray(end, np.int64)))
        self._npending += self._pending[-1][0].size
        if self._npending > max(1 << 16, 2 * self._lo.size):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        lo = np.concatenate([self._lo] + [a for a, _ in self._pending])
        hi = np.concatenate([self._hi] + [b for _, b in self._pending])
        self._pending, self._npending = [], 0
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        if lo.size == 0:
            self._lo, self._hi = lo, hi
            return
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], np.maximum.accumulate(hi[order])
        starts = np.flatnonzero(np.concatenate(([True], lo[1:] > hi[:-1])))
        self._lo = lo[starts]
        self._hi = hi[np.concatenate((starts[1:] - 1, [lo.size - 1]))]

    @property
    def lo(self) -> np.ndarray:
        self._merge()
        return self._lo

    @property
    def hi(self) -> np.ndarray:
        self._merge()
        return self._hi

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.lo.tolist(), self.hi.tolist(), strict=True))

    def total(self) -> int:
        """Bytes covered, each once."""
        return int((self.hi - self.lo).sum())


def printable(raw: bytes) -> str:
    """A name from the file, safe in a one-line message: non-printable bytes as \\xNN."""
    if raw.isascii() and raw.decode().isprintable() and b"\\" not in raw:
        return raw.decode()
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in raw)


def is_damage(problem: ImageError) -> bool:
    """Whether ``problem`` means part of an image went unread (exit status 2), not a remark."""
    return not isinstance(problem, Remark)


def mib(n: int) -> str:
    """``n`` bytes for a message: exact bytes, and MiB when large."""
    return f"{n:,} bytes ({n / 2**20:,.1f} MiB)" if n >= 1 << 20 else f"{n:,} bytes"


@dataclass
class Extents:
    """Which bytes of a segment buffer are which guest bytes (all arrays int64, same length).

    - ``buf_offset``: first byte of the extent in the segment buffer (sorted ascending);
    - ``addr``: its address in ``space`` (a GPA when space is ``GPA_SPACE``), bytes;
    - ``length``: extent length in bytes;
    - ``file_offset``: byte offset in the segment's file, or -1 when not stored there plainly;
    - ``space``: index into ``MemoryImage.spaces``.
    Buffer bytes covered by no extent (record headers, padding) belong to no guest address.
    """

    buf_offset: np.ndarray
    addr: np.ndarray
    length: np.ndarray
    file_offset: np.ndarray
    space: np.ndarray

    @classmethod
    def build(
        cls,
        buf_offset: Any,
        addr: Any,
        length: Any,
        file_offset: Any = None,
        space: Any = None,
    ) -> Extents:
        """Make a table from array-likes (file_offset defaults to -1, space to GPA), sorted."""
        b = np.asarray(buf_offset, dtype=np.int64).reshape(-1)
        n = b.size
        a = np.asarray(addr, dtype=np.int64).reshape(-1)
        ln = np.asarray(length, dtype=np.int64).reshape(-1)
        fo = np.full(n, -1, np.int64) if file_offset is None else np.asarray(file_offset, np.int64)
        sp = np.zeros(n, np.int64) if space is None else np.asarray(space, np.int64)
        fo = np.broadcast_to(fo, (n,))
        sp = np.broadcast_to(sp, (n,))
        # Sorted already (a parser's pages in file order): no sort, and one copy per column,
        # not two (a stream's table has one extent per page; issue 12's peak RSS).
        if b.size > 1 and not (b[1:] >= b[:-1]).all():
            order = np.argsort(b, kind="stable")
            order = order[ln[order] > 0]
        else:
            order = np.flatnonzero(ln > 0)
        b, a, ln, fo, sp = b[order], a[order], ln[order], fo[order], sp[order]
        # Coalesce neighbours that continue each other in buffer, address space and file, so
        # a run of consecutive pages is one extent (fewer seams, fewer boundary checks).
        if b.size > 1:
            cont = (
                (b[1:] == b[:-1] + ln[:-1])
                & (a[1:] == a[:-1] + ln[:-1])
                & (sp[1:] == sp[:-1])
                & ((fo[1:] == fo[:-1] + ln[:-1]) | ((fo[1:] < 0) & (fo[:-1] < 0)))
            )
            if cont.any():
                first = np.flatnonzero(np.concatenate(([True], ~cont)))
                end = np.concatenate((b[first[1:] - 1] + ln[first[1:] - 1], [b[-1] + ln[-1]]))
                ln = end - b[first]
                b, a, fo, sp = b[first], a[first], fo[first], sp[first]
        return cls(b, a, ln, fo, sp)  # fancy indexing made them: owned, not views

    @classmethod
    def concat(cls, *parts: Extents) -> Extents:
        """One table holding every extent of ``parts`` (tables of the same buffer)."""
        return cls.build(
            np.concatenate([p.buf_offset for p in parts]),
            np.concatenate([p.addr for p in parts]),
            np.concatenate([p.length for p in parts]),
            np.concatenate([p.file_offset for p in parts]),
            np.concatenate([p.space for p in parts]),
        )

    @classmethod
    def single(cls, length: int, addr: int = 0, file_offset: int = -1) -> Extents:
        """One extent covering a whole buffer of ``length`` bytes at ``addr``."""
        return cls.build([0], [addr], [length], [file_offset])

    def __len__(self) -> int:
        return int(self.buf_offset.size)

    def total(self) -> int:
        """Guest bytes covered, in bytes."""
        return int(self.length.sum())


@dataclass
class Segment:
    """One contiguous buffer of image bytes and the extents that give them guest addresses.

    ``data`` is a 1-D uint8 array; ``file`` is the file its bytes come from. When ``reused``
    is true the buffer is overwritten by the next segment the image yields (a decompression
    window), so anything kept past the segment must be copied. ``snapshot`` names the
    snapshot the bytes belong to, for images holding several.
    """

    data: np.ndarray
    extents: Extents
    file: str
    reused: bool = False
    #: which snapshot these bytes belong to when an image holds several (qcow2): bytes of
    #: different snapshots are never stitched together, findings say ``details.snapshot``
    snapshot: str | None = None
    #: guest ranges this segment's records declare as filled with one byte (a stream's zero
    #: pages) and so holds no data for: nothing to scan, but known memory — the engine keeps
    #: no seam at a run of stored pages that borders one
    fills: Fills | None = None


@dataclass
class Fills:
    """Guest ranges ``[start, end)`` (bytes) in address space ``space`` (int64 arrays, one
    entry per range of consecutive pages)."""

    space: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @classmethod
    def pages(cls, addr: np.ndarray, size: int) -> Fills:
        """Guest-physical pages of ``size`` bytes at ascending ``addr``, neighbours merged."""
        new = np.ones(addr.size, bool)
        new[1:] = addr[1:] != addr[:-1] + size
        first = np.flatnonzero(new)
        last = np.concatenate((first[1:], [addr.size]))[: first.size] - 1
        return cls(np.full(first.size, GPA_SPACE, np.int64), addr[first], addr[last] + size)


@dataclass
class MemoryImage:
    """A parsed memory image: metadata plus a way to get its segments.

    ``path`` is the primary file as the user named it; ``files`` every file used (companions
    included); ``meta`` free-form guest metadata shown by ``vmleak info`` (guest_name,
    guest_uuid, ram_size in bytes, machine, compression, ...). ``warnings`` collects the parts
    that could not be read (the rest is still scanned; exit status 2) and remarks
    (:class:`Remark`). Random-access images (everything mmapped) list their segments up
    front in ``fixed_segments``; streaming images give a generator factory in ``stream``
    instead, which may raise :class:`ImageError` after yielding what was readable.
    """

    path: str
    format: str
    files: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    spaces: list[str] = field(default_factory=lambda: ["gpa"])
    warnings: list[ImageError] = field(default_factory=list)
    fixed_segments: list[Segment] | None = None
    stream: Any = None  # Callable[[], Iterator[Segment]] for streaming images
    closers: list[Any] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)

    @property
    def random_access(self) -> bool:
        return self.fixed_segments is not None

    def segments(self) -> Iterator[Segment]:
        """Yield the segments in order (for streaming images, each reuses the last's buffer)."""
        if self.fixed_segments is not None:
            yield from self.fixed_segments
        else:
            yield from self.stream()

    def space_id(self, name: str) -> int:
        """Index of the named address space, added on first use."""
        if name not in self.spaces:
            self.spaces.append(name)
        return self.spaces.index(name)

    def region_space(self, kind: str, decoded: bool = False) -> int:
        """Index of the ``region:<kind>`` space (contract 1: file bytes outside guest memory,
        addressed by their offset in the file), or with ``decoded`` of the one addressed by
        offsets in decoded data (a decompressed stream, a qcow2 virtual disk)."""
        if kind not in REGION_KINDS:
            raise ValueError(f"unknown region kind {kind!r}")
        return self.space_id(REGION_PREFIX + kind + (DECODED if decoded else ""))

    def region_extents(
        self, pieces: list[tuple[str, int, int]], buf_base: int = 0, file_base: int | None = 0
    ) -> Extents:
        """Extents of ``region:<kind>`` spaces for ``pieces`` (kind, first, end), addressed by
        offset in the file (or decompressed stream); ``buf_base``: that offset of buffer byte
        0; ``file_base``: file offset of offset 0 when stored plainly (None: in a decompressed
        stream, file offsets -1)."""
        pieces = [(k, a, b) for k, a, b in pieces if b > a]
        first = np.array([a for _, a, _ in pieces], np.int64)
        length = np.array([b - a for _, a, b in pieces], np.int64)
        space = np.array([self.region_space(k, file_base is None) for k, _, _ in pieces],
                         np.int64)
        fo = None if file_base is None else first + file_base
        return Extents.build(first - buf_base, first, length, fo, space)

    def region_segments(
        self, ev: Evidence, pieces: list[tuple[str, int, int]]
    ) -> Iterator[Segment]:
        """Segments of the plainly stored file regions ``pieces`` (kind, first, end; sorted,
        apart) of ``ev``, at their file offsets, counted in ``coverage.outside``. Neighbouring
        pieces share a segment up to REGION_WINDOW bytes: a view of the mmap spanning them
        (never of the whole file), and few segments even when a file leaves many gaps."""
        pieces = [(k, a, b) for k, a, b in pieces if b > a]
        self.coverage.outside += sum(b - a for _, a, b in pieces)
        group: list[tuple[str, int, int]] = []
        for piece in pieces + [("", ev.size, ev.size)]:
            if group and (piece[2] - group[0][1] > REGION_WINDOW or not piece[0]):
                a, b = group[0][1], group[-1][2]
                yield Segment(ev.data[a:b], self.region_extents(group, a), ev.path)
                group = []
            group.append(piece)

    def is_guest_space(self, space: int) -> bool:
        """Whether bytes of address space ``space`` are guest memory (GPA, a RAM block with no
        GPA, a process core's virtual addresses), not a ``region:*`` of the file."""
        return not self.spaces[space].startswith(REGION_PREFIX)

    def in_region(self, space: np.ndarray) -> np.ndarray:
        """Per address-space id in ``space``: whether it is a ``region:*`` of the file."""
        guest = np.array([self.is_guest_space(i) for i in range(len(self.spaces))], bool)
        return ~guest[space]

    def guest_bytes(self, ext: Extents) -> int:
        """Bytes of ``ext`` in guest spaces (see :meth:`is_guest_space`)."""
        return int(ext.total()) - self.region_bytes(ext)

    def region_bytes(self, ext: Extents) -> int:
        """Bytes of ``ext`` in ``region:*`` spaces."""
        return int(ext.length[self.in_region(ext.space)].sum()) if len(ext) else 0

    def check_coverage(self) -> ImageError | None:
        """Compare what the image declares with what was read (call once everything was
        read); the problem, if any, is also added to ``warnings`` (an error: exit 2).

        Memory missing that the format does not leave out on purpose is damage or truncation;
        an image that yields no guest memory at all is an error even when the format allows
        it (every page excluded), since its scan proves nothing."""
        cov = self.coverage
        self.meta["coverage"] = cov.to_dict()  # carried with the result to summary and report
        err = None
        if cov.missing:
            where = cov.stopped_at if cov.stopped_at is not None else cov.declared_at
            err = ImageError(
                self.path,
                where,
                f"guest memory missing: {cov.declared_by or 'the image'} declares "
                f"{mib(cov.declared or 0)}, {mib(cov.read)} read"
                + (f", {mib(cov.excluded)} excluded by the format" if cov.excluded else "")
                + " (damaged or truncated; everything readable was scanned)",
            )
        elif cov.read == 0:
            why = f": {cov.excluded_why}" if cov.excluded else ""
            err = ImageError(self.path, cov.stopped_at, f"no guest memory in this image{why}")
        if err is not None and str(err) not in {str(w) for w in self.warnings}:
            self.warnings.append(err)
        return err

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()

    def __enter__(self) -> MemoryImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Evidence:
    """A file opened strictly read-only, mapped into memory.

    Opened with O_NOATIME where the kernel allows it, so a scan does not even touch the access
    time. ``data`` is a zero-copy uint8 view of the whole file (empty array for an empty file).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
        try:
            fd = os.open(path, flags)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)  # O_NOATIME needs ownership; fall back
        except OSError as exc:
            raise ImageError(path, None, exc.strerror or str(exc)) from None
        try:
            st = os.fstat(fd)
            if not _is_regular_or_block(st.st_mode):
                raise ImageError(path, None, "not a regular file")
            self.size = st.st_size if st.st_size else _device_size(fd)
            self._mmap = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ) if self.size else None
        except OSError as exc:
            raise ImageError(path, None, exc.strerror or str(exc)) from None
        finally:
            os.close(fd)
        self.data = (
            np.frombuffer(self._mmap, dtype=np.uint8)
            if self._mmap is not None
            else np.zeros(0, np.uint8)
        )

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the file, clipped at its end."""
        if offset < 0 or offset >= self.size:
            return b""
        return self.data[offset : offset + size].tobytes()

    def need(self, offset: int, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes at ``offset``, or an ImageError naming ``what`` and offset."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ImageError(
                self.path, offset, f"truncated: {what} ({size} bytes) past end of file"
            )
        return self.data[offset : offset + size].tobytes()

    def release(self, offset: int, size: int) -> None:
        """Give back the mapped pages of ``[offset, offset+size)`` (whole pages inside it):
        they leave this process's resident set but stay in the page cache, so a later read
        costs a page fault, not I/O. Does nothing where ``madvise`` is not supported."""
        lo = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = min(offset + size, self.size) // mmap.PAGESIZE * mmap.PAGESIZE
        if self._mmap is None or hi <= lo:
            return
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass

    @contextmanager
    def closed_on_error(self) -> Iterator[Evidence]:
        """Context for parsing: if parsing fails the file is closed here; if it succeeds the
        MemoryImage that took it over closes it."""
        try:
            yield self
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # numpy views keep the mmap alive; dropping ours is enough, the GC unmaps later.
        self.data = np.zeros(0, np.uint8)
        self._mmap = None


def _is_regular_or_block(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _device_size(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0
