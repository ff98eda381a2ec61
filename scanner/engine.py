"""The scanning engine: runs detectors over an image's segments and stitches guest memory back
together, so every secret is reported once, at its true guest address.

Per segment:

1. **Main scan.** The buffer is cut into chunks (4 MiB: few Python calls per byte; each
   detector cache-blocks its own stage 1 inside); each chunk is handed to the
   detectors with ``margin`` extra bytes on each side (their longest match plus context), and a
   match counts only if it *starts* in the chunk's own range — so chunking never splits or
   duplicates a match. Matches are mapped to extents (``np.searchsorted``); a match that
   crosses an extent boundary is dropped (those bytes are not adjacent in the guest), and so is
   one that touches an extent edge (what lies beyond the edge in the buffer is not its guest
   neighbour, so its boundary checks would be wrong) — the edge pass finds those.
2. **Edge pass.** Every extent edge gets a small window: the last/first ``W`` bytes before and
   after the edge *in guest order*. Where the guest neighbour of an edge is elsewhere (another
   page of a QEMU stream, the next decompression window, the far side of a VMware region), its
   bytes are joined on (a seam); where there is none (end of RAM, a hole), zeros stand in. The
   windows of many edges are gathered (``sliding_window_view`` rows) into one batch buffer and
   scanned once; a match counts if it touches its window's edge. Detectors first rule out most
   windows cheaply (``may_touch``, on a narrow band around the join where ``seam_band`` says
   that suffices), and all-zero windows are skipped.

Detectors are grouped into tiers by margin, so a detector with long matches (a PEM block) does
not make the digit detectors rescan kilobytes around every seam. When detectors of several tiers
run, each chunk's all-zero pages are left out of what they see (``_Squeezed``: a few hundred
zero bytes stand in for each zero run), which saves every tier's stage 1 on those pages for
the price of about one pass; with one tier that price is not worth paying. Duplicates (a page stored
twice, a match seen by both passes) are removed; a finding lying inside one of a subsuming
detector's (a PAN inside its Track 2) is dropped. Pages of an mmapped buffer are given back
once scanned, so peak RSS does not grow with the image.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from parsers.base import GPA_SPACE, ImageError, MemoryImage, Remark, Segment
from patterns.base import ENCODINGS, UTF16LE, Chunk, Detector, Hit, Hits
from scanner.findings import Finding, fingerprint
from scanner.units import EDGES, Unit

DEFAULT_CHUNK = 4 * 1024 * 1024  # per-call unit; detectors cache-block inside (256 KiB)
EDGE_BATCH = 4096  # edge windows scanned per batch (bounded memory)
AROUND_BATCH = 8  # findings read between two releases of the pages they faulted in
FAULT_REACH = 2 << 20  # a read may map a whole large folio (up to 2 MiB) around it
PENDING_LIMIT = 64 * 1024 * 1024  # bytes of unmatched edge windows kept across segments
#: address spaces named ``region:<kind>`` hold bytes of the file that are not guest memory
#: (headers, device state, slack ...), addressed by their offset in the file or stream
REGION_PREFIX = "region:"


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
    bytes_scanned: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tier:
    detectors: list[tuple[int, Detector]]  # (index in config, detector)
    margin: int  # bytes of context each side of a chunk
    edge: int  # bytes each side of an edge in its window: the longest match plus context
    band: int | None  # bytes each side of an edge that may_touch needs (None: the window)


def _tiers(detectors: list[Detector]) -> list[_Tier]:
    by_margin: dict[int, list[tuple[int, Detector]]] = {}
    for i, d in enumerate(detectors):
        need = d.max_len + d.context
        margin = 256  # coarse tiers: detectors sharing a stage (digits) share a chunk
        while margin < need:
            margin *= 2
        by_margin.setdefault(margin, []).append((i, d))
    tiers = []
    for m, v in sorted(by_margin.items()):
        edge = -(-max(d.max_len + d.context for _, d in v) // 8) * 8
        bands = [d.seam_band for _, d in v]
        band = None if None in bands else min(edge, max(b for b in bands if b is not None))
        tiers.append(_Tier(v, m, edge, band))
    return tiers


@dataclass
class _EdgeSet:
    """Edge windows: per edge its address space, the guest address of the edge, the file and
    file offset of the byte at the edge (-1: not stored plainly), and ``rows``, an object
    whose ``[idx]`` gives the edges' ``width``-byte windows."""

    space: np.ndarray
    addr: np.ndarray
    fo: np.ndarray
    src: np.ndarray  # index into Engine._sources: (file, snapshot) the bytes came from
    rows: Any

    @classmethod
    def empty(cls, width: int) -> _EdgeSet:
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z, np.zeros((0, width), np.uint8))

    def __len__(self) -> int:
        return int(self.addr.size)

    def subset(self, idx: np.ndarray) -> _EdgeSet:
        """The chosen edges (``idx`` ascending), kept for later segments: rows of a reused
        buffer are copied (they must outlive it), rows of a fixed one stay lazy."""
        return _EdgeSet(
            self.space[idx], self.addr[idx], self.fo[idx], self.src[idx], _keep_rows(self.rows, idx)
        )

    def plus(self, other: _EdgeSet) -> _EdgeSet:
        return _EdgeSet(
            np.concatenate((self.space, other.space)),
            np.concatenate((self.addr, other.addr)),
            np.concatenate((self.fo, other.fo)),
            np.concatenate((self.src, other.src)),
            _RowSource(self.rows, other.rows),
        )


