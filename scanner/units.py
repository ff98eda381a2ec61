"""Units of work and what a worker needs to run them without parsing the image again.

Every image starts as one ``open`` unit: a worker parses it once, and either scans it whole
(small images, streamed images, one worker) or, for a large random-access image, returns its
:class:`Layout` — the files, the byte span of each segment buffer in its file, the extent
tables, metadata and warnings — plus ``range`` units (main scan of buffer bytes
``[lo, hi)`` of one segment) and one ``edges`` unit (every segment's extent edges). Those
units then run anywhere the same files are visible, each mapping the files from the layout
(no parse). The same units serve the local process pool and Dask; all of them pickle.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from parsers.base import (
    GPA_SPACE,
    Evidence,
    Extents,
    ImageError,
    MemoryImage,
    Ranges,
    Remark,
    Segment,
)

OPEN, RANGE, EDGES = "open", "range", "edges"
#: guest bytes around a RANGE unit's own memory that the engine reads (a chunk's margins: the
#: longest match plus context of any detector, under 16 KiB)
UNIT_REACH = 32 << 10


@dataclass(frozen=True)
class Unit:
    """One unit of work of one image: ``kind`` OPEN (parse, then scan whole or plan), RANGE
    (main scan of buffer bytes ``[lo, hi)`` of segment ``segment``) or EDGES (the edge pass of
    every segment)."""

    kind: str
    segment: int = 0
    lo: int = 0
    hi: int = 0

    def __str__(self) -> str:
        return f"range-{self.segment}-{self.lo:x}" if self.kind == RANGE else self.kind


@dataclass
class SegmentLayout:
    """Where one segment buffer lies: ``length`` bytes at byte ``offset`` of ``file``, its
    extent table, and its snapshot."""

    file: str
    offset: int
    length: int
    extents: Extents
    snapshot: str | None = None


@dataclass
class Layout:
    """A parsed random-access image, as far as scanning needs it (module docstring).
    ``stamps`` holds each mapped file's (size, mtime_ns) at parse time: a unit refuses a file
    that changed since. Warnings are kept as (is a remark, file, offset, message): exceptions
    with their own constructor do not pickle."""

    path: str
    format: str
    files: list[str]
    meta: dict[str, Any]
    spaces: list[str]
    warnings: list[tuple[bool, str, int | None, str]]
    segments: list[SegmentLayout]
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, image: MemoryImage) -> Layout | None:
        """The layout of a random-access image whose every segment is a view of a whole-file
        mapping of its own file (as ``Evidence`` makes); None otherwise."""
        segs = []
        for seg in image.fixed_segments or []:
            where = _mapped_at(seg.data)
            if where is None or where[0] != os.path.getsize(seg.file):
                return None
            segs.append(SegmentLayout(seg.file, where[1], seg.data.size, seg.extents, seg.snapshot))
        stamps = {}
        for s in segs:
            st = os.stat(s.file)
            stamps[s.file] = (st.st_size, st.st_mtime_ns)
        warnings = [(isinstance(w, Remark), w.file, w.offset, w.message) for w in image.warnings]
        return cls(
            image.path,
            image.format,
            list(image.files),
            dict(image.meta),
            list(image.spaces),
            warnings,
            segs,
            stamps,
        )

    def for_unit(self, unit: Unit) -> Layout:
        """What ``unit`` needs: a RANGE unit the extents of its segment that overlap its
        range (no other can hold a match starting there) and every extent within
        ``UNIT_REACH`` guest bytes of those (the engine reads a chunk's margin from the guest
        neighbours of its bytes, wherever they are stored), an EDGES unit everything."""
        if unit.kind != RANGE:
            return self
        own = self.segments[unit.segment].extents
        mine = (own.buf_offset < unit.hi) & (own.buf_offset + own.length > unit.lo)
        lo, hi = _merged_spans(own.space[mine], own.addr[mine] - UNIT_REACH,
                               own.addr[mine] + own.length[mine] + UNIT_REACH)  # fmt: skip
        segs = []
        for s in self.segments:
            e = s.extents
            key_lo = e.space * (1 << 56) + e.addr
            k = np.searchsorted(lo, key_lo + e.length, side="left") - 1  # last span before end
            near = (k >= 0) & (hi[np.maximum(k, 0)] > key_lo)
            sliced = Extents(*(a[near] for a in (e.buf_offset, e.addr, e.length, e.file_offset,
                                                  e.space)))  # fmt: skip
            segs.append(replace(s, extents=sliced))
        return replace(self, segments=segs)

    def open(self) -> MemoryImage:
        """The image again, from the files (mapped, not parsed); ImageError when a file is
        gone or changed since the layout was taken."""
        image = MemoryImage(
            self.path,
            self.format,
            list(self.files),
            dict(self.meta),
            list(self.spaces),
            [(Remark if r else ImageError)(f, o, m) for r, f, o, m in self.warnings],
            fixed_segments=[],
        )
        mapped: dict[str, Evidence] = {}
        try:
            for s in self.segments:
                ev = mapped.get(s.file)
                if ev is None:
                    ev = mapped[s.file] = Evidence(s.file)
                    image.closers.append(ev.close)
                    st = os.stat(s.file)
                    if (st.st_size, st.st_mtime_ns) != self.stamps.get(s.file):
                        raise ImageError(s.file, None, "changed while it was being scanned")
                data = ev.data[s.offset : s.offset + s.length]
                image.fixed_segments.append(Segment(data, s.extents, s.file, snapshot=s.snapshot))
        except (ImageError, OSError) as err:
            image.close()
            if isinstance(err, ImageError):
                raise
            raise ImageError(self.path, None, err.strerror or str(err)) from None
        return image


def _merged_spans(
    space: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Spans ``[lo, hi)`` of (space, address) keys, sorted and joined where they overlap."""
    spans = Ranges.of(space * (1 << 56) + lo, space * (1 << 56) + hi)
    return spans.lo, spans.hi


def _mapped_at(data: np.ndarray) -> tuple[int, int] | None:
    """(length of the mapping, offset of ``data`` in it) when ``data`` views an mmap."""
    base, root = data, data
    while isinstance(base, np.ndarray):
        root, base = base, base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap):
        return None
    offset = data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return len(base), offset


def gpa_ranges(image: MemoryImage) -> list[tuple[int, int]] | None:
    """Guest-physical ranges [start, end) a random-access image holds, merged (from its extent
    tables; None for a streamed image, whose extents are known only while decompressing).
    Merged as arrays: a stream's table has one extent per stored page, and a Python pair per
    extent cost more memory than the scan itself (issue 12)."""
    if not image.random_access:
        return None
    ranges = Ranges()
    for seg in image.fixed_segments or []:
        e = seg.extents
        gpa = e.space == GPA_SPACE
        ranges.add(e.addr[gpa], e.addr[gpa] + e.length[gpa])
    return ranges.pairs()
