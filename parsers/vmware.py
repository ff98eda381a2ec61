"""VMware checkpoints (``.vmss`` suspend state, ``.vmsn`` snapshot state) and their memory
(a companion ``.vmem`` file, or a ``Memory`` block embedded in the checkpoint).

Byte layout (``docs/formats.md`` §10 and §13; sources: crash ``vmware_vmss.[ch]``, written by
VMware; volatility 2/3 ``vmware.py``; LeechCore ``device_file.c``), all little-endian:

- a 12-byte header (magic, version, number of groups), then a table of 80-byte group entries
  (name, file offset of the group's first tag, group size in bytes);
- each group is a list of tags ended by a zero u16. A tag is one byte ``nindx << 6 | valsize``,
  one byte name length, the name, ``nindx`` u32 indices, then the value: ``valsize`` bytes
  (1..61), or for ``valsize`` 63 (62: compressed) a *block*: on-disk size, in-memory size (u32
  each for the 32-bit/"version 0" magics, u64 otherwise), u16 ``padsize``, that many padding
  bytes, then the data;
- the ``memory`` group's regions (``regionsCount``, ``regionPPN[i]``, ``regionPageNum[i]``,
  ``regionSize[i]``, all in 4 KiB pages) map guest-physical pages to pages of the memory data:
  GPA ``[PPN*4096, (PPN+Size)*4096)`` is at data offset ``PageNum*4096``. The memory data is the
  ``.vmem`` file, or the data of the ``Memory`` block when it is embedded. No regions means
  flat memory (GPA == data offset).

Only headers and tags are read; memory-sized blocks are located, never loaded. The image is
one mmapped segment of the file holding the memory, with one extent per region.

Pairing follows VMware's naming: ``<stem>.vmss`` / ``<stem>.vmsn`` go with ``<stem>.vmem``
(snapshots are ``<vm>-Snapshot<N>.vmsn`` + ``<vm>-Snapshot<N>.vmem``, the same rule); beside a
``.vmem`` the ``.vmss`` is preferred to the ``.vmsn``, as crash, volatility3 and LeechCore do.
The VM's ``.vmx`` (``displayName``, ``uuid.bios``) supplies guest metadata when found.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parsers.base import (
    Evidence,
    Extents,
    ImageError,
    MemoryImage,
    Remark,
    Segment,
    file_regions,
    printable,
)

FORMATS = ["vmware-vmss", "vmware-vmsn", "vmware-vmem"]

PAGE = 4096

# Checkpoint header (crash vmware_vmss.h ``struct cptdumpheader``):
HEADER = struct.Struct(
    "<I"  # magic, table MAGICS
    "I"  # version (meaning not documented; reported as-is)
    "I"  # numgroups: entries in the group table that follows
)
# Group table entry (crash ``struct cptgroupdesc``):
GROUP = struct.Struct(
    "<64s"  # name, NUL-padded ("Checkpoint", "memory", "cpu", "MKSVMX", device groups ...)
    "Q"  # position: file offset of the group's first tag
    "Q"  # size: bytes of the group (tags and block data)
)
# Tag head: byte 0 = nindx << 6 | valsize, byte 1 = name length (crash TAG_* macros).
TAG_HEAD = struct.Struct("<BB")
INDEX = 4  # each index is a u32
VALSIZE_COMPRESSED_BLOCK = 62  # crash TAG_ISBLOCK_COMPRESSED
VALSIZE_BLOCK = 63  # crash TAG_ISBLOCK
# Block head after the indices, by size-field width (crash: u64 sizes; volatility 2/3 and
# vmsnparser: u32 sizes for "version 0" files):
BLOCK_HEAD = {
    8: struct.Struct("<QQH"),  # nbytes on disk, nbytes in memory, padsize
    4: struct.Struct("<IIH"),  # the same with 32-bit sizes
}

# Every magic any reader accepts (docs/formats.md §10.1 and §13) -> (name, block size-field width).
# Width 4 for the two "version 0" magics (volatility and Rekall use ``magic & 0xF == 0``).
MAGICS: dict[int, tuple[str, int]] = {
    0xBED2BED2: ("current", 8),  # crash CPTDUMP_MAGIC_NUMBER; all readers
    0xBED3BED3: ("partial", 8),  # crash CPTDUMP_PARTIAL_MAGIC_NUMBER; all readers
    0xBAD1BAD1: ("restored", 8),  # crash CPTDUMP_RESTORED_MAGIC_NUMBER; all readers
    0xBAD2BAD2: ("norestore", 8),  # crash CPTDUMP_NORESTORE_MAGIC_NUMBER; crash only
    0xBED1BED1: ("restored", 8),  # what Joyent's vmss-nmi.c writes for "restored"
    0xBED0BED0: ("old 32-bit", 4),  # crash CPTDUMP_OLD_MAGIC_NUMBER (crash refuses it)
    0xBED2BED0: ("version 0", 4),  # volatility 2/3, Rekall, vmsnparser
}

CHECKPOINT_EXTS = (".vmss", ".vmsn")
MEMORY_EXT = ".vmem"
VMX_EXT = ".vmx"

# Where a VMware snapshot keeps its screenshot: group "MKSVMX", tag "imageData", a PNG
# (volatility 2 ``volatility/plugins/vmwareinfo.py`` writes exactly that tag out as
# screenshot.png). Other MKS* groups are reported too, as screen-state groups.
SCREENSHOT_GROUP = "MKSVMX"
SCREENSHOT_TAG = "imageData"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# LeechCore device_file.c: on ARM64 guests (Checkpoint/Platform == 3, VMware Fusion on
# Apple silicon) without region tags the memory file starts at GPA 0x80000000.
PLATFORM_ARM64 = 3
ARM64_RAM_BASE = 0x80000000

MAX_GROUPS = 1 << 16  # group table entries read: real checkpoints have a few hundred at most
MAX_TAGS = 1 << 21  # total tags walked per checkpoint: real files hold far fewer
MAX_REGIONS = 1024  # regions used: crash keeps 3, LeechCore 64; more is a hostile table
MAX_WARNINGS_PER_KIND = 8  # then one summary line, so a hostile table cannot flood output
VMX_MAX_BYTES = 1 << 20  # a .vmx is a few KiB of text


@dataclass
class Tag:
    """One tag: ``offset`` is the file offset of its head; ``value`` the little-endian integer
    of a 1..8-byte value (None otherwise); a block has ``data_offset`` (file offset of its data,
    after the padding), ``data_size`` (bytes on disk) and ``mem_size`` (bytes in memory)."""

    name: str
    indices: tuple[int, ...]
    offset: int
    valsize: int
    value: int | None = None
    data_offset: int = -1
    data_size: int = 0
    mem_size: int = 0

    @property
    def is_block(self) -> bool:
        return self.valsize in (VALSIZE_BLOCK, VALSIZE_COMPRESSED_BLOCK)

    @property
    def compressed(self) -> bool:
        return self.valsize == VALSIZE_COMPRESSED_BLOCK

    def label(self) -> str:
        return self.name + "".join(f"[{i}]" for i in self.indices)


@dataclass
class Group:
    name: str
    position: int  # file offset of the first tag
    size: int  # bytes, as the table says
    entry_offset: int  # file offset of the table entry
    tags: int = 0  # tags walked
    complete: bool = False  # the end marker was reached


@dataclass
class Checkpoint:
    """What a checkpoint file says (headers and tags only; no memory is read)."""

    path: str
    size: int
    magic: int
    magic_name: str
    width: int  # bytes of a block size field, 4 or 8
    version: int
    groups: list[Group] = field(default_factory=list)
    memory_tags: list[Tag] = field(default_factory=list)
    checkpoint_tags: dict[str, int] = field(default_factory=dict)  # Checkpoint group ints
    screen: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[ImageError] = field(default_factory=list)

    def memory_block(self) -> Tag | None:
        """The embedded ``Memory`` block (``Memory[0][0]`` preferred), if any."""
        blocks = [t for t in self.memory_tags if t.name == "Memory" and t.is_block]
        for t in blocks:
            if t.indices in ((0, 0), (0,), ()):
                return t
        return blocks[0] if blocks else None


class _Warnings:
    """Collects warnings, at most MAX_WARNINGS_PER_KIND per kind, then one summary each."""

    def __init__(self, sink: list[ImageError]) -> None:
        self.sink = sink
        self.counts: dict[str, int] = {}

    def add(self, kind: str, err: ImageError) -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= MAX_WARNINGS_PER_KIND:
            self.sink.append(err)

    def close(self, path: str) -> None:
        for kind, n in self.counts.items():
            if n > MAX_WARNINGS_PER_KIND:
                more = n - MAX_WARNINGS_PER_KIND
                self.sink.append(ImageError(path, None, f"{more} more warnings like: {kind}"))


# ---------------------------------------------------------------------------------------------
# Checkpoint parsing


def read_magic(path: str) -> int | None:
    """The checkpoint magic of ``path`` if its first 4 bytes carry one, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    if len(head) < 4:
        return None
    magic = int.from_bytes(head, "little")
    return magic if magic in MAGICS else None


