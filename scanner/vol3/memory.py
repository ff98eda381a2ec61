"""Random access to an image's guest-physical memory by address, for the volatility3 layer.

vmleak's parsers describe an image as segments plus extents (parsers/base.py). Images whose
segments are fixed (mmapped files) are read in place. Streamed images (compressed saves, qcow2
snapshots, compressed kdump pages) cannot be read at an arbitrary address, so their
guest-physical bytes are written once into an anonymous sparse temporary file (unlinked at
once; only the pages the image stores take disk space) and read from there. Addresses the
image does not store are not readable, except where the image declares guest RAM that it
did not store because it was all zeros (QEMU streams send zero pages as one-byte records; the
RAM blocks' GPA ranges are in ``meta["blocks"]``): those read as zeros, as on a restore.
"""

from __future__ import annotations

import bisect
import heapq
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from parsers import registry
from parsers.base import GPA_SPACE, MemoryImage

ZEROS = np.zeros(1 << 20, np.uint8)  # what declared but unstored RAM reads as


@dataclass
class Run:
    """``length`` guest bytes at GPA ``start``, held in ``buf`` from ``offset`` on."""

    start: int
    length: int
    buf: np.ndarray | None  # None: declared RAM the image did not store (zeros)
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length


class GuestMemory:
    """Guest-physical memory of an image opened through vmleak's parser registry (of a qcow2
    disk with several internal snapshots, the newest one: ``snapshot`` names it)."""

    def __init__(self, path: str) -> None:
        self.image: MemoryImage = registry.open_image(path)
        snaps = self.image.meta.get("scanned_snapshots") or []
        if len(snaps) > 1:  # one guest at a time: the newest snapshot (qcow2)
            self.image.close()
            self.image = registry.open_image(path, None, {"snapshot": snaps[-1]})
        self.format = self.image.format
        self.snapshot: str | None = self.image.meta.get("snapshot") if len(snaps) > 1 else None
        self._spill: mmap.mmap | None = None
        runs = self._fixed_runs() if self.image.random_access else self._spilled_runs()
        self.runs = _disjoint(_declared_zeros(self.image) + runs)
        self.starts = [r.start for r in self.runs]

    def _fixed_runs(self) -> list[Run]:
        out = []
        for seg in self.image.fixed_segments or []:
            ext = seg.extents
            for k in np.flatnonzero(ext.space == GPA_SPACE).tolist():
                out.append(Run(int(ext.addr[k]), int(ext.length[k]), seg.data,
                               int(ext.buf_offset[k])))
        return out

    def _spilled_runs(self) -> list[Run]:
        """Write every GPA extent of a streamed image at its GPA in a sparse temp file."""
        pieces: list[tuple[int, int]] = []
        with tempfile.TemporaryFile(prefix="vmleak-vol3-") as fh:
            fd = fh.fileno()
            end = 0
            for seg in self.image.segments():
                ext = seg.extents
                for k in np.flatnonzero(ext.space == GPA_SPACE).tolist():
                    b, a, n = int(ext.buf_offset[k]), int(ext.addr[k]), int(ext.length[k])
                    os.pwrite(fd, seg.data[b : b + n], a)
                    pieces.append((a, n))
                    end = max(end, a + n)
            if not end:
                return []
            os.ftruncate(fd, end)
            self._spill = mmap.mmap(fd, end, access=mmap.ACCESS_READ)
        buf = np.frombuffer(self._spill, np.uint8)
        return [Run(a, n, buf, a) for a, n in pieces]

    @property
    def maximum_address(self) -> int:
        """The last readable GPA (inclusive), -1 when nothing is."""
        return self.runs[-1].end - 1 if self.runs else -1

    def _find(self, addr: int) -> int:
        """Index of the run holding ``addr``, or of the first run after it."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i if i >= 0 and addr < self.runs[i].end else i + 1

    def pieces(self, addr: int, length: int) -> Iterator[tuple[int, memoryview]]:
        """(GPA, bytes) of the stored pieces of ``[addr, addr + length)``, in order."""
        end = addr + length
        i = self._find(addr)
        while i < len(self.runs) and self.runs[i].start < end:
            r = self.runs[i]
            a, b = max(addr, r.start), min(end, r.end)
            if r.buf is None:
                for z in range(a, b, ZEROS.size):
                    yield z, memoryview(ZEROS[: min(ZEROS.size, b - z)])
            else:
                yield a, memoryview(r.buf[r.offset + a - r.start : r.offset + b - r.start])
            i += 1

    def stored(self, addr: int, length: int) -> bool:
        """Whether every byte of ``[addr, addr + length)`` is stored."""
        at = addr
        for a, data in self.pieces(addr, length):
            if a != at:
                return False
            at += len(data)
        return at == addr + length

    def ranges(self, addr: int, length: int) -> Iterator[tuple[int, int]]:
        """Maximal stored (GPA, length) ranges within ``[addr, addr + length)``."""
        cur: list[int] | None = None
        for a, data in self.pieces(addr, length):
            if cur and cur[0] + cur[1] == a:
                cur[1] += len(data)
                continue
            if cur:
                yield cur[0], cur[1]
            cur = [a, len(data)]
        if cur:
            yield cur[0], cur[1]

    def close(self) -> None:
        self.runs, self.starts = [], []
        self.image.close()
        self._spill = None  # numpy views keep it mapped until they go


def _declared_zeros(image: MemoryImage) -> list[Run]:
    """Zero runs over the GPA ranges of the image's RAM blocks (QEMU streams); listed first,
    so that every stored byte overrides them."""
    out = []
    for block in image.meta.get("blocks") or []:
        for _, gpa, length in block.get("gpa") or []:
            out.append(Run(int(gpa), int(length), None, 0))
    return out


def _disjoint(runs: list[Run]) -> list[Run]:
    """``runs`` cut into non-overlapping runs sorted by GPA. Where runs overlap, the one listed
    later wins: the copy of a page stored later in the image (a live migration re-sends
    dirtied pages; a restore keeps the last), and any stored byte over the declared zeros."""
    events = sorted(
        [(r.start, 1, k) for k, r in enumerate(runs)] + [(r.end, 0, k) for k, r in enumerate(runs)]
    )
    out: list[Run] = []
    active: list[int] = []  # max-heap of run indices (negated); ended ones dropped lazily
    ended: set[int] = set()
    at = 0
    for pos, opening, k in events:
        while active and -active[0] in ended:
            heapq.heappop(active)
        if active and pos > at:
            w = runs[-active[0]]
            prev = out[-1] if out else None
            if prev is not None and prev.buf is w.buf and prev.end == at and (
                w.buf is None or prev.offset + prev.length == w.offset + at - w.start
            ):
                out[-1] = Run(prev.start, pos - prev.start, prev.buf, prev.offset)
            else:
                out.append(Run(at, pos - at, w.buf, w.offset + at - w.start))
        at = pos
        if opening:
            heapq.heappush(active, -k)
        else:
            ended.add(k)
    return out
