"""The scanning engine: runs detectors over an image's guest memory in guest-address order, so
every secret is reported once, at its true guest address, wherever the format stored its bytes.

**Layout.** A segment's extents (which buffer bytes are which guest bytes) are sorted by
address: a :class:`_Layout` lists them as *pieces* placed one after the other on a virtual
line, where pieces that continue each other in guest memory (a QEMU stream's consecutive
pages, 8 bytes of record header apart in the file) touch, and pieces that do not (a hole, a
page the format left out because it is zero, another address space) are ``gap`` zero bytes
apart. A *run* is a stretch of touching pieces: contiguous guest memory.

**Main scan.** The virtual line is cut into chunks (4 MiB: few Python calls per byte; each
detector cache-blocks its own stage 1 inside), each handed to every detector with ``margin``
extra bytes on each side (the longest match plus context of any detector), and a match counts
only if it starts in the chunk's own range — so chunking never splits or duplicates a match.
A chunk that lies inside one piece is a view of the buffer (zero copy: a raw image); any other
is *gathered*: its pieces copied into one buffer in guest order, zeros in the gaps (a page
stream: one vectorized copy for pages of one size). Where memory really is discontinuous the
detectors see zeros, as they would in a flat copy of the guest's memory, so no match needs
stitching. When detectors of several stage groups run, a chunk's all-zero pages are left out
of it (``_Squeezed``), which saves every group's stage 1 on them for about one pass.

**Seams** exist only in streamed images (decompression windows, a kdump's runs), whose
segments come one at a time: a run ending in one segment may go on in a later one. Each run's
edges are kept (``_EdgeSet``: the bytes next to the edge, copied); a tail meeting a head in the
same address space and snapshot forms a seam, whose window (the tail's bytes, then the head's)
is scanned by each *stage group* (detectors sharing a stage-1 pass, ``Detector.stage``), and
main-scan findings that depend on that edge (a match or its context within reach of it) are
replaced by the window's. Edges that never meet anything were right as scanned: zeros lie
beyond them.

Duplicates (a page stored twice, a match seen twice) are removed; a finding lying inside one
of a subsuming detector's (a PAN inside its Track 2) is dropped. Pages of an mmapped buffer are
given back once scanned, so peak RSS does not grow with the image.
"""

from __future__ import annotations

import bisect
import functools
import mmap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from parsers.base import (
    GPA_SPACE,
    Fills,
    ImageError,
    MemoryImage,
    Remark,
    Segment,
    region_kind,
)
from patterns.base import ENCODINGS, Chunk, Detector, Hit, Hits
from patterns.scratch import buffer
from scanner.findings import Finding, fingerprint
from scanner.units import EDGES, Unit

#: per-call unit; detectors cache-block inside (256 KiB). Each chunk costs every detector its
#: few thousand small NumPy calls (~5 ms in all), so 8 MiB against 4 saved a fifth of the CPU
#: time with every detector on M, for ~13 MiB more peak RSS (benchmarks/README.md)
DEFAULT_CHUNK = 8 * 1024 * 1024
EDGE_BATCH = 4096  # seam windows scanned per batch (bounded memory)
#: bytes of unmatched edges (their rows and per-edge arrays) kept across segments, all stage
#: groups together: each group's share is in proportion to its row width, so every group
#: keeps about as many edges, and the store stays this size however large the image
PENDING_LIMIT = 64 * 1024 * 1024
#: least zero bytes between two pieces that are not guest neighbours: more than any detector
#: reads outside a match (the digit family looks up to 43 UTF-16LE characters back for a
#: keyword; AES reads a crypto_aes_ctx's 244 bytes past a schedule); a detector's own
#: ``context`` raises it
GAP_MIN = 256
PAGE = 4096
SQUEEZE_MIN = 8  # squeeze a chunk when at least 1 in this many of its pages is all zero
#: gathered bytes (a streamed segment's whole line, a chunk of pieces) go into scratch arrays
#: (the detectors' pool, patterns.scratch.buffer) kept per thread up to this size: a fresh
#: array per segment or chunk is a large block freed again, which glibc keeps in the heap
#: rather than giving back, so peak RSS crept up with the image's length; a larger one (no
#: parser makes one) comes and goes
SCRATCH_KEEP = 64 << 20


@dataclass
class ScanConfig:
    """What to look for and how: detectors, fingerprint key, unmasking, chunk size (bytes),
    minimum ``details.confidence`` to report, zero-page squeezing."""

    detectors: list[Detector]
    key: bytes
    unmask: bool = False
    chunk_size: int = DEFAULT_CHUNK
    min_confidence: float = 0.0
    #: leave all-zero pages out of the chunks detectors see (None: when it pays, see Engine)
    squeeze: bool | None = None


@dataclass
class ScanResult:
    """Findings and problems of one image. ``errors`` are problems that stopped part of the
    image from being read (exit status 2); ``warnings`` are remarks (scan went on)."""

    image: str
    format: str = ""
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_scanned: int = 0  # bytes scanned: guest memory and file regions
    region_bytes: int = 0  # of bytes_scanned, those in region:* spaces (not guest memory)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- layout