def read_checkpoint(path: str, ev: Evidence | None = None) -> Checkpoint:
    """Parse the header, group table and tags of the checkpoint ``path``.

    Reads tags lazily from the mmap: block data (the embedded memory, the screenshot) is only
    located. Fatal problems (no magic, no room for the header) raise ImageError; damaged
    groups and tags become warnings on the returned Checkpoint.
    """
    own = ev is None
    ev = ev or Evidence(path)
    try:
        magic, version, numgroups = HEADER.unpack(ev.need(0, HEADER.size, "checkpoint header"))
        if magic not in MAGICS:
            raise ImageError(path, 0, f"not a VMware checkpoint (magic {magic:#010x})")
        name, width = MAGICS[magic]
        ck = Checkpoint(path, ev.size, magic, name, width, version)
        warn = _Warnings(ck.warnings)
        fits = (ev.size - HEADER.size) // GROUP.size
        if numgroups > fits:
            warn.add(
                "group table",
                ImageError(
                    path,
                    8,
                    f"group table of {numgroups} entries runs past end of file; "
                    f"reading the {fits} that fit",
                ),
            )
            numgroups = fits
        if numgroups > MAX_GROUPS:
            warn.add(
                "group table",
                ImageError(path, 8, f"{numgroups} groups claimed; reading the first {MAX_GROUPS}"),
            )
            numgroups = MAX_GROUPS
        table = ev.data[HEADER.size : HEADER.size + numgroups * GROUP.size].tobytes()
        for k in range(numgroups):
            raw, position, size = GROUP.unpack_from(table, k * GROUP.size)
            gname = printable(raw.split(b"\0", 1)[0])
            ck.groups.append(Group(gname, position, size, HEADER.size + k * GROUP.size))
        # The memory group first, so a tag budget spent on device groups cannot hide it.
        order = sorted(ck.groups, key=lambda g: g.name != "memory")
        budget = [MAX_TAGS]
        for group in order:
            if budget[0] <= 0:
                warn.add(
                    "tag budget",
                    ImageError(
                        path,
                        group.position,
                        f"group {group.name!r}: not walked, "
                        f"more than {MAX_TAGS} tags in this checkpoint",
                    ),
                )
                continue
            for tag in _walk_group(ev, ck, group, warn, budget):
                _note_tag(ev, ck, group, tag)
        warn.close(path)
        return ck
    finally:
        if own:
            ev.close()