class Engine:
    """Scans MemoryImages with one configuration (see module docstring)."""

    def __init__(self, config: ScanConfig) -> None:
        self.config = config
        self.tiers = _tiers(config.detectors)
        self.subsumes = {d.name: set(d.subsumes) for d in config.detectors}
        # Squeezing costs about one stage-1 pass (finding zero pages, copying the rest); it
        # pays for itself once detectors of several tiers (digits, keys, text) share it.
        self.squeeze = len(self.tiers) >= 2 if config.squeeze is None else config.squeeze
        self._sources: list[tuple[str, str | None]] = []

    # ----------------------------------------------------------------- public entry points

    def scan_image(
        self, image: MemoryImage, progress: Callable[[int], None] | None = None
    ) -> ScanResult:
        """Scan every segment of ``image`` (main scan and edges), in this process."""
        return self._scan(image, main=True, edges=True, progress=progress)

    def scan_part(self, image: MemoryImage, unit: Unit) -> ScanResult:
        """One unit of a split random-access image (``scanner.units``): a RANGE unit
        main-scans buffer bytes ``[unit.lo, unit.hi)`` of segment ``unit.segment``; an EDGES
        unit does every segment's edges."""
        if unit.kind == EDGES:
            return self._scan(image, main=False, edges=True)
        k, lo, hi = unit.segment, unit.lo, unit.hi
        seg = (image.fixed_segments or [])[k]
        result = ScanResult(image=image.path, format=image.format, meta=dict(image.meta))
        result.findings = finalize(self.scan_range(image, seg, lo, hi), self.subsumes)
        ext = seg.extents
        overlap = np.minimum(ext.buf_offset + ext.length, hi) - np.maximum(ext.buf_offset, lo)
        result.bytes_scanned = int(np.clip(overlap, 0, None).sum())
        return result

    def _scan(
        self,
        image: MemoryImage,
        main: bool,
        edges: bool,
        progress: Callable[[int], None] | None = None,
    ) -> ScanResult:
        result = ScanResult(image=image.path, format=image.format, meta=dict(image.meta))
        pending = {id(t): [_EdgeSet.empty(t.edge), _EdgeSet.empty(t.edge)] for t in self.tiers}
        raw: list[Finding] = []
        try:
            for seg in image.segments():
                if main:
                    raw += self.scan_range(image, seg, 0, seg.data.size)
                    result.bytes_scanned += seg.extents.total()
                if edges:
                    for tier in self.tiers:
                        raw += self._segment_edges(image, seg, tier, pending[id(tier)], result)
                if progress:
                    progress(seg.extents.total())
        except ImageError as err:
            result.errors.append(str(err))
        result.meta = dict(image.meta)  # a stream's metadata grows as it is read (guest_clock)
        if edges:
            for tier in self.tiers:
                raw += self._lonely_edges(image, tier, pending[id(tier)])
            for w in image.warnings:  # damaged parts are errors (exit 2); remarks are not
                (result.warnings if isinstance(w, Remark) else result.errors).append(str(w))
        result.findings = finalize(raw, self.subsumes)
        return result

    def scan_range(self, image: MemoryImage, seg: Segment, lo: int, hi: int) -> list[Finding]:
        """Main scan of buffer bytes ``[lo, hi)`` of ``seg`` (matches starting there)."""
        data = seg.data
        n = data.size
        step = self.config.chunk_size
        parts: list[list[Hits]] = [[] for _ in self.config.detectors]
        release = _Releaser(data)
        reach = self.tiers[-1].margin  # the widest tier's
        for cs in range(lo, hi, step):
            ce = min(cs + step, hi)
            sq = None
            if self.squeeze:
                sq = _Squeezed.of(data, max(0, cs - reach), min(n, ce + reach))
            for tier in self.tiers:  # every tier on this chunk while it is in cache
                a = max(0, cs - tier.margin)
                chunk = sq.chunk if sq else Chunk(data[a : min(n, ce + tier.margin)])
                for k, det in tier.detectors:
                    h = det.find(chunk)
                    if len(h):
                        if sq:
                            h = sq.place(h)
                        else:
                            h.start += a
                        parts[k].append(h.select((h.start >= cs) & (h.start < ce)))
            release.upto(ce - reach)
        found: list[Finding] = []
        for k, det in enumerate(self.config.detectors):
            hits = Hits.concat(parts[k])
            if len(hits):
                found += self._place(image, seg, det, hits, release)
        return found

    # ----------------------------------------------------------------- main-scan placement

    def _place(
        self, image: MemoryImage, seg: Segment, det: Detector, hits: Hits, release: _Releaser
    ) -> list[Finding]:
        """Findings for buffer hits lying strictly inside one extent, one character away from
        its edges at least (the edge pass finds those nearer)."""
        ext = seg.extents
        if len(ext) == 0:
            return []
        i = np.searchsorted(ext.buf_offset, hits.start, side="right") - 1
        ok = i >= 0
        i = np.maximum(i, 0)
        e_lo = ext.buf_offset[i]
        e_hi = e_lo + ext.length[i]
        end = hits.start + hits.length
        # a detector's boundary checks read one character (UTF-16LE: 2 bytes) either side
        width = np.where(hits.encoding == UTF16LE, 2, 1)
        ok &= (hits.start - width >= e_lo) & (end + width <= e_hi)
        out = []
        for j in np.flatnonzero(ok).tolist():
            s, ln, x = int(hits.start[j]), int(hits.length[j]), int(i[j])
            lo, hi = int(e_lo[j]), int(e_hi[j])
            rel = s - lo
            fo = int(ext.file_offset[x])
            f = self._finding(
                image,
                det,
                seg.data,
                s,
                ln,
                int(hits.encoding[j]),
                0 if hits.tag is None else int(hits.tag[j]),
                lo,
                hi,
                int(ext.space[x]),
                int(ext.addr[x]) + rel,
                seg.file,
                seg.snapshot,
                fo + rel if fo >= 0 else None,
            )
            if f:
                out.append(f)
            release.around(s)  # reading it faulted its neighbourhood in
        release.flush()
        return out

    def _finding(
        self,
        image: MemoryImage,
        det: Detector,
        buf: np.ndarray,
        s: int,
        ln: int,
        enc: int,
        tag: int,
        lo: int,
        hi: int,
        space: int,
        addr: int,
        file: str,
        snapshot: str | None,
        offset: int | None,
    ) -> Finding | None:
        """Describe one match (context clipped to ``[lo, hi)`` of ``buf``) into a Finding."""
        c = det.context
        hit = Hit(
            raw=buf[s : s + ln].tobytes(),
            encoding=ENCODINGS[enc],
            before=buf[max(lo, s - c) : s].tobytes(),
            after=buf[s + ln : min(hi, s + ln + c)].tobytes(),
            tag=tag,
        )
        d = det.describe(hit)
        if d is None:
            return None
        details = dict(d.details)
        if float(details.get("confidence", 1.0)) < self.config.min_confidence:
            return None
        if self.config.unmask:
            details["value"] = d.value.decode("latin-1")
        gpa = addr if space == GPA_SPACE else None
        name = image.spaces[space]
        if name.startswith(REGION_PREFIX):  # not guest memory: a part of the file itself
            details["region"] = name[len(REGION_PREFIX) :]
            if offset is None:
                details["stream_offset"] = addr
        elif space != GPA_SPACE:
            details["block"] = name
            details["block_offset"] = addr
        if snapshot is not None:
            details["snapshot"] = snapshot
        return Finding(
            image=image.path,
            format=image.format,
            detector=det.name,
            gpa=gpa,
            file=file,
            offset=offset,
            length=ln,
            encoding=ENCODINGS[enc],
            masked=d.masked,
            fingerprint=fingerprint(self.config.key, det.name, d.value),
            details=details,
            space=space,
            addr=addr,
        )

    # ----------------------------------------------------------------- edges and seams

    def _source_id(self, seg: Segment) -> int:
        """Index of (file, snapshot) of a segment's bytes in ``self._sources``."""
        key = (seg.file, seg.snapshot)
        if key not in self._sources:
            self._sources.append(key)
        return self._sources.index(key)

    def _segment_edges(
        self,
        image: MemoryImage,
        seg: Segment,
        tier: _Tier,
        pending: list[_EdgeSet],
        result: ScanResult,
    ) -> list[Finding]:
        """Edge windows of one segment: pair its edges with each other and with edges left
        from earlier segments, scan the pairs, keep the unpaired (copied) for later."""
        w = tier.edge
        if len(seg.extents) == 0:
            return []
        tails, heads = _edge_sets(seg, w, self._source_id(seg))
        tails, heads = pending[0].plus(tails), pending[1].plus(heads)
        ti, hi = _pair(tails, heads, self._sources)
        found = self._scan_windows(image, tier, tails, ti, heads, hi)
        t_left = np.setdiff1d(np.arange(len(tails)), ti, assume_unique=True)
        h_left = np.setdiff1d(np.arange(len(heads)), hi, assume_unique=True)
        pending[0], pending[1] = tails.subset(t_left), heads.subset(h_left)
        if pending[0].rows.nbytes + pending[1].rows.nbytes > PENDING_LIMIT:
            result.warnings.append(
                f"{image.path}: too many unmatched page edges; scanning them unstitched "
                "(a secret straddling two far-apart pages may be missed)"
            )
            found += self._lonely_edges(image, tier, pending)
        return found

    def _lonely_edges(
        self, image: MemoryImage, tier: _Tier, pending: list[_EdgeSet]
    ) -> list[Finding]:
        """Edges with no guest neighbour: scan each against zeros (heads with zeros before
        them, tails with zeros after), all in one batch."""
        w = tier.edge
        tails, heads = pending
        pending[0], pending[1] = _EdgeSet.empty(w), _EdgeSet.empty(w)
        nh, nt = len(heads), len(tails)
        if nh + nt == 0:
            return []
        space = np.concatenate((heads.space, tails.space))
        addr = np.concatenate((heads.addr, tails.addr))
        src = np.concatenate((heads.src, tails.src))
        none_h, none_t = np.full(nh, -1), np.full(nt, -1)
        zeros = np.zeros(w, np.uint8)  # one row for all, broadcast: windows can be 8 KiB wide
        before = _EdgeSet(
            space,
            addr,
            np.concatenate((none_h, tails.fo)),
            src,
            _RowSource(np.broadcast_to(zeros, (nh, w)), tails.rows),
        )
        after = _EdgeSet(
            space,
            addr,
            np.concatenate((heads.fo, none_t)),
            src,
            _RowSource(heads.rows, np.broadcast_to(zeros, (nt, w))),
        )
        idx = np.arange(nh + nt)
        return self._scan_windows(image, tier, before, idx, after, idx)

    def _scan_windows(
        self,
        image: MemoryImage,
        tier: _Tier,
        tails: _EdgeSet,
        ti: np.ndarray,
        heads: _EdgeSet,
        hi: np.ndarray,
    ) -> list[Finding]:
        """Scan windows made of tail row ``ti[k]`` + head row ``hi[k]``, joined at the head's
        address; keep matches that touch the join (or whose context reaches across it).

        A batch's windows are narrowed to the guest bytes its rows hold next to the join
        (a 4 KiB page in a tier's 8 KiB rows): what lies beyond is absent memory, zeros in a
        full row and nothing in a narrowed one, which no detector tells apart."""
        found: list[Finding] = []
        for at in range(0, ti.size, EDGE_BATCH):
            tb, hb = ti[at : at + EDGE_BATCH], hi[at : at + EDGE_BATCH]
            w = min(tier.edge, -(-max(_held(tails.rows, tb), _held(heads.rows, hb)) // 8) * 8)
            if w == 0:
                continue
            # only windows where some detector of the tier could match across the middle,
            # judged on the narrow band around it when every detector allows that
            b = min(tier.band or w, w)
            e = tier.edge  # where the join lies in the stored rows
            test = np.concatenate(
                (_cols(tails.rows, tb, e - b, e), _cols(heads.rows, hb, 0, b)), axis=1
            )
            useful = np.zeros(test.shape[0], bool)
            for _, det in tier.detectors:
                useful |= det.may_touch(test)
            useful &= test.any(axis=1)  # nothing is found in zeros
            keep_rows = np.flatnonzero(useful)
            tb, hb = tb[keep_rows], hb[keep_rows]
            if b == w:
                flat = test[keep_rows].reshape(-1)
            else:
                flat = np.concatenate(
                    (_cols(tails.rows, tb, e - w, e), _cols(heads.rows, hb, 0, w)), axis=1
                ).reshape(-1)
            chunk = Chunk(flat)
            for _, det in tier.detectors:
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
                    base = r * 2 * w
                    f = self._finding(
                        image,
                        det,
                        flat,
                        int(h.start[k]),
                        int(h.length[k]),
                        int(h.encoding[k]),
                        0 if h.tag is None else int(h.tag[k]),
                        base,
                        base + 2 * w,
                        int(heads.space[hh]),
                        int(heads.addr[hh]) + x - w,
                        *self._sources[src],
                        fo if fo >= 0 else None,
                    )
                    if f:
                        found.append(f)
        return found


PAGE = 4096
#: zero bytes kept on each side of a squeezed-out zero run: more than any detector reads past
#: a match into zeros (an AES key schedule's crypto_aes_ctx tail, 484 - 240 bytes)
SQUEEZE_KEEP = 256
SQUEEZE_MIN = 8  # squeeze a chunk when at least 1 in this many of its pages is all zero


@dataclass
class _Squeezed:
    """A stretch of a buffer with its all-zero pages left out, but for SQUEEZE_KEEP zero bytes
    at each edge of every zero run: ``chunk`` holds the kept ranges back to back, range k
    (``length[k]`` bytes) at chunk offset ``qstart[k]`` and buffer offset ``bstart[k]``. Inside
    a range the bytes are the buffer's, and a detector reading past one sees zeros for at
    least 2 * SQUEEZE_KEEP bytes, as it would in the buffer; so what it finds within a range
    is what it would find unsqueezed, and nothing real spans two ranges (a zero page lies
    between)."""

    chunk: Chunk
    qstart: np.ndarray
    bstart: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, data: np.ndarray, a: int, b: int) -> _Squeezed | None:
        """``data[a:b]`` squeezed, or None when under 1 in SQUEEZE_MIN pages is zero."""
        p0, p1 = -(-a // PAGE) * PAGE, b // PAGE * PAGE
        if p1 - p0 < SQUEEZE_MIN * PAGE:
            return None
        zero = ~data[p0:p1].view(np.uint64).reshape(-1, PAGE // 8).any(axis=1)
        if np.count_nonzero(zero) * SQUEEZE_MIN < zero.size:
            return None
        edges = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        runs = np.concatenate(([0] if zero[0] else [], edges, [zero.size] if zero[-1] else []))
        out_lo = p0 + runs[0::2].astype(np.int64) * PAGE + SQUEEZE_KEEP  # left out: lo .. hi
        out_hi = p0 + runs[1::2].astype(np.int64) * PAGE - SQUEEZE_KEEP
        bstart = np.concatenate(([a], out_hi))
        length = np.concatenate((out_lo, [b])) - bstart
        qstart = np.concatenate(([0], np.cumsum(length)[:-1]))
        buf = np.concatenate([data[x : x + m] for x, m in zip(bstart.tolist(), length.tolist(),
                                                               strict=True)])
        return cls(Chunk(buf), qstart, bstart, length)

    def place(self, hits: Hits) -> Hits:
        """Hits in buffer offsets; those spanning two ranges (not real) left out."""
        k = np.searchsorted(self.qstart, hits.start, side="right") - 1
        inside = hits.start + hits.length <= self.qstart[k] + self.length[k]
        hits, k = hits.select(inside), k[inside]
        hits.start = self.bstart[k] + (hits.start - self.qstart[k])
        return hits


class _Releaser:
    """Gives back the pages of an mmapped buffer once scanned (``MADV_DONTNEED``: they stay
    in the page cache, but leave this process's resident set), so peak RSS does not grow
    with the image. Does nothing for buffers that are not an mmap."""

    def __init__(self, data: np.ndarray) -> None:
        self.mm: mmap.mmap | None = None
        self.touched: list[int] = []
        base, root = data, data
        while isinstance(base, np.ndarray):
            root, base = base, base.base
        if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
            self.mm = base.obj
            self.origin = data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
            self.done = self.origin - self.origin % mmap.PAGESIZE

    def around(self, offset: int) -> None:
        """Note that bytes at buffer offset ``offset`` were read: that mapped a whole
        neighbourhood (the kernel's fault-around, or a large folio). Every ``AROUND_BATCH``
        reads the span they cover is given back with one call; ``flush`` does the rest."""
        if self.mm is None:
            return
        self.touched.append(offset)
        if len(self.touched) >= AROUND_BATCH:
            self.flush()

    def flush(self) -> None:
        """Give back the neighbourhoods of the reads noted by ``around``."""
        if self.mm is None or not self.touched:
            return
        lo = max(self.origin + min(self.touched) - FAULT_REACH, 0)
        hi = min(self.origin + max(self.touched) + FAULT_REACH, len(self.mm))
        self.touched = []
        lo -= lo % mmap.PAGESIZE
        hi -= hi % mmap.PAGESIZE
        if hi > lo:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                self.mm = None

    def upto(self, offset: int) -> None:
        """Release the pages wholly before buffer offset ``offset``."""
        if self.mm is None:
            return
        end = self.origin + offset
        end -= end % mmap.PAGESIZE
        if end > self.done:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, self.done, end - self.done)
            except (OSError, ValueError):
                self.mm = None  # not supported here: keep going without
                return
            self.done = end


class _RowSource:
    """Rows from two sources (earlier pending copies, then this segment's lazy rows), fetched
    by index without concatenating them."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second = second
        self.n1 = first.shape[0]
        self.shape = (self.n1 + second.shape[0], first.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.first.nbytes + self.second.nbytes)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((idx.size, self.shape[1]), np.uint8)
        a = idx < self.n1
        if a.any():
            out[a] = self.first[idx[a]]
        if (~a).any():
            out[~a] = self.second[idx[~a] - self.n1]
        return out


class _LazyRows:
    """``w``-byte rows of a segment buffer at given offsets, of which only ``[lo, hi)`` are
    real guest bytes (an extent shorter than ``w``); fetched on demand through a
    sliding-window view (no copy until indexed). The rest of a row reads as zeros.
    ``stable``: the buffer stays valid while the image is open (not a reused window)."""

    def __init__(
        self, data: np.ndarray, starts: np.ndarray, valid: np.ndarray, w: int, stable: bool
    ) -> None:
        self.w = w
        self.starts = starts
        self.valid = valid
        self.stable = stable
        self.view = sliding_window_view(data, w) if data.size >= w else None
        self.data = data
        self.shape = (starts.size, w)

    @property
    def nbytes(self) -> int:
        """Memory held: the row table only when the buffer is stable."""
        return self.starts.nbytes * 3 if self.stable else self.shape[0] * self.shape[1]

    def take(self, idx: np.ndarray) -> _LazyRows:
        """Rows ``idx``, still lazy (only for a stable buffer: the rows are read later)."""
        return _LazyRows(self.data, self.starts[idx], self.valid[idx], self.w, self.stable)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.cols(idx, 0, self.w)

    def cols(self, idx: np.ndarray, a: int, b: int) -> np.ndarray:
        """Columns ``[a, b)`` of the rows ``idx``."""
        width = b - a
        st = self.starts[idx] + a
        lo = np.clip(self.valid[idx, 0] - a, 0, width)
        hi = np.clip(self.valid[idx, 1] - a, 0, width)
        full = (lo == 0) & (hi == width)
        if self.data.size >= width:
            view = self.view if width == self.w else sliding_window_view(self.data, width)
            if full.all():  # the usual case: every row whole, one gather
                return view[st]
        out = np.zeros((idx.size, width), np.uint8)
        if full.any() and self.data.size >= width:
            out[full] = view[st[full]]
        for k in np.flatnonzero(~full).tolist():  # short extents only: rare
            x, y = int(lo[k]), int(hi[k])
            out[k, x:y] = self.data[int(st[k]) + x : int(st[k]) + y]
        return out


def _keep_rows(rows: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` (ascending) of a row source, lazy where the buffer is stable."""
    if isinstance(rows, _RowSource):
        k = np.searchsorted(idx, rows.n1)
        a, b = _keep_rows(rows.first, idx[:k]), _keep_rows(rows.second, idx[k:] - rows.n1)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return np.concatenate((a, b))  # copies stay one flat array, segment after segment
        return _RowSource(a, b)
    if isinstance(rows, _LazyRows) and rows.stable:
        return rows.take(idx)
    return rows[idx]


def _held(rows: Any, idx: np.ndarray) -> int:
    """The most guest bytes any of rows ``idx`` holds next to the join (the rest of a row
    is absent memory, read as zeros)."""
    if idx.size == 0:
        return 0
    if isinstance(rows, _LazyRows):
        valid = rows.valid[idx]
        return int((valid[:, 1] - valid[:, 0]).max())
    if isinstance(rows, _RowSource):
        first = idx < rows.n1
        return max(_held(rows.first, idx[first]), _held(rows.second, idx[~first] - rows.n1))
    if rows.strides[0] == 0:  # the one shared row of zeros of lonely edges
        return 0
    return int(rows.shape[1])


def _cols(rows: Any, idx: np.ndarray, a: int, b: int) -> np.ndarray:
    """Columns ``[a, b)`` of rows ``idx`` of a row source (ndarray, _LazyRows or
    _RowSource), without building the whole rows."""
    if isinstance(rows, np.ndarray):
        return rows[idx, a:b]
    if isinstance(rows, _RowSource):
        out = np.empty((idx.size, b - a), np.uint8)
        first = idx < rows.n1
        if first.any():
            out[first] = _cols(rows.first, idx[first], a, b)
        if (~first).any():
            out[~first] = _cols(rows.second, idx[~first] - rows.n1, a, b)
        return out
    return rows.cols(idx, a, b)


def _edge_sets(seg: Segment, w: int, fid: int) -> tuple[_EdgeSet, _EdgeSet]:
    """(tails, heads) of a segment's extents: the ``w`` bytes before each extent's end and
    from its start. An extent shorter than ``w`` fills only part of its rows (zeros)."""
    ext = seg.extents
    lo, ln = ext.buf_offset, ext.length
    n = ln.size
    ids = np.full(n, fid, np.int64)
    t_valid = np.stack((np.maximum(0, w - ln), np.full(n, w)), axis=1)
    h_valid = np.stack((np.zeros(n, np.int64), np.minimum(ln, w)), axis=1)
    t_fo = np.where(ext.file_offset >= 0, ext.file_offset + ln, -1)
    stable = not seg.reused
    tails = _EdgeSet(
        ext.space, ext.addr + ln, t_fo, ids, _LazyRows(seg.data, lo + ln - w, t_valid, w, stable)
    )
    heads = _EdgeSet(
        ext.space, ext.addr, ext.file_offset, ids, _LazyRows(seg.data, lo, h_valid, w, stable)
    )
    return tails, heads


def _pair(
    tails: _EdgeSet, heads: _EdgeSet, sources: list[tuple[str, str | None]]
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (tail k, head k) of edges that meet: a tail ending where a head starts, in the
    same space and the same snapshot (bytes of two snapshots are never one guest's memory).
    Each head takes at most one tail (the last one stored) and vice versa."""
    if len(tails) == 0 or len(heads) == 0:
        z = np.zeros(0, np.int64)
        return z, z
    snaps = sorted({str(s) for _, s in sources})
    group = np.array([snaps.index(str(s)) for _, s in sources], np.int64)
    # spaces and snapshots are few; addresses < 2**48
    tk = (group[tails.src] * 256 + tails.space) * (1 << 48) + tails.addr
    hk = (group[heads.src] * 256 + heads.space) * (1 << 48) + heads.addr
    t_order = np.argsort(tk, kind="stable")
    tks = tk[t_order]
    # last tail with that key: searchsorted right - 1
    pos = np.searchsorted(tks, hk, side="right") - 1
    ok = (pos >= 0) & (tks[np.maximum(pos, 0)] == hk)
    hi = np.flatnonzero(ok)
    ti = t_order[pos[ok]]
    # a tail matched by several heads (duplicated pages): keep its last head only
    _, last = np.unique(ti[::-1], return_index=True)
    keep = np.sort(ti.size - 1 - last)
    return ti[keep], hi[keep]


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
