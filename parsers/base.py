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
        order = np.argsort(b, kind="stable")
        order = order[ln[order] > 0]
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
        return cls(b.copy(), a.copy(), ln.copy(), fo.copy(), sp.copy())

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