def _walk_group(
    ev: Evidence, ck: Checkpoint, group: Group, warn: _Warnings, budget: list[int]
) -> Iterator[Tag]:
    """Yield the tags of ``group``; stops with a warning at anything outside the group."""
    path = ck.path
    if group.position >= ev.size or group.position < HEADER.size:
        warn.add(
            "group outside file",
            ImageError(
                path,
                group.entry_offset,
                f"group {group.name!r} starts at "
                f"{group.position:#x}, outside the file ({ev.size:#x} bytes)",
            ),
        )
        return
    end = group.position + group.size
    if group.size == 0 or end > ev.size:
        if group.size:
            warn.add(
                "group past end",
                ImageError(
                    path,
                    group.entry_offset,
                    f"group {group.name!r} of {group.size} "
                    f"bytes runs past end of file (truncated checkpoint?)",
                ),
            )
        end = ev.size
    data = ev.data
    head = BLOCK_HEAD[ck.width]
    pos = group.position
    while True:
        if pos + TAG_HEAD.size > end:
            warn.add(
                "tag list",
                ImageError(
                    path,
                    pos,
                    f"group {group.name!r}: tag list runs past the group's "
                    "end without an end marker (truncated?)",
                ),
            )
            return
        b0, namelen = int(data[pos]), int(data[pos + 1])
        if b0 == 0 and namelen == 0:
            group.complete = True
            return
        if budget[0] <= 0:
            warn.add(
                "tag budget",
                ImageError(path, pos, f"group {group.name!r}: stopped after {MAX_TAGS} tags"),
            )
            return
        budget[0] -= 1
        valsize, nindx = b0 & 0x3F, b0 >> 6
        p = pos + TAG_HEAD.size
        fixed = namelen + nindx * INDEX
        if p + fixed > end:
            warn.add(
                "tag list",
                ImageError(path, pos, f"group {group.name!r}: tag runs past the group's end"),
            )
            return
        name = printable(data[p : p + namelen].tobytes())
        p += namelen
        indices = struct.unpack_from(f"<{nindx}I", data[p : p + nindx * INDEX].tobytes())
        p += nindx * INDEX
        tag = Tag(name, indices, pos, valsize)
        if tag.is_block:
            if p + head.size > end:
                warn.add(
                    "tag list",
                    ImageError(
                        path,
                        pos,
                        f"group {group.name!r}: block "
                        f"{tag.label()} header runs past the group's end",
                    ),
                )
                return
            nbytes, inmem, pad = head.unpack(data[p : p + head.size].tobytes())
            tag.data_offset = p + head.size + pad
            tag.data_size, tag.mem_size = nbytes, inmem
            nxt = tag.data_offset + nbytes
            if nxt > end:
                warn.add(
                    "block past end",
                    ImageError(
                        path,
                        pos,
                        f"group {group.name!r}: block {tag.label()} of "
                        f"{nbytes} bytes at {tag.data_offset:#x} runs past the group's "
                        f"end ({end:#x})",
                    ),
                )
                tag.data_size = max(0, end - tag.data_offset)
                group.tags += 1
                yield tag
                return
        else:
            nxt = p + valsize
            if nxt > end:
                warn.add(
                    "tag list",
                    ImageError(
                        path,
                        pos,
                        f"group {group.name!r}: value of {tag.label()} runs past the group's end",
                    ),
                )
                return
            if valsize <= 8:
                tag.value = int.from_bytes(data[p:nxt].tobytes(), "little")
        group.tags += 1
        yield tag
        pos = nxt