@dataclass
class _Layout:
    """Pieces of guest memory in guest-address order on a virtual line (module docstring).
    Per piece (ascending ``vstart``): its segment (index into ``segs``), buffer offset,
    length, address space, address, file offset (-1: not stored plainly), virtual offset and
    run. Per run: virtual start and end. ``size``: length of the line, a gap of zeros at each
    end included. Offsets and addresses are int64; ``seg`` and ``run`` are int32 (indexes).

    A stream stores one piece per page, so these tables are the scan's only memory that
    grows with the image: when a segment's extents already come in layout order (a stream
    walked in address order), the piece columns are its extent arrays themselves, not copies,
    and a piece's end is worked out where needed rather than kept."""

    segs: list[Segment]
    seg: np.ndarray
    buf: np.ndarray
    length: np.ndarray
    space: np.ndarray
    addr: np.ndarray
    fo: np.ndarray
    vstart: np.ndarray
    run: np.ndarray
    run_vstart: np.ndarray
    run_vend: np.ndarray
    gap: int
    size: int
    #: the whole virtual line, when a caller made it (then ``read`` slices it)
    line: np.ndarray | None = None

    def vend(self, i: int, j: int) -> np.ndarray:
        """Virtual ends of pieces ``[i, j)``."""
        return self.vstart[i:j] + self.length[i:j]

    def first_past(self, v: int) -> int:
        """Index of the first piece ending after virtual offset ``v`` (pieces do not overlap,
        so it is the last one starting at or before ``v``, or the one after it)."""
        i = int(np.searchsorted(self.vstart, v, side="right")) - 1
        if i < 0:
            return 0
        return i if self.vstart[i] + self.length[i] > v else i + 1

    @classmethod
    def of(cls, segs: list[Segment], gap: int) -> _Layout:
        """The layout of ``segs``' extents. Pieces continue each other when they are guest
        neighbours in the same space and snapshot; of a page stored twice, the copy stored
        last (the newer one) is the one its successor continues. Address spaces lie on the
        line in the order they first appear in the buffers (any order would do: a gap lies
        between two)."""
        parts = [(k, s.extents) for k, s in enumerate(segs) if len(s.extents)]
        if not parts:
            z = np.zeros(0, np.int64)
            return cls(segs, z, z, z, z, z, z, z, z, z, z, gap, 2 * gap)
        snaps = sorted({str(s.snapshot) for s in segs})
        group = [snaps.index(str(s.snapshot)) for s in segs]

        def col(name: str) -> np.ndarray:  # one part: its own array, no copy
            cols = [getattr(e, name) for _, e in parts]
            return cols[0] if len(cols) == 1 else np.concatenate(cols)

        buf, length, space, addr, fo = (
            col(n) for n in ("buf_offset", "length", "space", "addr", "file_offset")
        )
        seg = np.concatenate([np.full(len(e), k, np.int32) for k, e in parts])
        grp = np.concatenate([np.full(len(e), group[k], np.int32) for k, e in parts])
        # spaces ranked by first appearance: a stream's header region (stored first, in a
        # space numbered after guest memory's) then does not put the pieces out of order
        change = np.flatnonzero(np.concatenate(([True], space[1:] != space[:-1])))
        ids, first = np.unique(space[change], return_index=True)
        rank = np.empty(ids.size, np.int32)
        rank[np.argsort(first, kind="stable")] = np.arange(ids.size, dtype=np.int32)
        key = rank[np.searchsorted(ids, space)]
        same_key = (key[1:] == key[:-1]) & (addr[1:] >= addr[:-1])
        same_grp = (grp[1:] == grp[:-1]) & ((key[1:] > key[:-1]) | same_key)
        later = (grp[1:] > grp[:-1]) | same_grp
        del same_key, same_grp
        if not later.all():  # (concatenation order already breaks ties by segment, offset)
            order = np.lexsort((buf, seg, addr, key, grp))
            seg, buf, length, space, addr, fo, grp, key = (
                a[order] for a in (seg, buf, length, space, addr, fo, grp, key)
            )
            del order
        del later
        new = np.ones(seg.size, bool)
        new[1:] = (grp[1:] != grp[:-1]) | (key[1:] != key[:-1])
        del grp, key
        new[1:] |= addr[1:] != addr[:-1] + length[:-1]
        run = np.cumsum(new, dtype=np.int32)
        run -= 1
        # a piece's virtual offset: the lengths before it, plus a gap before each run
        vstart = np.cumsum(length)
        vstart -= length
        vstart += np.multiply(run, gap, dtype=np.int64)
        vstart += gap
        first = np.flatnonzero(new)
        del new
        run_vstart = vstart[first]
        last = np.concatenate((first[1:], [seg.size])) - 1
        run_vend = vstart[last] + length[last]
        size = int(run_vend[-1]) + gap
        return cls(segs, seg, buf, length, space, addr, fo, vstart, run, run_vstart,
                   run_vend, gap, size)  # fmt: skip

    def total(self) -> int:
        """Bytes laid out (guest memory and file regions)."""
        return int(self.length.sum())

    def region_total(self, image: MemoryImage) -> int:
        """Bytes laid out in ``region:*`` spaces (file bytes outside guest memory)."""
        return int(self.length[image.in_region(self.space)].sum()) if self.space.size else 0

    def guest_bytes(self, a: int, b: int) -> int:
        """Guest bytes in virtual ``[a, b)``."""
        i, j = self.first_past(a), min(self.first_past(b) + 1, self.vstart.size)
        span = np.minimum(self.vend(i, j), b) - np.maximum(self.vstart[i:j], a)
        return int(np.clip(span, 0, None).sum())

    def read(self, a: int, b: int, scratch: str | None = None) -> tuple[np.ndarray, bool]:
        """Bytes ``[a, b)`` of the virtual line, and whether they were copied: a view of a
        buffer when one piece holds them all, else a copy with zeros in the gaps (into the
        thread's scratch array ``scratch`` if named: valid until it is next used)."""
        if self.line is not None:
            return self.line[a:b], True
        i = self.first_past(a)
        j = int(np.searchsorted(self.vstart, b, side="left"))
        if j - i == 1 and self.vstart[i] <= a and self.vstart[i] + self.length[i] >= b:
            at = int(self.buf[i] + (a - self.vstart[i]))
            return self.segs[int(self.seg[i])].data[at : at + (b - a)], False
        if scratch is None:
            out = np.zeros(b - a, np.uint8)
        else:
            out = buffer("engine." + scratch, b - a, np.uint8, keep=SCRATCH_KEEP)
            _zero_between(out, self.vstart[i:j] - a, self.vend(i, j) - a)
        lo = self.vstart[i:j] - a  # destination of each piece
        cut_lo = np.maximum(0, -lo)  # bytes of a piece before a / past b
        cut_hi = np.maximum(0, lo + self.length[i:j] - (b - a))
        whole = (cut_lo == 0) & (cut_hi == 0)
        for k in np.unique(self.seg[i:j]).tolist():  # pieces of one size: one vectorized copy
            mine = whole & (self.seg[i:j] == k)
            sizes = np.unique(self.length[i:j][mine])
            for n in sizes.tolist():
                sel = np.flatnonzero(mine & (self.length[i:j] == n))
                if sel.size == 1:
                    continue  # copied below
                src = self.segs[k].data
                dst = sliding_window_view(out, n, writeable=True)
                dst[lo[sel]] = sliding_window_view(src, n)[self.buf[i:j][sel]]
                whole[sel] = False
        for x in np.flatnonzero(whole | (cut_lo > 0) | (cut_hi > 0)).tolist():
            p, c0, c1 = i + x, int(cut_lo[x]), int(cut_hi[x])
            src = self.segs[int(self.seg[p])].data
            s = int(self.buf[p]) + c0
            d = int(lo[x]) + c0
            n = int(self.length[p]) - c0 - c1
            out[d : d + n] = src[s : s + n]
        return out, True

    def rows(self, starts: np.ndarray, w: int) -> np.ndarray:
        """``w``-byte rows of the virtual line from each of ``starts`` (zeros beyond it)."""
        out = np.zeros((starts.size, w), np.uint8)
        rest = np.arange(starts.size)
        if self.line is not None and self.size >= w:
            inside = (starts >= 0) & (starts + w <= self.size)
            out[inside] = sliding_window_view(self.line, w)[starts[inside]]
            rest = np.flatnonzero(~inside)  # rows reaching past either end of the line
        for k, s in zip(rest.tolist(), starts[rest].tolist(), strict=True):
            a, b = max(s, 0), min(s + w, self.size)
            if b > a:
                out[k, a - s : b - s] = self.read(a, b)[0]
        return out

    @functools.cached_property
    def run_pieces(self) -> tuple[np.ndarray, np.ndarray]:
        """Per run: its first piece and its last piece (indices; read once per stage group
        and once for the fill pages of a streamed segment, so kept)."""
        p0 = np.searchsorted(self.run, np.arange(self.run_vstart.size))
        p1 = np.concatenate((p0[1:], [self.run.size])) - 1
        return p0, p1

    def locate(self, v: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For matches at virtual offsets ``v``, ``n`` bytes long: (piece of the first byte,
        whether the match lies inside one run, i.e. is real guest memory)."""
        p = np.searchsorted(self.vstart, v, side="right") - 1
        ok = p >= 0
        p = np.maximum(p, 0)
        r = self.run[p]
        ok &= (v >= self.run_vstart[r]) & (v + n <= self.run_vend[r]) & (v < self.vstart[p]
                                                                         + self.length[p])
        return p, ok

    def intervals(self, k: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Virtual intervals holding the bytes at buffer offsets ``[lo, hi)`` of segment
        ``k``, merged where at most a gap apart."""
        mine = (self.seg == k) & (self.buf < hi) & (self.buf + self.length > lo)
        a = self.vstart[mine] + np.maximum(0, lo - self.buf[mine])
        b = self.vstart[mine] + np.minimum(self.length[mine], hi - self.buf[mine])
        order = np.argsort(a, kind="stable")
        out: list[list[int]] = []
        gap = self.gap
        for x, y in zip(a[order].tolist(), b[order].tolist(), strict=True):
            if out and x <= out[-1][1] + gap:
                out[-1][1] = max(out[-1][1], y)
            else:
                out.append([x, y])
        return [(x, y) for x, y in out]


def _zero_between(out: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Zero the bytes of ``out`` outside the ascending, non-overlapping ``[starts, ends)``
    (a layout's gaps: mostly ``gap`` bytes each, zeroed in one vectorized store per size)."""
    lo = np.clip(np.concatenate(([0], ends)), 0, out.size)
    n = np.clip(np.concatenate((starts, [out.size])), 0, out.size) - lo
    for m in np.unique(n[n > 0]).tolist():
        at = lo[n == m]
        if at.size == 1:
            out[int(at[0]) : int(at[0]) + m] = 0
        else:
            sliding_window_view(out, m, writeable=True)[at] = 0


# ------------------------------------------------------------------------------- groups


@dataclass
class _Group:
    """Detectors sharing a stage-1 pass (``Detector.stage``), scanned together at seams:
    ``edge`` bytes each side of a seam (their longest match plus context, rounded up to 8),
    ``band`` the bytes each side ``may_touch`` needs (None: the whole window)."""

    detectors: list[tuple[int, Detector]]  # (index in config, detector)
    edge: int
    band: int | None


def _groups(detectors: list[Detector]) -> list[_Group]:
    by_stage: dict[str, list[tuple[int, Detector]]] = {}
    for i, d in enumerate(detectors):
        by_stage.setdefault(d.stage or f"own:{d.name}", []).append((i, d))
    out = []
    for members in by_stage.values():
        edge = -(-max(d.max_len + d.context for _, d in members) // 8) * 8
        bands = [d.seam_band for _, d in members]
        band = None if None in bands else min(edge, max(b for b in bands if b is not None))
        out.append(_Group(members, edge, band))
    return out


@dataclass(frozen=True)
class _Where:
    """Where a match's first byte is: address space and address, the file and snapshot its
    bytes come from, and its offset in that file (None: not stored there plainly)."""

    space: int
    addr: int
    file: str
    snapshot: str | None
    offset: int | None


class Engine:
    """Scans MemoryImages with one configuration (see module docstring)."""

    def __init__(self, config: ScanConfig) -> None:
        self.config = config
        self.groups = _groups(config.detectors)
        self.subsumes = {d.name: set(d.subsumes) for d in config.detectors}
        need = max((d.max_len + d.context for d in config.detectors), default=0)
        self.margin = -(-need // 64) * 64  # bytes read each side of a chunk
        ctx = max((d.context for d in config.detectors), default=0)
        self.gap = max(GAP_MIN, -(-ctx // 64) * 64)
        # Squeezing costs about one stage-1 pass (finding zero pages, copying the rest); it
        # pays for itself once detectors of several stage groups (digits, keys, text) share it.
        self.squeeze = len(self.groups) >= 2 if config.squeeze is None else config.squeeze
        self._sources: list[tuple[str, str | None]] = []

    # ----------------------------------------------------------------- public entry points

    def scan_image(
        self, image: MemoryImage, progress: Callable[[int], None] | None = None
    ) -> ScanResult:
        """Scan all of ``image``, in this process."""
        result = ScanResult(image=image.path, format=image.format, meta=dict(image.meta))
        if image.random_access:
            layout = _Layout.of(image.fixed_segments or [], self.gap)
            found = self._main(image, layout, [(0, layout.size)], progress)
            result.bytes_scanned = layout.total()
            result.region_bytes = layout.region_total(image)
            result.findings = finalize([f for f, _ in found], self.subsumes)
        else:
            self._streamed(image, result, progress)
        result.meta = dict(image.meta)  # a stream's metadata grows as it is read (guest_clock)
        self._image_warnings(image, result)
        return result

    def scan_part(self, image: MemoryImage, unit: Unit) -> ScanResult:
        """One unit of a split random-access image (``scanner.units``): a RANGE unit scans
        the guest bytes stored at buffer offsets ``[unit.lo, unit.hi)`` of segment
        ``unit.segment`` (matches starting there; the image's layout is read around them, so
        no seam is left); an EDGES unit reports the image's warnings (a laid-out image has no
        seams left to scan)."""
        result = ScanResult(image=image.path, format=image.format, meta=dict(image.meta))
        if unit.kind == EDGES:
            self._image_warnings(image, result)
            return result
        k, lo, hi = unit.segment, unit.lo, unit.hi
        layout = _Layout.of(image.fixed_segments or [], self.gap)
        found = self._main(image, layout, layout.intervals(k, lo, hi))
        result.findings = finalize([f for f, _ in found], self.subsumes)
        mine = layout.seg == k
        b, n = layout.buf[mine], layout.length[mine]
        overlap = np.clip(np.minimum(b + n, hi) - np.maximum(b, lo), 0, None)
        result.bytes_scanned = int(overlap.sum())
        result.region_bytes = int(overlap[image.in_region(layout.space[mine])].sum())
        return result

    def _image_warnings(self, image: MemoryImage, result: ScanResult) -> None:
        for w in image.warnings:  # damaged parts are errors (exit 2); remarks are not
            (result.warnings if isinstance(w, Remark) else result.errors).append(str(w))

    # ----------------------------------------------------------------- main scan

    def _main(
        self,
        image: MemoryImage,
        layout: _Layout,
        intervals: list[tuple[int, int]],
        progress: Callable[[int], None] | None = None,
        edges: tuple[int, int] | None = None,
    ) -> list[tuple[Finding, tuple[int, ...]]]:
        """Findings starting in the virtual ``intervals`` of ``layout``. With ``edges`` (the
        serial numbers of this segment's first tail and head edge), each finding comes with the
        edges it depends on (a seam there would replace it), else with none."""
        step, m = self.config.chunk_size, self.margin
        release = _Releaser(layout)
        # one squeeze buffer for every chunk of this scan: a fresh one per chunk costs a page
        # fault per 4 KiB (about a third of the squeeze's time on memory-like images)
        squeezed = np.empty(min(step + 2 * m, layout.size) if self.squeeze else 0, np.uint8)
        out: list[tuple[Finding, tuple[int, ...]]] = []
        lo_data = int(layout.run_vstart[0]) if layout.run_vstart.size else 0
        hi_data = int(layout.run_vend[-1]) if layout.run_vend.size else 0
        for lo, hi in intervals:
            for cs in range(lo, hi, step):
                ce = min(cs + step, hi)
                a, b = max(0, cs - m), min(layout.size, ce + m)
                buf, copied = layout.read(a, b, "chunk")
                # a gathered chunk holds a stream's pages, which are never all zero
                sq = (_Squeezed.of(buf, self.gap, squeezed)
                      if self.squeeze and not copied else None)
                chunk = sq.chunk if sq else Chunk(buf)
                for det in self.config.detectors:
                    hits = det.find(chunk)
                    if not len(hits):
                        continue
                    at = sq.unsqueeze(hits.start) if sq else hits.start
                    keep = (at + a >= cs) & (at + a < ce)
                    if sq:
                        keep &= sq.inside(hits)
                    out += self._place(image, layout, det, hits.select(keep), chunk.data,
                                       at[keep] + a, (max(lo_data, a) - a, min(hi_data, b) - a)
                                       if not sq else None, sq, edges)  # fmt: skip
                release.upto(ce - m)
                if progress:
                    progress(layout.guest_bytes(cs, ce))
        release.upto(layout.size)
        return out

    def _place(
        self,
        image: MemoryImage,
        layout: _Layout,
        det: Detector,
        hits: Hits,
        data: np.ndarray,
        v: np.ndarray,
        clip: tuple[int, int] | None,
        sq: _Squeezed | None,
        edges: tuple[int, int] | None,
    ) -> list[tuple[Finding, tuple[int, ...]]]:
        """Findings for hits of one chunk (``data``, hits at virtual offsets ``v``) that lie
        in guest memory; context is read from the chunk, within ``clip`` (chunk offsets of
        the first and last guest byte of the layout) or the squeezed range."""
        if not len(hits):
            return []
        p, ok = layout.locate(v, hits.length)
        out = []
        reach = max(det.context, 2)
        for j in np.flatnonzero(ok).tolist():
            x = int(p[j])
            rel = int(v[j] - layout.vstart[x])
            seg = layout.segs[int(layout.seg[x])]
            fo = int(layout.fo[x])
            where = _Where(int(layout.space[x]), int(layout.addr[x]) + rel, seg.file,
                           seg.snapshot, fo + rel if fo >= 0 else None)  # fmt: skip
            s = int(hits.start[j])
            bounds = sq.bounds(s) if sq else clip
            f = self._finding(image, det, data, s, hits, j, bounds, where)
            if f is None:
                continue
            deps: tuple[int, ...] = ()
            if edges is not None:
                r = int(layout.run[x])
                vs, n = int(v[j]), int(hits.length[j])
                if vs - reach < layout.run_vstart[r]:
                    deps += (edges[1] + r,)  # the run's head
                if vs + n + reach > layout.run_vend[r]:
                    deps += (edges[0] + r,)  # the run's tail
            out.append((f, deps))
        return out

    def _finding(
        self,
        image: MemoryImage,
        det: Detector,
        buf: np.ndarray,
        s: int,
        hits: Hits,
        j: int,
        bounds: tuple[int, int] | None,
        where: _Where,
    ) -> Finding | None:
        """Describe hit ``j`` of ``hits`` (starting at ``s`` in ``buf``; its context clipped to
        ``bounds`` of ``buf``) found at ``where`` into a Finding, or None when dropped."""
        ln, c = int(hits.length[j]), det.context
        lo, hi = bounds if bounds is not None else (0, buf.size)
        enc = ENCODINGS[int(hits.encoding[j])]
        hit = Hit(
            raw=buf[s : s + ln].tobytes(),
            encoding=enc,
            before=buf[max(lo, s - c) : s].tobytes(),
            after=buf[s + ln : min(hi, s + ln + c)].tobytes(),
            tag=0 if hits.tag is None else int(hits.tag[j]),
        )
        d = det.describe(hit)
        if d is None:
            return None
        details = dict(d.details)
        if float(details.get("confidence", 1.0)) < self.config.min_confidence:
            return None
        if self.config.unmask:
            details["value"] = d.value.decode("latin-1")
        name = image.spaces[where.space]
        region = region_kind(name)  # not guest memory: a part of the file itself
        if region is not None:
            details["region"] = region
            if where.offset is None:
                details["stream_offset"] = where.addr
        elif where.space != GPA_SPACE:
            details["block"] = name
            details["block_offset"] = where.addr
        if where.snapshot is not None:
            details["snapshot"] = where.snapshot
        return Finding(
            image=image.path,
            format=image.format,
            detector=det.name,
            gpa=where.addr if where.space == GPA_SPACE else None,
            file=where.file,
            offset=where.offset,
            length=ln,
            encoding=enc,
            masked=d.masked,
            fingerprint=fingerprint(self.config.key, det.name, d.value),
            details=details,
            space=where.space,
            addr=where.addr,
        )

    # ----------------------------------------------------------------- streamed images

    def _streamed(
        self, image: MemoryImage, result: ScanResult, progress: Callable[[int], None] | None
    ) -> None:
        """Segment by segment: main scan of each one's layout, edges kept until they meet."""
        widths = sum(g.edge for g in self.groups) or 1
        pending = {id(g): _Pending(PENDING_LIMIT * g.edge // widths) for g in self.groups}
        found: list[tuple[Finding, tuple[int, ...]]] = []
        seams: set[int] = set()  # serial numbers of edges that met another
        serial = 0
        before = _FillKeys.none()  # the fill pages of the segment before
        try:
            for seg in image.segments():
                layout = _Layout.of([seg], self.gap)
                runs = layout.run_vstart.size
                src = self._source_id(seg)
                group = self._group_of(src)
                fills = _FillKeys.of(seg.fills, group)
                for p in pending.values():
                    p.settle(fills, self._sources)
                known = fills.plus(before)
                before = fills
                if not runs:
                    continue
                first = (serial, serial + runs)  # serials of tails, then heads
                serial += 2 * runs
                if runs > 64:  # many pieces: gather the segment (a bounded window) once
                    layout.line = layout.read(0, layout.size, "line")[0]
                found += self._main(image, layout, [(0, layout.size)], progress, first)
                result.bytes_scanned += layout.total()
                result.region_bytes += layout.region_total(image)
                need = known.need(layout, group)
                for g in self.groups:
                    edges = _EdgeSet.of(layout, g.edge, src, first, pending[id(g)].blocks, need)
                    found += self._seams(image, g, edges, pending[id(g)], seams)
        except ImageError as err:
            result.errors.append(str(err))
        if any(p.lost for p in pending.values()):
            result.warnings.append(
                f"{image.path}: too many unmatched memory edges to keep; pieces of guest memory "
                "stored far apart were scanned unstitched (a secret straddling two of them "
                "may be missed)"
            )
        keep = [f for f, deps in found if not any(e in seams for e in deps)]
        result.findings = finalize(keep, self.subsumes)

    def _source_id(self, seg: Segment) -> int:
        """Index of (file, snapshot) of a segment's bytes in ``self._sources``."""
        key = (seg.file, seg.snapshot)
        if key not in self._sources:
            self._sources.append(key)
        return self._sources.index(key)

    def _group_of(self, src: int) -> int:
        """The snapshot group of source ``src`` (as :func:`_edge_keys` numbers them)."""
        return int(_snapshot_groups(self._sources)[src])

    def _seams(
        self, image: MemoryImage, group: _Group, edges: tuple[_EdgeSet, _EdgeSet],
        pending: _Pending, seams: set[int],
    ) -> list[tuple[Finding, tuple[int, ...]]]:
        """Pair this segment's edges with each other and with those kept from earlier
        segments; scan the seams; keep the unpaired for later (within the group's share of
        PENDING_LIMIT)."""
        tails, heads = pending.tails.plus(edges[0]), pending.heads.plus(edges[1])
        ti, hi = _pair(tails, heads, self._sources)
        seams.update(tails.serial[ti].tolist())
        seams.update(heads.serial[hi].tolist())
        found = self._scan_windows(image, group, tails, ti, heads, hi)
        pending.keep(tails.drop(ti), heads.drop(hi), self._sources)
        return [(f, ()) for f in found]

    def _scan_windows(
        self,
        image: MemoryImage,
        group: _Group,
        tails: _EdgeSet,
        ti: np.ndarray,
        heads: _EdgeSet,
        hi: np.ndarray,
    ) -> list[Finding]:
        """Scan windows made of tail row ``ti[k]`` + head row ``hi[k]``, joined at the head's
        address; keep matches that touch the join (or whose context reaches across it).

        A batch's windows are narrowed to the guest bytes its rows hold next to the join (a
        4 KiB page in 8 KiB rows): what lies beyond is absent memory, zeros in a full row and
        nothing in a narrowed one, which no detector tells apart."""
        found: list[Finding] = []
        e = group.edge  # where the join lies in the stored rows
        for at in range(0, ti.size, EDGE_BATCH):
            tb, hb = ti[at : at + EDGE_BATCH], hi[at : at + EDGE_BATCH]
            held = max(int(tails.held[tb].max(initial=0)), int(heads.held[hb].max(initial=0)))
            w = min(e, -(-held // 8) * 8)
            if w == 0:
                continue
            # only windows where some detector of the group could match across the middle,
            # judged on the narrow band around it when every detector allows that
            b = min(group.band or w, w)
            band = np.concatenate((tails.rows(tb, e - b, e), heads.rows(hb, 0, b)), axis=1)
            useful = np.zeros(band.shape[0], bool)
            probe = Chunk(band)
            for _, det in group.detectors:
                useful |= det.may_touch(probe)
            useful &= band.any(axis=1)  # nothing is found in zeros
            rows = np.flatnonzero(useful)
            tb, hb = tb[rows], hb[rows]
            flat = np.concatenate((tails.rows(tb, e - w, e), heads.rows(hb, 0, w)), axis=1)
            flat = flat.reshape(-1)
            chunk = Chunk(flat)
            for _, det in group.detectors:
                h = det.find(chunk)
                if not len(h):
                    continue
                row = h.start // (2 * w)
                rel = h.start - row * (2 * w)
                c = det.context
                keep = (h.start + h.length - 1) // (2 * w) == row
                keep &= (rel <= w + c) & (rel + h.length >= w - c)  # touching counts
                for k in np.flatnonzero(keep).tolist():
                    r, x = int(row[k]), int(rel[k])
                    t, hh = int(tb[r]), int(hb[r])
                    if x >= w:  # first byte on the head side of the join
                        fo, src = int(heads.fo[hh]), int(heads.src[hh])
                        fo = fo + (x - w) if fo >= 0 else -1
                    else:
                        fo, src = int(tails.fo[t]), int(tails.src[t])
                        fo = fo - (w - x) if fo >= 0 else -1
                    file, snapshot = self._sources[src]
                    where = _Where(int(heads.space[hh]), int(heads.addr[hh]) + x - w, file,
                                   snapshot, fo if fo >= 0 else None)  # fmt: skip
                    base = r * 2 * w
                    f = self._finding(image, det, flat, int(h.start[k]), h, k,
                                      (base, base + 2 * w), where)  # fmt: skip
                    if f:
                        found.append(f)
        return found


# ------------------------------------------------------------------------------- seams


@dataclass
class _EdgeSet:
    """Run edges of streamed segments, each with the ``w`` bytes next to it (a tail's row ends
    at the edge, a head's begins there; zeros where the run is shorter): address space,
    guest address of the edge, file offset of the byte at the edge (-1: not stored plainly),
    source (index into Engine._sources), serial number, ``held``, how many of its row's
    bytes are guest memory, and where its row is: row ``at`` of block ``blk`` of ``blocks``.

    Rows stay in the block their segment made them in (keyed by the serial of the block's
    first edge, so older blocks have smaller keys): selecting and joining edge sets copies
    the small per-edge arrays only, never rows, and ``blocks`` is shared by all the sets of
    one stage group."""

    space: np.ndarray
    addr: np.ndarray
    fo: np.ndarray
    src: np.ndarray
    serial: np.ndarray
    held: np.ndarray
    blk: np.ndarray
    at: np.ndarray
    blocks: dict[int, np.ndarray]

    @classmethod
    def empty(cls, blocks: dict[int, np.ndarray]) -> _EdgeSet:
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z, z, z, z, z, blocks)

    @classmethod
    def of(
        cls, layout: _Layout, w: int, src: int, first: tuple[int, int],
        blocks: dict[int, np.ndarray], need: tuple[np.ndarray, np.ndarray],
    ) -> tuple[_EdgeSet, _EdgeSet]:
        """(tails, heads) of the runs of a segment's ``layout`` that ``need`` one (a mask per
        run for tails, one for heads), their rows added to ``blocks``; ``first``: serial
        numbers of the first run's tail and head (a run's edges are numbered by its index)."""
        vs, ve = layout.run_vstart, layout.run_vend
        cols = np.arange(w)[None, :]
        held = np.minimum(ve - vs, w)
        p0, p1 = layout.run_pieces
        t_fo = np.where(layout.fo[p1] >= 0, layout.fo[p1] + layout.length[p1], -1)
        t_addr = layout.addr[p1] + layout.length[p1]
        t, h = np.flatnonzero(need[0]), np.flatnonzero(need[1])
        t_rows = layout.rows(ve[t] - w, w)
        t_rows[cols < (w - held[t])[:, None]] = 0  # bytes before the run
        h_rows = layout.rows(vs[h], w)
        h_rows[cols >= held[h][:, None]] = 0
        blocks[first[0]], blocks[first[1]] = t_rows, h_rows
        tails = cls(layout.space[p1[t]], t_addr[t], t_fo[t], np.full(t.size, src),
                    first[0] + t, held[t], np.full(t.size, first[0]), np.arange(t.size),
                    blocks)  # fmt: skip
        heads = cls(layout.space[p0[h]], layout.addr[p0[h]], layout.fo[p0[h]],
                    np.full(h.size, src), first[1] + h, held[h], np.full(h.size, first[1]),
                    np.arange(h.size), blocks)  # fmt: skip
        return tails, heads

    def __len__(self) -> int:
        return int(self.addr.size)

    def _cols(self) -> tuple[np.ndarray, ...]:
        return (self.space, self.addr, self.fo, self.src, self.serial, self.held, self.blk,
                self.at)  # fmt: skip

    def select(self, idx: np.ndarray) -> _EdgeSet:
        return _EdgeSet(*(a[idx] for a in self._cols()), self.blocks)

    def drop(self, idx: np.ndarray) -> _EdgeSet:
        keep = np.ones(len(self), bool)
        keep[idx] = False
        return self.select(np.flatnonzero(keep))

    def plus(self, other: _EdgeSet) -> _EdgeSet:
        if not len(self):
            return other
        return _EdgeSet(*(np.concatenate((a, b)) for a, b in zip(
            self._cols(), other._cols(), strict=True)), self.blocks)  # fmt: skip

    def rows(self, idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Bytes ``[lo, hi)`` of the rows of edges ``idx``, one row each (a copy)."""
        out = np.empty((idx.size, hi - lo), np.uint8)
        blk = self.blk[idx]
        for b in np.unique(blk).tolist():
            m = blk == b
            out[m] = self.blocks[b][self.at[idx[m]], lo:hi]
        return out

    def compact(self) -> None:
        """Copy the rows still used out of blocks at most half used; free unused blocks."""
        order = np.argsort(self.blk, kind="stable")
        ids, starts, counts = np.unique(self.blk[order], return_index=True, return_counts=True)
        for b, start, k in zip(ids.tolist(), starts.tolist(), counts.tolist(), strict=True):
            rows = self.blocks[b]
            if 2 * k > rows.shape[0]:
                continue
            mine = order[start : start + k]
            self.blocks[b] = rows[self.at[mine]]
            self.at[mine] = np.arange(k)


@dataclass
class _Pending:
    """Edges of one stage group waiting for a partner in a later segment, and the row blocks
    they use. Past ``limit`` bytes (rows, and ``EDGE_COST`` per edge) the oldest blocks are
    forgotten (their edges stay as scanned, against zeros), their keys (``_edge_keys``: one
    int each, ~60 bytes in a set) kept so that one meeting a partner later can be reported
    (``lost``)."""

    limit: int
    blocks: dict[int, np.ndarray] = field(default_factory=dict)
    tails: _EdgeSet = field(init=False)
    heads: _EdgeSet = field(init=False)
    gone_tails: set[int] = field(default_factory=set)
    gone_heads: set[int] = field(default_factory=set)
    lost: bool = False

    def __post_init__(self) -> None:
        self.tails = self.heads = _EdgeSet.empty(self.blocks)

    def settle(self, fills: _FillKeys, sources: list[tuple[str, str | None]]) -> None:
        """Forget the edges that border fill pages of a later segment: their neighbour is
        known, and holds nothing."""
        if fills.starts.size and len(self.tails):
            self.tails = self.tails.select(
                np.flatnonzero(~np.isin(_edge_keys(self.tails, sources), fills.starts)))
        if fills.ends.size and len(self.heads):
            self.heads = self.heads.select(
                np.flatnonzero(~np.isin(_edge_keys(self.heads, sources), fills.ends)))

    def keep(self, tails: _EdgeSet, heads: _EdgeSet, sources: list) -> None:
        # an edge meeting one forgotten earlier: that seam was scanned unstitched
        if self.gone_tails and len(heads):
            self.lost |= not self.gone_tails.isdisjoint(_edge_keys(heads, sources).tolist())
        if self.gone_heads and len(tails):
            self.lost |= not self.gone_heads.isdisjoint(_edge_keys(tails, sources).tolist())
        used = set(np.unique(tails.blk).tolist()) | set(np.unique(heads.blk).tolist())
        for b in [b for b in self.blocks if b not in used]:
            del self.blocks[b]
        tails.compact()
        heads.compact()
        size = sum(rows.nbytes for rows in self.blocks.values())
        size += EDGE_COST * (len(tails) + len(heads))
        for b in sorted(self.blocks):  # oldest first
            if size <= self.limit:
                break
            rows = self.blocks.pop(b)
            t, h = tails.blk == b, heads.blk == b
            size -= rows.nbytes + EDGE_COST * int(t.sum() + h.sum())
            self.gone_tails.update(_edge_keys(tails.select(np.flatnonzero(t)), sources).tolist())
            self.gone_heads.update(_edge_keys(heads.select(np.flatnonzero(h)), sources).tolist())
            tails, heads = tails.select(np.flatnonzero(~t)), heads.select(np.flatnonzero(~h))
        self.tails, self.heads = tails, heads


#: bytes of an edge's per-edge arrays (``_EdgeSet``: eight int64 columns)
EDGE_COST = 8 * 8


def _pair(
    tails: _EdgeSet, heads: _EdgeSet, sources: list[tuple[str, str | None]]
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (tail k, head k) of edges that meet: a tail ending where a head starts, in the
    same space and the same snapshot (bytes of two snapshots are never one guest's memory).
    Each head takes at most one tail (the last one stored) and vice versa."""
    if len(tails) == 0 or len(heads) == 0:
        z = np.zeros(0, np.int64)
        return z, z
    tk, hk = _edge_keys(tails, sources), _edge_keys(heads, sources)
    t_order = np.argsort(tk, kind="stable")
    tks = tk[t_order]
    # last tail with that key: searchsorted right - 1
    pos = np.searchsorted(tks, hk, side="right") - 1
    ok = (pos >= 0) & (tks[np.maximum(pos, 0)] == hk)
    head_idx = np.flatnonzero(ok)
    tail_idx = t_order[pos[ok]]
    # a tail matched by several heads (duplicated pages): keep its last head only
    _, last = np.unique(tail_idx[::-1], return_index=True)
    keep = np.sort(tail_idx.size - 1 - last)
    return tail_idx[keep], head_idx[keep]


def _snapshot_groups(sources: list[tuple[str, str | None]]) -> np.ndarray:
    """Per source (file, snapshot): the index of its snapshot among all sources' (bytes of two
    snapshots are never one guest's memory; files of one snapshot are)."""
    snaps = sorted({str(s) for _, s in sources})
    return np.array([snaps.index(str(s)) for _, s in sources], np.int64)


def _key(group: np.ndarray | int, space: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """One int64 per guest address: snapshot group, space and address (spaces and snapshots
    are few; addresses < 2**48)."""
    return (group * 256 + space) * (1 << 48) + addr


def _edge_keys(edges: _EdgeSet, sources: list[tuple[str, str | None]]) -> np.ndarray:
    """One int64 per edge (:func:`_key`): two edges meet when a tail's key equals a head's."""
    return _key(_snapshot_groups(sources)[edges.src], edges.space, edges.addr)


@dataclass
class _FillKeys:
    """Where fill pages (``Segment.fills``) begin and end, as :func:`_key` values."""

    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def none(cls) -> _FillKeys:
        z = np.zeros(0, np.int64)
        return cls(z, z)

    @classmethod
    def of(cls, fills: Fills | None, group: int) -> _FillKeys:
        if fills is None or not fills.start.size:
            return cls.none()
        return cls(_key(group, fills.space, fills.start), _key(group, fills.space, fills.end))

    def plus(self, other: _FillKeys) -> _FillKeys:
        return _FillKeys(np.concatenate((self.starts, other.starts)),
                         np.concatenate((self.ends, other.ends)))

    def need(self, layout: _Layout, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Which runs of ``layout`` need a tail edge and which a head edge: those not
        bordering a fill page (where memory goes on with nothing to find, no seam is left)."""
        p0, p1 = layout.run_pieces
        tail = _key(group, layout.space[p1], layout.addr[p1] + layout.length[p1])
        head = _key(group, layout.space[p0], layout.addr[p0])
        return ~np.isin(tail, self.starts), ~np.isin(head, self.ends)


# ------------------------------------------------------------------------------- squeeze


@dataclass
class _Squeezed:
    """A chunk with its all-zero pages left out, but for ``gap // 2`` zero bytes at each edge
    of every zero run: ``chunk`` holds the kept ranges back to back, range k (``length[k]``
    bytes) at squeezed offset ``qstart[k]`` and chunk offset ``bstart[k]``. Inside a range
    the bytes are the chunk's, and a detector reading past one sees zeros for at least
    ``gap`` bytes, as it would unsqueezed (no detector reads further outside a match); so
    what it finds within a range is what it would find unsqueezed, and nothing real spans two
    ranges (a zero page lies between)."""

    chunk: Chunk
    qstart: np.ndarray
    bstart: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, data: np.ndarray, gap: int, out: np.ndarray) -> _Squeezed | None:
        """``data`` squeezed into ``out`` (a reused buffer at least ``data.size`` bytes; its
        previous chunk is overwritten), or None when under 1 in SQUEEZE_MIN of its pages is
        zero."""
        keep = -(-gap // 2)
        p0 = (-data.ctypes.data) % PAGE  # whole memory pages: a mapping's page-cache pages
        npages = (data.size - p0) // PAGE
        if npages < SQUEEZE_MIN:
            return None
        words = data[p0 : p0 + npages * PAGE].view(np.uint64).reshape(-1, PAGE // 8)
        zero = np.bitwise_or.reduce(words, axis=1) == 0  # measured: a third faster than any()
        if np.count_nonzero(zero) * SQUEEZE_MIN < zero.size:
            return None
        edges = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        runs = np.concatenate(([0] if zero[0] else [], edges, [zero.size] if zero[-1] else []))
        out_lo = p0 + runs[0::2].astype(np.int64) * PAGE + keep  # left out: lo .. hi
        out_hi = p0 + runs[1::2].astype(np.int64) * PAGE - keep
        bstart = np.concatenate(([0], out_hi))
        length = np.concatenate((out_lo, [data.size])) - bstart
        qstart = np.concatenate(([0], np.cumsum(length)[:-1]))
        buf = out[: int(length.sum())]
        np.concatenate([data[x : x + m] for x, m in zip(bstart.tolist(), length.tolist(),
                                                        strict=True)], out=buf)
        return cls(Chunk(buf), qstart, bstart, length)

    def _range(self, q: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.qstart, q, side="right") - 1

    def inside(self, hits: Hits) -> np.ndarray:
        """Which hits lie within one kept range (the others span a left-out zero run)."""
        k = self._range(hits.start)
        return hits.start + hits.length <= self.qstart[k] + self.length[k]

    def unsqueeze(self, q: np.ndarray) -> np.ndarray:
        """Chunk offsets of squeezed offsets ``q``."""
        k = self._range(q)
        return self.bstart[k] + (q - self.qstart[k])

    def bounds(self, q: int) -> tuple[int, int]:
        """The squeezed offsets of the kept range holding ``q``."""
        k = int(self._range(np.array([q]))[0])
        return int(self.qstart[k]), int(self.qstart[k] + self.length[k])


# ------------------------------------------------------------------------------- release


class _Releaser:
    """Gives back the pages of mmapped buffers once scanned (``MADV_DONTNEED``: they stay in
    the page cache, but leave this process's resident set), so peak RSS does not grow with
    the image: after each chunk, per segment, the span of buffer bytes its pieces up to there
    came from (when that span is mostly theirs). Does nothing for buffers that are not an
    mmap."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.done = 0  # virtual offset released up to
        self.maps: dict[int, tuple[mmap.mmap, int]] = {}  # segment -> (mmap, its offset)
        for k, seg in enumerate(layout.segs):
            base, root = seg.data, seg.data
            while isinstance(base, np.ndarray):
                root, base = base, base.base
            if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
                at = seg.data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
                self.maps[k] = (base.obj, at)

    def upto(self, v: int) -> None:
        """Release what the pieces before virtual offset ``v`` came from."""
        lay = self.layout
        if not self.maps or v <= self.done:
            return
        i = lay.first_past(self.done)
        j = int(np.searchsorted(lay.vstart, v, side="left"))
        cut_lo = np.maximum(0, self.done - lay.vstart[i:j])
        cut_hi = np.maximum(0, lay.vend(i, j) - v)
        self.done = v
        for k, (mm, origin) in list(self.maps.items()):
            mine = lay.seg[i:j] == k
            if not mine.any():
                continue
            b = lay.buf[i:j][mine] + cut_lo[mine]
            n = lay.length[i:j][mine] - cut_lo[mine] - cut_hi[mine]
            lo, hi = int(b.min()), int((b + n).max())
            if hi - lo > 2 * int(n.sum()) + 2 * PAGE:
                continue  # scattered pieces: their span holds pages still to be read
            lo, hi = origin + lo, min(origin + hi, len(mm))
            lo -= lo % mmap.PAGESIZE
            hi -= hi % mmap.PAGESIZE
            if hi > lo:
                try:
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                except (OSError, ValueError):
                    del self.maps[k]  # not supported here: keep going without


def finalize(found: Iterable[Finding], subsumes: dict[str, set[str]]) -> list[Finding]:
    """Sort, drop duplicates (same detector, address, length, value) and findings inside a
    subsuming detector's finding (a PAN inside its track)."""
    uniq: dict[tuple, Finding] = {}
    for f in found:
        key = (f.detector, f.details.get("snapshot"), f.space, f.addr, f.length, f.fingerprint)
        if key in uniq:
            # Prefer the copy that has a file offset (main scan) and the higher confidence.
            old = uniq[key]
            if (old.offset is None and f.offset is not None) or f.confidence > old.confidence:
                uniq[key] = f
        else:
            uniq[key] = f
    out = sorted(uniq.values(), key=lambda f: (f.space, f.addr, f.detector))
    containers = [f for f in out if subsumes.get(f.detector)]
    if not containers:
        return out
    keys = [(f.space, f.addr) for f in out]
    drop = set()
    for c in containers:
        lo = bisect.bisect_left(keys, (c.space, c.addr))
        hi = bisect.bisect_left(keys, (c.space, c.addr + c.length))
        for f in out[lo:hi]:
            inside = f.addr + f.length <= c.addr + c.length
            if f is not c and f.detector in subsumes[c.detector] and inside:
                drop.add(id(f))
    return [f for f in out if id(f) not in drop]
