"""qcow2 disks holding internal snapshots with VM state (``savevm``, ``virsh snapshot-create``
internal): each snapshot's vmstate is a QEMU migration stream stored in the image's guest
address space just past the disk data, reached through the snapshot's own L1/L2 tables
(``docs/formats.md`` §7). The vmstate is read cluster by cluster (compressed clusters inflated)
and walked by :mod:`parsers.qemu` in bounded windows.

Every snapshot with VM state is scanned in turn, or only the one named by
``options["snapshot"]`` (its name or id). The file's other bytes (guest disk data, cluster
slack, unreferenced clusters, what follows the last cluster) are scanned as ``region:*`` at
their file offsets, and guest disk clusters stored compressed are inflated one at a time and
scanned as ``region:disk`` at their virtual-disk address (§7.5). All qcow2 integers are
big-endian.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from parsers import qemu
from parsers.base import (
    REGION_WINDOW,
    Coverage,
    Evidence,
    Extents,
    ImageError,
    MemoryImage,
    Remark,
    Segment,
)

FORMATS = ["qcow2-snapshot"]

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(
    ">4s"  # magic
    "I"  # version, 2 or 3
    "Q"  # backing_file_offset
    "I"  # backing_file_size
    "I"  # cluster_bits
    "Q"  # size: virtual disk size, bytes
    "I"  # crypt_method: 0 none, 1 AES, 2 LUKS
    "I"  # l1_size (active table), entries
    "Q"  # l1_table_offset (active)
    "Q"  # refcount_table_offset
    "I"  # refcount_table_clusters
    "I"  # nb_snapshots
    "Q"  # snapshots_offset
)
HEADER_V3 = struct.Struct(
    ">Q"  # incompatible_features
    "Q"  # compatible_features
    "Q"  # autoclear_features
    "I"  # refcount_order
    "I"  # header_length
)
V3_AT = HEADER.size  # 0x48
COMPRESSION_TYPE_AT = 0x68  # u8, present when header_length > 0x68
SNAPSHOT = struct.Struct(
    ">Q"  # l1_table_offset of this snapshot
    "I"  # l1_size, entries
    "H"  # id_str_size
    "H"  # name_size
    "I"  # date_sec
    "I"  # date_nsec
    "Q"  # vm_clock_nsec
    "I"  # vm_state_size (32-bit; the extra data's 64-bit field wins)
    "I"  # extra_data_size
)
EXTRA_VMSTATE = struct.Struct(">Q")  # extra data bytes 0-7: 64-bit vm_state_size
EXTRA_DISK = struct.Struct(">Q")  # extra data bytes 8-15: disk size at snapshot time
INCOMPAT_DATA_FILE = 1 << 2  # guest data in an external file
INCOMPAT_EXTENDED_L2 = 1 << 4  # 16-byte L2 entries with subcluster bitmaps
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: L2 table offset
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: host cluster offset
L2_COMPRESSED = 1 << 62
L2_ZERO = 1  # bit 0: reads as zeros (v3)
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
READ_RUN = 1 << 20  # vmstate bytes handed to the walker per read
SUBCLUSTERS = 32
REFCOUNT_OFFSET_MASK = ~0x1FF  # refcount table entry: bits 9-63 the refcount block offset
# what a file cluster holds, for the regions (docs/formats.md §7.5); where hostile tables make
# two claim one cluster the higher code wins, so each byte is counted once
UNREFERENCED, DISK, OTHER_STATE, SLACK, STRUCTURE = range(5)
KINDS = {DISK: "disk", OTHER_STATE: "vmstate", SLACK: "slack", STRUCTURE: "structure"}
MAX_MAP_CLUSTERS = 1 << 27  # a file of more clusters is not mapped (one code byte each)
MAX_TABLE_READS = 1 << 20  # L2 tables read to map the file (a hostile L1 may repeat one)
MAX_PACKED = 1 << 22  # compressed disk clusters listed for inflating (24 bytes each)
#: inflated bytes allowed per file byte: deflate's own limit (a 258-byte match per ~2 bits),
#: so only a hostile table (one compressed cluster named by many L2 entries) can exceed it
MAX_RATIO = 1032
MAX_CORRUPT_SHOWN = 8  # corrupt compressed disk clusters reported one by one


def probe(head: bytes, path: str) -> str | None:
    """A qcow2 image is ours only when it has snapshots (else it is a disk, not memory)."""
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        return None
    return "qcow2-snapshot" if HEADER.unpack_from(head)[11] > 0 else None


class Qcow2:
    """The header, snapshot table and cluster translation of one qcow2 file."""

    def __init__(self, ev: Evidence) -> None:
        self.ev = ev
        path = ev.path
        (magic, version, _, _, cbits, size, crypt, l1_size, l1_off, rc_off, rc_clusters, nsnap,
         snap_off) = HEADER.unpack(ev.need(0, HEADER.size, "qcow2 header"))
        if magic != MAGIC or version not in (2, 3):
            raise ImageError(path, 0, f"not a qcow2 image of version 2 or 3 ({version})")
        if not 9 <= cbits <= 21:
            raise ImageError(path, 0x14, f"cluster_bits {cbits} out of range")
        if crypt:
            raise ImageError(path, 0x20, "encrypted qcow2: the VM state is encrypted too")
        self.version, self.cluster_bits, self.size = version, cbits, size
        self.cluster_size = 1 << cbits
        self.incompat = 0
        self.compression = "deflate"
        self.header_length = HEADER.size  # v2: the fixed fields only
        self.active_l1 = (l1_off, l1_size)
        self.refcount_table = (rc_off, rc_clusters)
        if version == 3:
            incompat, _, _, _, hlen = HEADER_V3.unpack(ev.need(V3_AT, HEADER_V3.size, "v3 header"))
            self.incompat = incompat
            self.header_length = hlen
            if incompat & INCOMPAT_DATA_FILE:
                raise ImageError(path, V3_AT, "qcow2 with an external data file is not supported")
            if hlen > COMPRESSION_TYPE_AT and ev.need(COMPRESSION_TYPE_AT, 1, "compression")[0]:
                self.compression = "zstd"
        self.extended = bool(self.incompat & INCOMPAT_EXTENDED_L2)
        self.l2_entry = 16 if self.extended else 8
        self.l2_bits = cbits - (4 if self.extended else 3)
        if nsnap > MAX_SNAPSHOTS:
            raise ImageError(path, 0x3C, f"{nsnap} snapshots announced")
        self.snapshots_span = (snap_off, snap_off)  # file bytes of the snapshot table
        self.snapshots = self._snapshot_table(snap_off, nsnap)
        self.read_end = 0  # furthest file offset a cluster was read up to (bytes)

    def _snapshot_table(self, offset: int, count: int) -> list[dict[str, Any]]:
        out = []
        pos = offset
        for _ in range(count):
            (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vm32, extra_len) = (
                SNAPSHOT.unpack(self.ev.need(pos, SNAPSHOT.size, "snapshot header"))
            )
            extra = self.ev.need(pos + SNAPSHOT.size, extra_len, "snapshot extra data")
            vmstate = EXTRA_VMSTATE.unpack_from(extra)[0] if extra_len >= 8 else vm32
            disk = EXTRA_DISK.unpack_from(extra, 8)[0] if extra_len >= 16 else self.size
            strings = pos + SNAPSHOT.size + extra_len
            ident = self.ev.need(strings, id_len, "snapshot id").decode("utf-8", "replace")
            name = self.ev.need(strings + id_len, name_len, "snapshot name")
            out.append({
                "id": ident, "name": name.decode("utf-8", "replace"), "date": sec,
                "vm_clock_ns": clock, "vm_state_size": vmstate, "disk_size": disk,
                "l1_offset": l1_off, "l1_size": l1_size, "table_offset": pos,
            })
            pos = (strings + id_len + name_len + 7) // 8 * 8
        self.snapshots_span = (offset, pos)
        return out

    def vmstate_offset(self, snap: dict[str, Any]) -> int:
        """Guest offset of the vmstate: the first L1 entry past the disk data (bytes)."""
        span = 1 << (self.cluster_bits + self.l2_bits)
        return (snap["disk_size"] + span - 1) // span * span

    def cluster(self, snap: dict[str, Any], guest: int) -> bytes:
        """The cluster at guest offset ``guest`` (cluster aligned) as the snapshot saw it."""
        ev, cs = self.ev, self.cluster_size
        l1_index = guest >> (self.cluster_bits + self.l2_bits)
        if l1_index >= snap["l1_size"]:
            raise ImageError(ev.path, snap["table_offset"], "vmstate runs past the snapshot's L1")
        at = snap["l1_offset"] + 8 * l1_index
        l2_off = struct.unpack(">Q", ev.need(at, 8, "L1 entry"))[0] & L1_OFFSET_MASK
        if l2_off == 0:
            return bytes(cs)
        l2_index = (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        at = l2_off + self.l2_entry * l2_index
        entry, bitmap = struct.unpack(">QQ", ev.need(at, 16, "L2 entry")) if self.extended else (
            struct.unpack(">Q", ev.need(at, 8, "L2 entry"))[0], None
        )
        if entry & L2_COMPRESSED:
            return self._compressed(entry, at)
        host = entry & L2_OFFSET_MASK
        if host == 0 or (entry & L2_ZERO and not self.extended):
            return bytes(cs)
        data = ev.need(host, cs, "data cluster")
        self.read_end = max(self.read_end, host + cs)
        if bitmap is None or bitmap & 0xFFFFFFFF == 0xFFFFFFFF:
            return data
        sub = cs // SUBCLUSTERS
        out = bytearray(cs)  # unallocated or zero subclusters read as zeros
        for i in range(SUBCLUSTERS):
            if bitmap >> i & 1 and not bitmap >> (32 + i) & 1:
                out[i * sub : (i + 1) * sub] = data[i * sub : (i + 1) * sub]
        return bytes(out)

    def _compressed(self, entry: int, at: int) -> bytes:
        x = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = (entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)
        end = min((host // 512 + sectors + 1) * 512, self.ev.size)
        if host >= end:
            raise ImageError(self.ev.path, at, "compressed cluster outside the file")
        raw = self.ev.read(host, end - host)
        self.read_end = max(self.read_end, end)
        try:
            if self.compression == "zstd":
                out = _zstd_cluster(raw, self.cluster_size, self.ev.path, host)
            else:
                out = zlib.decompressobj(wbits=-15).decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise ImageError(self.ev.path, host, f"compressed cluster corrupt: {exc}") from None
        if len(out) != self.cluster_size:
            raise ImageError(self.ev.path, host, "compressed cluster is not one cluster long")
        return out


def _zstd_frame_len(raw: bytes) -> int:
    """Bytes of the zstd frame at the start of ``raw`` (a compressed cluster is followed by
    sector padding that a one-shot decoder refuses). RFC 8878 section 3.1.1; 0 if malformed."""
    if len(raw) < 6 or raw[:4] != b"\x28\xb5\x2f\xfd":
        return 0
    fhd = raw[4]
    single = fhd >> 5 & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
    while pos + 3 <= len(raw):
        head = int.from_bytes(raw[pos : pos + 3], "little")
        kind, size = head >> 1 & 3, head >> 3
        if kind == 3:
            return 0
        pos += 3 + (1 if kind == 1 else size)
        if head & 1:
            return pos + 4 * (fhd >> 2 & 1)
    return 0


def _zstd_cluster(raw: bytes, size: int, path: str, at: int) -> bytes:
    """One zstd-compressed cluster, decoded into a buffer of exactly one cluster."""
    try:
        import cramjam
    except ImportError:
        msg = "zstd-compressed cluster needs the python package 'cramjam' (pip install cramjam)"
        raise ImageError(path, at, msg) from None
    end = _zstd_frame_len(raw)
    if not 0 < end <= len(raw):
        raise ImageError(path, at, "compressed cluster is not a zstd frame")
    out = bytearray(size)
    try:
        n = cramjam.zstd.decompress_into(raw[:end], out)
    except cramjam.DecompressionError as exc:
        raise ImageError(path, at, f"compressed cluster corrupt: {exc}") from None
    return bytes(out[:n])


class _FileMap:
    """Which bytes of a qcow2 file are which (docs/formats.md §7.5), one code per cluster plus
    the cut where a partly used cluster's structure ends and its slack begins."""

    def __init__(self, img: Qcow2, scanned: list[dict[str, Any]]) -> None:
        self.img, self.ev, self.cb, self.cs = img, img.ev, img.cluster_bits, img.cluster_size
        self.code = np.zeros(-(-self.ev.size // self.cs), np.uint8)
        self.tails: dict[int, tuple[int, str]] = {}  # cluster -> (cut, kind of the rest)
        #: compressed disk clusters: arrays of (L2 entry, guest offset, L2 entry file offset)
        self.packed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.npacked = 0  # entries in ``packed``
        self.unlisted = 0  # compressed disk clusters past MAX_PACKED, not inflated
        self.reads = 0
        self.seen: set[tuple[int, int, int, int]] = set()
        self.scanned = {id(s) for s in scanned}

    def claim(self, first: int, end: int, what: int, tail: str | None = None) -> None:
        """File bytes [first, end) hold ``what`` (whole clusters); the rest of a partly used
        last cluster is ``tail``."""
        lo, hi = max(first, 0) >> self.cb, min(-(-end // self.cs), self.code.size)
        if lo < hi:
            self.code[lo:hi] = np.maximum(self.code[lo:hi], what)
        if tail and end % self.cs and end >> self.cb < self.code.size:
            self.tails.setdefault(end >> self.cb, (end, tail))

    def build(self) -> None:
        img, ev = self.img, self.ev
        self.claim(0, img.header_length, STRUCTURE, "header")  # extensions, backing file name
        rc_off, rc_clusters = img.refcount_table
        self.claim(rc_off, rc_off + rc_clusters * self.cs, STRUCTURE)
        table = np.frombuffer(ev.need(rc_off, rc_clusters * self.cs, "refcount table"), ">u8")
        blocks = (table[table != 0] & np.uint64(REFCOUNT_OFFSET_MASK & (2**64 - 1))) >> self.cb
        np.maximum.at(self.code, blocks[blocks < self.code.size].astype(np.int64), STRUCTURE)
        self.claim(*img.snapshots_span, STRUCTURE, "slack")
        self._l1(*img.active_l1, None)
        for snap in img.snapshots:
            self._l1(snap["l1_offset"], snap["l1_size"], snap)

    def _l1(self, offset: int, size: int, snap: dict[str, Any] | None) -> None:
        self.claim(offset, offset + 8 * size, STRUCTURE, "slack")
        l1 = np.frombuffer(self.ev.need(offset, 8 * size, "L1 table"), ">u8")
        span = self.cb + self.img.l2_bits
        for i in np.flatnonzero(l1 & np.uint64(L1_OFFSET_MASK)).tolist():
            l2 = int(l1[i]) & L1_OFFSET_MASK
            self.claim(l2, l2 + self.cs, STRUCTURE)
            self._l2(l2, i << span, snap)

    def _l2(self, l2: int, base: int, snap: dict[str, Any] | None) -> None:
        """Classify the data clusters of the L2 table at ``l2`` mapping guest offset ``base``
        on: the vmstate of a scanned snapshot (structure: its content is scanned as the
        stream), of another snapshot (``vmstate``), else the guest's disk (``disk``)."""
        img = self.img
        start, end, owner = 2**64 - 1, 2**64 - 1, DISK  # the active table: disk only
        if snap is not None:
            start = img.vmstate_offset(snap)
            end = start + snap["vm_state_size"]
            owner = STRUCTURE if id(snap) in self.scanned else OTHER_STATE
        key = (l2, base, start, end)
        if key in self.seen:
            return
        self.seen.add(key)
        self.reads += 1
        if self.reads > MAX_TABLE_READS:
            raise ImageError(self.ev.path, l2, f"more than {MAX_TABLE_READS} L2 tables to map")
        raw = np.frombuffer(self.ev.need(l2, self.cs, "L2 table"), ">u8")
        entries = raw[:: img.l2_entry // 8]
        guest = base + (np.arange(entries.size, dtype=np.uint64) << np.uint64(self.cb))
        state = guest >= np.uint64(start)
        packed = (entries & np.uint64(L2_COMPRESSED)) != 0
        host = (entries & np.uint64(L2_OFFSET_MASK)) >> np.uint64(self.cb)
        plain = ~packed & (host != 0) & (host < self.code.size)
        past = guest >= np.uint64(end)
        for what, pick in ((DISK, plain & ~state), (owner, plain & state & ~past),
                           (SLACK, plain & state & past)):
            np.maximum.at(self.code, host[pick].astype(np.int64), what)
        last = np.flatnonzero(plain & state & ~past & (guest + np.uint64(self.cs) > end))
        for j in last.tolist():  # the cluster holding the vmstate's last byte
            cut = (int(host[j]) << self.cb) + end - int(guest[j])
            self.tails.setdefault(int(host[j]), (cut, "slack"))
        x = 62 - (self.cb - 8)
        for j in np.flatnonzero(packed).tolist():
            e = int(entries[j])
            first = e & ((1 << x) - 1)
            stop = (first // 512 + ((e >> x) & ((1 << (self.cb - 8)) - 1)) + 1) * 512
            self.claim(first, stop, STRUCTURE)  # the content is scanned decompressed
        disk = np.flatnonzero(packed & ~state)
        room = MAX_PACKED - self.npacked
        self.unlisted += max(0, disk.size - room)
        disk = disk[:room]
        if disk.size:
            at = np.uint64(l2) + disk.astype(np.uint64) * np.uint64(img.l2_entry)
            self.packed.append((entries[disk], guest[disk], at))
            self.npacked += disk.size

    def pieces(self) -> list[tuple[str, int, int]]:
        """The file as (kind, first, end) byte ranges, ``structure`` included, in order."""
        code, cs, size = self.code, self.cs, self.ev.size
        used = np.flatnonzero(code)
        last = int(used[-1]) + 1 if used.size else 0
        cuts = set((np.flatnonzero(np.diff(code)) + 1).tolist()) | {0, code.size, last}
        cuts |= {c for c in self.tails if code[c] == STRUCTURE}
        cuts |= {c + 1 for c in self.tails if code[c] == STRUCTURE}
        out: list[tuple[str, int, int]] = []
        edges = sorted(cuts)
        for c0, c1 in zip(edges[:-1], edges[1:], strict=True):
            what = int(code[c0])
            kind = KINDS.get(what) or ("unreferenced" if c0 < last else "trailing")
            parts = [(kind, c0 * cs, c1 * cs)]
            if what == STRUCTURE and c0 in self.tails:
                cut, rest = self.tails[c0]
                parts = [(kind, c0 * cs, cut), (rest, cut, c1 * cs)]
            for k, a, b in parts:
                a, b = min(a, size), min(b, size)
                if b <= a:
                    continue
                if out and out[-1][0] == k and out[-1][2] == a:
                    out[-1] = (k, out[-1][1], b)
                else:
                    out.append((k, a, b))
        return out


def _file_regions(img: Qcow2, scanned: list[dict[str, Any]], image: MemoryImage
                  ) -> Iterator[Segment]:
    """The file's bytes that are neither structure nor the scanned snapshots' VM state (whose
    content is scanned as a stream, so its clusters count as structure like a compressed
    payload) as ``region:*`` segments at their file offsets; the rest counted as structure."""
    ev, path = img.ev, img.ev.path
    notes: list[ImageError] = []
    fmap = _FileMap(img, scanned)
    if fmap.code.size > MAX_MAP_CLUSTERS:
        notes.append(Remark(path, None, f"{fmap.code.size} clusters: the bytes outside the VM "
                            "state (disk data, slack, unreferenced clusters) are not scanned"))
        regions: list[tuple[str, int, int]] = []
    else:
        try:
            fmap.build()
        except ImageError as exc:  # what was mapped before is still scanned
            notes.append(exc)
        regions = [p for p in fmap.pieces() if p[0] != "structure"]
    known = {str(w) for w in image.warnings}
    image.warnings += [n for n in notes if str(n) not in known]
    yield from image.region_segments(ev, regions)
    image.coverage.structure += ev.size - sum(b - a for _, a, b in regions)
    yield from _packed_disk(img, fmap, image)


def _packed_disk(img: Qcow2, fmap: _FileMap, image: MemoryImage) -> Iterator[Segment]:
    """The guest disk clusters stored compressed, each inflated into exactly one cluster, as
    ``region:disk`` extents addressed by the cluster's virtual-disk offset (no file offset;
    the stream offset of contract 1), in virtual-disk order so neighbours stitch. They are
    gathered into one reused window of at most REGION_WINDOW bytes. A cluster named by several
    tables is inflated once; a corrupt one is an error at its file offset, the rest still
    scanned; inflating more than MAX_RATIO times the file's size stops with an error."""
    path, cs = img.ev.path, img.cluster_size
    problems: list[ImageError] = []
    if fmap.unlisted:
        problems.append(ImageError(path, None, f"{fmap.unlisted} compressed disk clusters past "
                                   f"the first {MAX_PACKED} are not decompressed"))
    if fmap.packed:
        entries, guests, ats = (np.concatenate(a) for a in zip(*fmap.packed, strict=True))
        _, once = np.unique(entries & np.uint64(2**62 - 1),
                            return_index=True)
        order = once[np.lexsort((entries[once], guests[once]))]
        budget = max(MAX_RATIO * img.ev.size // cs, 1)
        if order.size > budget:
            problems.append(ImageError(path, None, f"{order.size - budget} compressed disk "
                                       f"clusters not decompressed: more than {MAX_RATIO} times "
                                       "the file's size (a hostile table repeats clusters)"))
            order = order[:budget]
        window = np.empty(max(cs, REGION_WINDOW // cs * cs), np.uint8)
        bad: list[ImageError] = []
        held: list[int] = []  # guest offsets of the clusters in ``window``
        for k in order.tolist():
            guest = int(guests[k])
            if len(held) * cs == window.size or (held and held[-1] == guest):
                yield _disk_window(image, window, held, cs, path)
                held = []
            try:
                data = img._compressed(int(entries[k]), int(ats[k]))
            except ImageError as exc:
                bad.append(exc)
                continue
            window[len(held) * cs : (len(held) + 1) * cs] = np.frombuffer(data, np.uint8)
            held.append(guest)
        if held:
            yield _disk_window(image, window, held, cs, path)
        problems += bad[:MAX_CORRUPT_SHOWN]
        if len(bad) > MAX_CORRUPT_SHOWN:
            problems.append(ImageError(path, None, f"{len(bad) - MAX_CORRUPT_SHOWN} more "
                                       "corrupt compressed disk clusters (not scanned)"))
    image.warnings += problems


def _disk_window(image: MemoryImage, window: np.ndarray, held: list[int], cs: int, path: str
                 ) -> Segment:
    """The first ``len(held)`` clusters (``cs`` bytes each) of ``window`` as a segment of
    ``region:disk`` at virtual-disk offsets ``held``; counted in ``coverage.outside``."""
    n = len(held)
    image.coverage.outside += n * cs
    space = image.region_space("disk", decoded=True)
    ext = Extents.build(np.arange(n) * cs, held, np.full(n, cs), None, space)
    return Segment(window[: n * cs], ext, path, reused=True)


class _VmstateReader:
    """The vmstate bytes of one snapshot as a :class:`qemu.StreamSource`."""

    def __init__(self, img: Qcow2, snap: dict[str, Any]) -> None:
        self.img, self.snap = img, snap
        self.start = img.vmstate_offset(snap)
        self.pos = 0  # bytes of vmstate delivered
        self.problem: ImageError | None = None
        self.released = 0  # file offset below which the mapped clusters were given back

    def fail(self, offset: int, message: str) -> ImageError:
        where = f"snapshot {self.snap['name']!r} vmstate offset {offset:#x}"
        return ImageError(self.img.ev.path, self.snap["table_offset"], f"{where}: {message}")

    def read(self, n: int) -> bytes:
        cs = self.img.cluster_size
        out = []
        got = 0
        want = min(n, READ_RUN, self.snap["vm_state_size"] - self.pos)
        while got < want and self.problem is None:
            guest = self.start + self.pos + got
            base = guest - guest % cs
            try:
                data = self.img.cluster(self.snap, base)
            except ImageError as exc:
                self.problem = exc
                break
            piece = data[guest - base : guest - base + want - got]
            out.append(piece)
            got += len(piece)
        self.pos += got
        self._release()
        return b"".join(out)

    def _release(self) -> None:
        """Give back the mapped file pages read so far (the clusters were copied out): the
        vmstate lies in the file in increasing order, as savevm appended it, so without this
        the whole of it would stay resident while it is walked. The last cluster read is kept:
        a read ends inside it, and the next one reads its rest (given back then, its pages
        would be mapped again and stay)."""
        ev, end = self.img.ev, self.img.read_end - self.img.cluster_size
        if end > self.released:
            ev.release(self.released, end - self.released)
            self.released = end

    def close(self) -> None:
        return None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """List the snapshots and stream the vmstate of each selected one."""
    with Evidence(path).closed_on_error() as ev:
        image = MemoryImage(path=path, format="qcow2-snapshot", files=[path], closers=[ev.close])
        img = Qcow2(ev)
        chosen = _select(img, options.get("snapshot"), path)
        first = _VmstateReader(img, chosen[0])
        prefix = first.read(qemu.PEEK)
        walker = qemu.peek_meta(prefix, first.fail, options.get("machine"), options)
    walker.assign_spaces(image)
    image.meta.update(walker.meta())
    image.meta.update(
        compression=f"qcow2 v{img.version} ({img.compression} clusters)",
        snapshots=[{k: s[k] for k in ("id", "name", "date", "vm_clock_ns", "vm_state_size")}
                   for s in img.snapshots],
        snapshot=options.get("snapshot") or "all",
        scanned_snapshots=[s["name"] for s in chosen],
    )

    def limit(mem_total: int) -> int:
        return 2 * mem_total + qemu.WINDOW + (64 << 20)

    def stream() -> Iterator[Segment]:
        image.coverage = Coverage()
        yield from _file_regions(img, chosen, image)
        try:
            for snap in chosen:
                for seg in qemu.stream_segments(
                    _VmstateReader(img, snap), image, options.get("machine"), options, limit
                ):
                    seg.snapshot = snap["name"]
                    yield seg
        except ImageError:
            image.check_coverage()
            raise
        image.check_coverage()

    image.stream = stream
    return image


def _select(img: Qcow2, wanted: str | None, path: str) -> list[dict[str, Any]]:
    with_state = [s for s in img.snapshots if s["vm_state_size"] > 0]
    if wanted:
        chosen = [s for s in img.snapshots if wanted in (s["name"], s["id"])]
        if not chosen:
            names = ", ".join(repr(s["name"]) for s in img.snapshots) or "none"
            raise ImageError(path, None, f"no snapshot {wanted!r} (snapshots: {names})")
        if chosen[0]["vm_state_size"] == 0:
            raise ImageError(path, None, f"snapshot {wanted!r} is disk-only (no VM state)")
        return chosen[:1]
    if not with_state:
        raise ImageError(path, None, "no snapshot with VM state (all are disk-only)")
    return with_state