def _note_tag(ev: Evidence, ck: Checkpoint, group: Group, tag: Tag) -> None:
    """Keep what the image needs from one tag: the memory group whole, the Checkpoint group's
    integers, and screen images: every block of an MKS* (screen) group, and any other block
    whose data is a PNG (a thumbnail kept elsewhere is then still reported)."""
    if group.name == "memory":
        ck.memory_tags.append(tag)
    elif group.name == "Checkpoint" and tag.value is not None and not tag.indices:
        ck.checkpoint_tags.setdefault(tag.name, tag.value)
    if group.name == "memory" or not tag.is_block:
        return
    start = ev.data[tag.data_offset : tag.data_offset + len(PNG_SIGNATURE)].tobytes()
    if group.name.startswith("MKS") or start == PNG_SIGNATURE:
        ck.screen.append(
            {
                "group": group.name,
                "tag": tag.label(),
                "bytes": tag.data_size,
                "offset": tag.data_offset,
                "png": start == PNG_SIGNATURE,
                "screenshot": group.name == SCREENSHOT_GROUP and tag.name == SCREENSHOT_TAG,
            }
        )


# ---------------------------------------------------------------------------------------------
# Regions -> extents


@dataclass
class Region:
    index: int
    ppn: int  # first guest-physical page
    pagenum: int  # first page in the memory data
    pages: int  # length in pages
    tag_offset: int  # file offset of the regionPPN tag, for messages


def _regions(ck: Checkpoint, warn: _Warnings) -> list[Region] | None:
    """The region table of the memory group, or None when it declares none (flat memory)."""
    tags = ck.memory_tags
    count_tag = next((t for t in tags if t.name == "regionsCount" and not t.is_block), None)
    if count_tag is None or not count_tag.value:
        return None
    parts: dict[str, dict[int, Tag]] = {"regionPPN": {}, "regionPageNum": {}, "regionSize": {}}
    for t in tags:
        if t.name in parts and t.indices and not t.is_block:
            if t.value is None:
                warn.add(
                    "region tag",
                    ImageError(
                        ck.path,
                        t.offset,
                        f"{t.label()} has a {t.valsize}-byte value, not an integer",
                    ),
                )
                continue
            parts[t.name].setdefault(t.indices[0], t)
    out = []
    complete = set(parts["regionPPN"]) & set(parts["regionPageNum"]) & set(parts["regionSize"])
    wanted = count_tag.value
    for i in sorted(complete):
        if i >= wanted:
            continue
        ppn = parts["regionPPN"][i]
        out.append(
            Region(
                i,
                ppn.value,
                parts["regionPageNum"][i].value,
                parts["regionSize"][i].value,
                ppn.offset,
            )
        )
    if len(out) > MAX_REGIONS:
        warn.add(
            "region count",
            ImageError(
                ck.path,
                count_tag.offset,
                f"{len(out)} regions; using the first {MAX_REGIONS}",
            ),
        )
        out = out[:MAX_REGIONS]
    elif len(out) < wanted:
        warn.add(
            "region count",
            ImageError(
                ck.path,
                count_tag.offset,
                f"regionsCount is {wanted} but only "
                f"{len(out)} regions have all of regionPPN/regionPageNum/regionSize",
            ),
        )
    return out


def _region_extents(
    regions: list[Region], data_base: int, data_len: int, path: str, warn: _Warnings
) -> tuple[list[tuple[int, int, int]], list[dict[str, Any]]]:
    """Validate regions against the memory data and each other.

    Returns rows (file offset, GPA, length), bytes, and the accepted regions for ``meta``.
    A region outside the data is dropped, one running past its end is cut; one whose GPA
    range or data range overlaps an accepted region's is dropped (the table is then lying,
    and scanning the same bytes twice or at two GPAs would report a secret twice).
    """
    rows: list[tuple[int, int, int]] = []
    accepted: list[dict[str, Any]] = []
    gpa_used: list[tuple[int, int]] = []  # sorted (start, end)
    data_used: list[tuple[int, int]] = []
    for r in sorted(regions, key=lambda r: (r.ppn, r.index)):
        gpa, off, length = r.ppn * PAGE, r.pagenum * PAGE, r.pages * PAGE
        label = f"region {r.index} (GPA {gpa:#x}, {r.pages} pages at page {r.pagenum})"
        if length == 0:
            continue
        if off >= data_len:
            warn.add(
                "region outside",
                ImageError(
                    path,
                    r.tag_offset,
                    f"{label} lies outside the {data_len}-byte memory data; dropped",
                ),
            )
            continue
        if off + length > data_len:
            warn.add(
                "region cut",
                ImageError(
                    path,
                    r.tag_offset,
                    f"{label} runs past the end "
                    f"of the {data_len}-byte memory data "
                    "(truncated?); cut",
                ),
            )
            length = data_len - off
        if _overlaps(gpa_used, gpa, gpa + length):
            warn.add(
                "region overlap",
                ImageError(path, r.tag_offset, f"{label} overlaps another region's GPAs; dropped"),
            )
            continue
        if _overlaps(data_used, off, off + length):
            warn.add(
                "region overlap",
                ImageError(
                    path, r.tag_offset, f"{label} maps memory data another region maps; dropped"
                ),
            )
            continue
        bisect.insort(gpa_used, (gpa, gpa + length))
        bisect.insort(data_used, (off, off + length))
        rows.append((data_base + off, gpa, length))
        accepted.append(
            {"index": r.index, "gpa": gpa, "length": length, "file_offset": data_base + off}
        )
    return rows, accepted


def _overlaps(used: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) overlaps an interval of the sorted, disjoint list ``used``."""
    k = bisect.bisect_left(used, (start, end))
    if k < len(used) and used[k][0] < end:
        return True
    return k > 0 and used[k - 1][1] > start


def _gaps(rows: list[tuple[int, int, int]], base: int, length: int) -> list[tuple[int, int]]:
    """Pieces of [base, base+length) that no row covers, as (file offset, length)."""
    out, pos = [], base
    for off, _, ln in sorted(rows):
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + ln)
    if pos < base + length:
        out.append((pos, base + length - pos))
    return out


# ---------------------------------------------------------------------------------------------
# Pairing


def _sibling(path: str, ext: str) -> str | None:
    """``<stem><ext>`` beside ``path`` if it exists (extension matched case-insensitively, as
    files copied from Windows or ESXi datastores may be upper-case)."""
    stem = os.path.splitext(path)[0]
    exact = stem + ext
    if os.path.isfile(exact):
        return exact
    directory, base = os.path.split(stem)
    want = (base + ext).casefold()
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return None
    for name in sorted(names):
        if name.casefold() == want:
            cand = os.path.join(directory, name)
            if os.path.isfile(cand):
                return cand
    return None


def _has_ext(path: str, *exts: str) -> bool:
    return path.casefold().endswith(tuple(e.casefold() for e in exts))


def companion_checkpoint(vmem: str) -> str | None:
    """The checkpoint describing ``vmem``: ``<stem>.vmss``, else ``<stem>.vmsn``, whichever
    first exists and carries a checkpoint magic."""
    for ext in CHECKPOINT_EXTS:
        cand = _sibling(vmem, ext)
        if cand and read_magic(cand) is not None:
            return cand
    return None


def find_vmx(path: str) -> str | None:
    """The ``.vmx`` of the VM that ``path`` (a checkpoint or .vmem) belongs to, or None.

    VMware names a VM's files after the .vmx stem: ``<vm>.vmx``, ``<vm>-Snapshot<N>.vmsn``,
    ``<vm>-<hash>.vmss``. Take the .vmx whose stem is the longest such prefix of ``path``'s
    stem, or one whose ``checkpoint.vmState`` names ``path``; guess nothing else.
    """
    directory, base = os.path.split(path)
    stem = os.path.splitext(base)[0].casefold()
    try:
        names = sorted(n for n in os.listdir(directory or ".") if _has_ext(n, VMX_EXT))
    except OSError:
        return None
    best, best_len = None, -1
    for name in names:
        vstem = os.path.splitext(name)[0].casefold()
        if (stem == vstem or stem.startswith(vstem + "-")) and len(vstem) > best_len:
            best, best_len = os.path.join(directory, name), len(vstem)
    if best:
        return best
    for name in names:
        cand = os.path.join(directory, name)
        state = read_vmx(cand).get("checkpoint.vmstate", "")
        if state and os.path.basename(state).casefold() == base.casefold():
            return cand
    return None


def read_vmx(path: str) -> dict[str, str]:
    """``key = "value"`` pairs of a .vmx (keys lower-cased: VMware treats them
    case-insensitively). Unreadable files give {}."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(VMX_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out.setdefault(key.strip().casefold(), value)
    return out


def companions(path: str) -> list[str]:
    """The other files an image opened from ``path`` uses, paired by VMware naming: for a
    checkpoint its ``.vmem``, for a ``.vmem`` its checkpoint (neither when the checkpoint
    embeds its own memory: it then describes no .vmem), and the VM's ``.vmx``. Paths that
    exist; ``path`` itself is not listed."""
    out = []
    if _has_ext(path, MEMORY_EXT):
        ck = companion_checkpoint(path)
        if ck and not _embeds_memory(ck):
            out.append(ck)
    elif read_magic(path) is not None and not _embeds_memory(path):
        vmem = _sibling(path, MEMORY_EXT)
        if vmem:
            out.append(vmem)
    vmx = find_vmx(path)
    if vmx:
        out.append(vmx)
    return out


def primary(paths: list[str]) -> list[list[str]]:
    """Group VMware files (e.g. a directory listing) into one image per memory state.

    Returns one list per image: its first element is the file to open, the rest the files
    that image also uses (so a directory scan skips them). Every ``.vmss``, ``.vmsn`` and
    ``.vmem`` of ``paths`` appears in exactly one list; a ``.vmx`` may appear in several (one VM,
    several snapshots) and never alone. Other files are ignored. A ``.vmem`` and the
    checkpoint that describes it are one image; a second checkpoint of the same stem joins that
    image unless it embeds its own memory. Never the same memory twice.
    """
    ckpts = [p for p in paths if _has_ext(p, *CHECKPOINT_EXTS)]
    vmems = [p for p in paths if _has_ext(p, MEMORY_EXT)]
    key = {p: os.path.splitext(os.path.abspath(p))[0].casefold() for p in ckpts + vmems}
    by_stem: dict[str, list[str]] = {}
    for p in sorted(ckpts, key=lambda p: (key[p], not _has_ext(p, ".vmss"), p)):
        by_stem.setdefault(key[p], []).append(p)
    groups: list[list[str]] = []
    claimed: set[str] = set()
    for vmem in sorted(vmems):
        describing = []
        for ck in by_stem.get(key[vmem], []):
            if read_magic(ck) is not None and not _embeds_memory(ck):
                describing.append(ck)
        if describing:
            groups.append([describing[0], vmem, *describing[1:]])
            claimed.update(describing)
        else:
            groups.append([vmem])
    for ck in sorted(ckpts):
        if ck not in claimed:
            groups.append([ck])
    for g in groups:
        vmx = find_vmx(g[0])
        if vmx:
            g.append(vmx)
    return groups


def _embeds_memory(path: str) -> bool:
    try:
        return read_checkpoint(path).memory_block() is not None
    except ImageError:
        return False


# ---------------------------------------------------------------------------------------------
# Parser interface


def probe(head: bytes, path: str) -> str | None:
    """A checkpoint by its magic; a ``.vmem`` (no magic) by its companion checkpoint's magic.

    Suspend and snapshot checkpoints share their magics, so the name only labels one: a
    ``*.vmsn`` is ``vmware-vmsn``, any other checkpoint ``vmware-vmss``.

    A ``.vmem`` alone is claimed too when it is a whole number of 4 KiB pages (what the raw
    parser would take): its bytes are mapped exactly as raw would, but the user is told that
    without the checkpoint's region table GPAs above the first region (past the PCI hole) may
    be wrong, and the image says it is VMware memory. The name only pairs files; what decides
    is the checkpoint's content or the memory's shape.
    """
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in MAGICS:
        return "vmware-vmsn" if _has_ext(path, ".vmsn") else "vmware-vmss"
    if _has_ext(path, MEMORY_EXT):
        if companion_checkpoint(path):
            return "vmware-vmem"
        try:
            size = os.stat(path).st_size
        except OSError:
            return None
        if size and size % PAGE == 0:
            return "vmware-vmem"
    return None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Open a VMware memory state from any one of its files.

    ``path`` may be a checkpoint (its memory embedded, or in ``<stem>.vmem`` beside it) or a
    ``.vmem`` (its region table then comes from ``<stem>.vmss`` / ``<stem>.vmsn``; without one
    it is mapped flat, with a warning). The image is one segment: the mmap of the file holding
    the memory, with one extent per region (buffer offset == file offset).
    """
    if fmt not in FORMATS:
        raise ImageError(path, None, f"unknown VMware format {fmt!r}")
    magic = read_magic(path)
    if fmt == "vmware-vmem" and magic is not None:
        raise ImageError(path, 0, "this is a VMware checkpoint, not a .vmem memory file")
    if fmt != "vmware-vmem" and magic is None:
        if not os.path.exists(path):
            raise ImageError(path, None, "no such file")
        raise ImageError(path, 0, "not a VMware checkpoint (no checkpoint magic)")
    warnings: list[ImageError] = []
    warn = _Warnings(warnings)
    files = [path]
    ck: Checkpoint | None = None
    if magic is not None:
        with Evidence(path).closed_on_error() as ck_ev:
            ck = read_checkpoint(path, ck_ev)
        warnings.extend(ck.warnings)
        block = ck.memory_block()
        if block is not None:
            image = _embedded(path, fmt, ck, ck_ev, block, warn)
        else:
            ck_ev.close()
            vmem = _sibling(path, MEMORY_EXT)
            if vmem is None:
                raise ImageError(
                    path,
                    None,
                    "this checkpoint holds no memory (no Memory block) and its "
                    f"companion {os.path.basename(os.path.splitext(path)[0])}.vmem is not "
                    "beside it",
                )
            files.append(vmem)
            image = _separate(path, fmt, vmem, ck, warn)
    else:
        ck_path = companion_checkpoint(path)
        if ck_path:
            try:
                ck = read_checkpoint(ck_path)
                warnings.extend(ck.warnings)
                if ck.memory_block() is not None:
                    warn.add(
                        "pairing",
                        ImageError(
                            ck_path,
                            None,
                            "this checkpoint embeds its "
                            "own memory, so it does not describe "
                            f"{os.path.basename(path)}",
                        ),
                    )
                    ck = None
            except ImageError as err:
                warn.add("pairing", err)
                ck = None
        if ck is not None:
            files.append(ck.path)
        image = _separate(path, fmt, path, ck, warn)
    vmx = find_vmx(path)
    if vmx:
        files.append(vmx)
        _vmx_meta(vmx, image.meta)
    image.files = files
    warn.close(path)
    image.warnings = warnings
    image.check_coverage()
    return image


def _separate(
    path: str, fmt: str, vmem: str, ck: Checkpoint | None, warn: _Warnings
) -> MemoryImage:
    """Memory in a .vmem file: regions from ``ck`` (flat without it)."""
    ev = Evidence(vmem)
    if ev.size == 0:
        ev.close()
        raise ImageError(vmem, 0, "empty .vmem file")
    if ck is None:
        warn.add(
            "flat",
            Remark(
                vmem,
                None,
                "no .vmss/.vmsn checkpoint describes this .vmem: scanned "
                "as flat memory (GPA = file offset); addresses above the first region "
                "(past the PCI hole, usually from 3 GiB) may be wrong",
            ),
        )
    meta = {"memory": "vmem"}
    return _build(path, fmt, ev, vmem, ck, 0, ev.size, meta, warn)


def _embedded(
    path: str, fmt: str, ck: Checkpoint, ev: Evidence, block: Tag, warn: _Warnings
) -> MemoryImage:
    """Memory in the checkpoint's ``Memory`` block."""
    if block.compressed:
        ev.close()
        raise ImageError(
            path,
            block.offset,
            f"the embedded memory block {block.label()} is compressed; "
            "its algorithm is not documented (crash refuses it too), so it cannot be scanned",
        )
    if block.data_size == 0:
        ev.close()
        raise ImageError(
            path, block.offset, f"the embedded memory block {block.label()} holds no data"
        )
    if block.mem_size != block.data_size:
        warn.add(
            "block size",
            ImageError(
                path,
                block.offset,
                f"memory block {block.label()}: {block.data_size} "
                f"bytes on disk but {block.mem_size} in memory; mapping the bytes on "
                "disk",
            ),
        )
    meta = {"memory": "embedded", "memory_block_offset": block.data_offset}
    return _build(path, fmt, ev, path, ck, block.data_offset, block.data_size, meta, warn)


def _build(
    path: str,
    fmt: str,
    ev: Evidence,
    mem_file: str,
    ck: Checkpoint | None,
    base: int,
    length: int,
    meta: dict[str, Any],
    warn: _Warnings,
) -> MemoryImage:
    """One segment over ``ev`` (the file holding memory): the memory data is
    ``[base, base+length)`` of that file; regions from ``ck`` give its GPAs."""
    image = MemoryImage(path=path, format=fmt, closers=[ev.close])
    regions = _regions(ck, warn) if ck is not None else None
    ck_path = ck.path if ck is not None else mem_file
    if regions is None:
        flat_base = 0
        if ck is not None and ck.checkpoint_tags.get("Platform") == PLATFORM_ARM64:
            flat_base = ARM64_RAM_BASE
            meta["platform"] = "arm64"
        rows = [(base, flat_base, length)]
        meta["layout"] = "flat" if flat_base == 0 else f"flat from {flat_base:#x}"
        accepted = [{"index": None, "gpa": flat_base, "length": length, "file_offset": base}]
    else:
        rows, accepted = _region_extents(regions, base, length, ck_path, warn)
        meta["layout"] = "regions"
        if not rows:
            ev.close()
            raise ImageError(
                ck_path,
                None,
                "no usable memory region (every region lies "
                "outside the memory data or overlaps another)",
            )
    offs = [r[0] for r in rows]
    addrs = [r[1] for r in rows]
    lens = [r[2] for r in rows]
    spaces = [0] * len(rows)
    gaps = _gaps(rows, base, length) if regions is not None else []
    if gaps:
        # Bytes of the memory data that no region maps: still scanned (a secret there is a
        # secret), addressed by their offset in the memory data, in their own space.
        space = image.space_id("vmware:unmapped")
        unmapped = sum(g[1] for g in gaps)
        warn.add(
            "unmapped",
            Remark(
                mem_file,
                gaps[0][0],
                f"{unmapped} bytes of memory data "
                "are in no region: scanned without a GPA (space "
                "'vmware:unmapped', address = offset in the data)",
            ),
        )
        for off, ln in gaps:
            offs.append(off)
            addrs.append(off - base)
            lens.append(ln)
            spaces.append(space)
    ext = Extents.build(
        offs,
        addrs,
        lens,
        file_offset=np.asarray(offs, np.int64),
        space=np.asarray(spaces, np.int64),
    )
    gpa_bytes = int(ext.length[ext.space == 0].sum())
    segments = [Segment(ev.data, ext, mem_file)]
    if ck is not None:
        held = (base, base + length) if ck.path == mem_file else None
        pieces = checkpoint_regions(ck, held)
        if held is not None:  # the checkpoint holds the memory: one segment of one mmap
            segments[0].extents = Extents.concat(ext, image.region_extents(pieces))
        else:
            ck_ev = Evidence(ck.path)
            image.closers.append(ck_ev.close)
            segments.append(Segment(ck_ev.data, image.region_extents(pieces), ck.path))
        image.coverage.outside = sum(b - a for _, a, b in pieces)
    image.fixed_segments = segments
    meta.update({"ram_size": gpa_bytes, "regions": accepted, "memory_file": mem_file})
    if ck is not None:
        meta.update(_checkpoint_meta(ck))
    image.meta = meta
    _declare(image, ck, regions, gpa_bytes)
    return image


def checkpoint_regions(
    ck: Checkpoint, memory: tuple[int, int] | None
) -> list[tuple[str, int, int]]:
    """The checkpoint file's bytes outside guest memory, as (kind, first, end): its header and
    group table (``header``), every group's tags and blocks (``metadata``), what lies between
    them (``unreferenced``) or after the last (``trailing``). ``memory`` is the file range of
    an embedded memory block (guest memory, left out)."""
    spans = [("header", 0, HEADER.size + GROUP.size * len(ck.groups))]
    spans += [("metadata", g.position, g.position + g.size) for g in ck.groups if g.size]
    return file_regions(ck.size, spans, [memory] if memory else [])


def _declare(
    image: MemoryImage, ck: Checkpoint | None, regions: list[Region] | None, read: int
) -> None:
    """Contract 4: the Checkpoint group's ``memSize`` (MiB) declares the guest RAM, else the
    region table; a lone .vmem declares nothing. The caller checks it."""
    cov = image.coverage
    cov.read = read
    mem_mib = ck.checkpoint_tags.get("memSize", 0) if ck is not None else 0
    if mem_mib:
        cov.declared, cov.declared_by = mem_mib << 20, "the checkpoint's memSize"
    elif regions:
        cov.declared = sum(r.pages for r in regions) * PAGE
        cov.declared_by = "the checkpoint's memory regions"


def _checkpoint_meta(ck: Checkpoint) -> dict[str, Any]:
    """What ``vmleak info`` shows about the checkpoint: magic, groups with their tag counts,
    screen captures, and the Checkpoint group's small integers (memSize in MiB ...)."""
    shots = [s for s in ck.screen if s["screenshot"]]
    return {
        "checkpoint": ck.path,
        "checkpoint_magic": f"{ck.magic:#010x} ({ck.magic_name})",
        "checkpoint_version": ck.version,
        "groups": [
            {
                "name": g.name,
                "offset": g.position,
                "size": g.size,
                "tags": g.tags,
                "complete": g.complete,
            }
            for g in ck.groups
        ],
        "checkpoint_tags": dict(ck.checkpoint_tags),
        "screenshot": bool(shots),
        "screen_blocks": ck.screen,
    }


def _vmx_meta(vmx: str, meta: dict[str, Any]) -> None:
    conf = read_vmx(vmx)
    meta["vmx"] = vmx
    if conf.get("displayname"):
        meta["guest_name"] = conf["displayname"]
    if conf.get("uuid.bios"):
        meta["guest_uuid"] = _uuid(conf["uuid.bios"])
    if conf.get("guestos"):
        meta["guest_os"] = conf["guestos"]
    if conf.get("memsize", "").isdigit():
        meta["configured_ram"] = int(conf["memsize"]) * (1 << 20)


def _uuid(text: str) -> str:
    """VMware writes ``uuid.bios = "56 4d 12 ... 9a-bc de ..."``; give the canonical form when
    it has 16 bytes, else the text as written."""
    digits = "".join(c for c in text if c in "0123456789abcdefABCDEF")
    if len(digits) != 32:
        return text
    d = digits.lower()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"
