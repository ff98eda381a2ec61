"""libvirt save images (``virsh save``, ``virsh managedsave``, external memory snapshots):
a ``LibvirtQemudSave`` header, the domain XML, then a QEMU migration stream, raw, compressed
with the ``save_image_format`` of qemu.conf, or in mapped-ram form (``sparse``).
Layout and sources: ``docs/formats.md`` §5 (container) and §6 (compressed payloads).

A raw or sparse stream is scanned in place through mmap (zero copy). A compressed one is
decompressed in-process in bounded windows (never whole in memory) by ``parsers.codecs``:
gzip, bzip2, xz, lzop and zstd. Decompression stops with an error when the stream grows past
the bound :func:`stream_bound` sets from the smallest trustworthy declaration (the XML
``<memory>``, the RAM block list, for gzip the deflate ratio limit): a decompression bomb
stops within seconds whatever it claims.

Every byte of the file outside guest memory is scanned too (``region:header`` for the save
header, XML and cookie, ``region:padding`` for the zero padding after them; the stream's own
regions are :func:`parsers.qemu.stream_regions`).
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import numpy as np

from parsers import codecs, qemu
from parsers.base import Coverage, Evidence, ImageError, MemoryImage, Segment

FORMATS = ["libvirt-save"]

MAGIC_SAVE = b"LibvirtQemudSave"  # complete save
MAGIC_PART = b"LibvirtQemudPart"  # header never finalised: the save was interrupted
# Header after the magic, host byte order (src/qemu/qemu_saveimage.h virQEMUSaveHeader):
HEADER_FIELDS = (
    "I"  # version: 2 today, 1 for very old images
    "I"  # data_len: bytes of XML + cookie + padding after the header
    "I"  # was_running: 1 if the domain ran when saved
    "I"  # format: compression, table below ("compressed" in old libvirt)
    "I"  # cookieOffset: cookie offset inside the data area (0: none)
    "56x"  # 14 unused u32
)
HEADER_LE = struct.Struct("<16s" + HEADER_FIELDS)
HEADER_BE = struct.Struct(">16s" + HEADER_FIELDS)  # image written on a host of other endianness
HEADER_SIZE = HEADER_LE.size  # 92: the data area starts here
VERSIONS = (1, 2)

# format enum (qemu_saveimage_format.h, on-disk ABI) -> name
FORMAT_NAMES = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
# Payload magics, to check the header's claim (and to decide for version 1 images).
PAYLOAD_MAGICS = {"raw": qemu.MAGIC, **codecs.PAYLOAD_MAGICS}
BOMB_MARGIN = 64 << 20  # bytes of stream allowed beyond the bound (device state, headers)
#: stream bytes per declared RAM byte a paused save can need: each page once plus its 8-byte
#: record header (0.2% at 4 KiB); libvirt pauses the domain before saving, so no page is resent
STREAM_FACTOR = 1.25
#: RAM blocks a stream holds beyond the XML ``<memory>`` (VGA and QXL RAM, ROMs, firmware,
#: ACPI tables: tens of MiB, QXL with large video memory a few hundred)
NON_RAM_ALLOWANCE = 256 << 20
#: deflate cannot expand data more than 1032:1 (a 258-byte match per 2 bits at best; zlib's
#: technical notes): a gzip payload's stream is at most this many times its compressed size
DEFLATE_MAX_RATIO = 1032
MAX_XML = 16 << 20  # a domain XML larger than this is not parsed
MEMORY_UNITS = {
    "b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
    "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40,
    "tb": 1000**4,
}


def probe(head: bytes, path: str) -> str | None:
    return "libvirt-save" if head[:16] in (MAGIC_SAVE, MAGIC_PART) else None


def read_header(ev: Evidence) -> dict[str, Any]:
    """The header fields (version, data_len, was_running, format, cookie_offset, complete,
    byte_order). Tries the host order first, then the other one, as libvirt does."""
    raw = ev.need(0, HEADER_SIZE, "libvirt save header")
    fields = HEADER_LE.unpack(raw)
    order = "little"
    if fields[1] not in VERSIONS:
        fields = HEADER_BE.unpack(raw)
        order = "big"
    magic, version, data_len, running, fmt, cookie = fields
    if version not in VERSIONS:
        raise ImageError(ev.path, 16, f"unsupported libvirt save header version {fields[1]}")
    if magic not in (MAGIC_SAVE, MAGIC_PART):
        raise ImageError(ev.path, 0, "not a libvirt save image")
    if HEADER_SIZE + data_len > ev.size:
        raise ImageError(ev.path, 20, f"data length {data_len} runs past end of file (truncated)")
    return {
        "version": version, "data_len": data_len, "was_running": bool(running), "format": fmt,
        "cookie_offset": cookie, "complete": magic == MAGIC_SAVE, "byte_order": order,
    }


def _memory_bytes(elem: ET.Element | None) -> int | None:
    if elem is None or not (elem.text or "").strip().isdecimal():
        return None
    unit = MEMORY_UNITS.get(elem.get("unit", "KiB").lower())
    return int(elem.text.strip()) * unit if unit else None


def parse_domain_xml(xml: bytes) -> dict[str, Any]:
    """Guest name, UUID, memory (bytes), machine type and NUMA cells from the domain XML."""
    root = ET.fromstring(xml)
    out: dict[str, Any] = {}
    for key, path in (("guest_name", "name"), ("guest_uuid", "uuid")):
        text = root.findtext(path)
        if text:
            out[key] = text.strip()
    mem = _memory_bytes(root.find("memory"))
    if mem:
        out["declared_memory"] = mem
    ostype = root.find("os/type")
    if ostype is not None and ostype.get("machine"):
        out["machine"] = ostype.get("machine")
    cells = root.findall("cpu/numa/cell")
    if cells:
        out["numa_cells"] = [
            {"id": c.get("id"), "memory": _memory_bytes(c) or c.get("memory")} for c in cells
        ]
    return out


def stream_bound(kind: str, compressed: int, xml_ram: int | None, mem_total: int) -> int:
    """The most decompressed stream bytes a ``kind`` payload of ``compressed`` bytes may
    yield: STREAM_FACTOR times the smallest trustworthy declaration of guest memory (the RAM
    block list total ``mem_total`` once read, the XML ``<memory>`` plus NON_RAM_ALLOWANCE),
    plus a margin, and for gzip never more than the deflate ratio allows. Before anything is
    declared, the first window and the margin."""
    trusted = [n for n in (mem_total, xml_ram and xml_ram + NON_RAM_ALLOWANCE) if n]
    bound = int(STREAM_FACTOR * min(trusted, default=0)) + qemu.WINDOW + BOMB_MARGIN
    if kind == "gzip":
        bound = min(bound, DEFLATE_MAX_RATIO * compressed + BOMB_MARGIN)
    return bound


def _sniff(ev: Evidence, start: int) -> str | None:
    head = ev.read(start, 16)
    for name, magic in PAYLOAD_MAGICS.items():
        if head.startswith(magic):
            return name
    return None


def _header_regions(ev: Evidence, hdr: dict[str, Any], start: int) -> list[tuple[str, int, int]]:
    """The save header, XML and cookie (``header``) and the zero padding after them up to the
    stream (``padding``), as (kind, first, end) file offsets."""
    area = ev.data[HEADER_SIZE:start]
    nul = np.flatnonzero(area == 0)
    cookie = hdr["cookie_offset"]
    after = nul[nul >= cookie] if 0 < cookie < area.size else nul
    content = HEADER_SIZE + (int(after[0]) + 1 if after.size else area.size)
    return [(k, a, b) for k, a, b in (("header", 0, content), ("padding", content, start)) if b > a]


def _after_payload(
    ev: Evidence, image: MemoryImage, start: int, end: int | None
) -> Iterator[Segment]:
    """The file bytes after a compressed payload's last member (``end``: its file offset,
    None when unknown) as ``region:trailing``, scanned in place; the compressed bytes
    ``[start, end)`` count as structure (their content was scanned decompressed)."""
    if end is None:
        return
    image.coverage.structure += end - start
    if end < ev.size:
        ext = image.region_extents([("trailing", end, ev.size)], end)
        image.coverage.outside += ext.total()
        yield Segment(ev.data[end:], ext, ev.path)


def _settle(image: MemoryImage) -> None:
    """Compare declared and read memory once the stream was read; a stream that never
    reached its RAM block list is held to the XML ``<memory>``."""
    cov = image.coverage
    if cov.declared is None and image.meta.get("declared_memory"):
        cov.declared = image.meta["declared_memory"]
        cov.declared_by = "the domain XML <memory>"
        cov.declared_at = HEADER_SIZE
    image.check_coverage()


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Read the header and XML, then map (raw, sparse) or stream (compressed) the payload."""
    with Evidence(path).closed_on_error() as ev:
        image = MemoryImage(path=path, format="libvirt-save", files=[path], closers=[ev.close])
        _open(ev, image, options)
    return image


def _open(ev: Evidence, image: MemoryImage, options: dict[str, Any]) -> None:
    path = ev.path
    hdr = read_header(ev)
    start = HEADER_SIZE + hdr["data_len"]
    meta = image.meta
    meta.update(
        libvirt_header_version=hdr["version"], was_running=hdr["was_running"],
        byte_order=hdr["byte_order"], payload_offset=start,
    )
    if not hdr["complete"]:
        image.warnings.append(ImageError(path, 0, "LibvirtQemudPart: the save was interrupted; "
                                         "the stream may end early"))
    xml_len = hdr["cookie_offset"] or hdr["data_len"]
    if hdr["cookie_offset"] > hdr["data_len"]:
        image.warnings.append(ImageError(path, 32, "cookie offset beyond the data area"))
        xml_len = hdr["data_len"]
    xml = ev.read(HEADER_SIZE, min(xml_len, MAX_XML)).split(b"\0", 1)[0]
    try:
        meta.update(parse_domain_xml(xml))
    except (ET.ParseError, ValueError, LookupError) as exc:  # bad XML, huge numbers, encodings
        image.warnings.append(ImageError(path, HEADER_SIZE, f"domain XML unreadable: {exc}"))
    machine = meta.get("machine")
    declared = FORMAT_NAMES.get(hdr["format"])
    if declared is None:
        raise ImageError(path, 28, f"unknown save image format {hdr['format']}")
    found = _sniff(ev, start)
    if declared == "sparse":
        kind = "sparse"
    elif found is None:
        raise ImageError(path, start, f"no {declared} stream at the payload offset")
    else:
        kind = found
        if hdr["version"] == 2 and found != declared:
            image.warnings.append(ImageError(
                path, 28, f"header says {declared} but the payload is {found}; read as {found}"
            ))
    meta["compression"] = kind
    head = _header_regions(ev, hdr, start)
    if kind in ("raw", "sparse"):
        qemu.open_mapped(ev, start, image, machine, options, head)
        meta.setdefault("ram_size", meta.get("declared_memory"))
        _settle(image)
        return
    opener, remark = codecs.opener(ev, kind)
    if remark is not None:
        image.warnings.append(remark)
    xml_ram = meta.get("declared_memory")

    def limit(mem_total: int) -> int:
        return stream_bound(kind, ev.size - start, xml_ram, mem_total)

    first = opener(start, limit(0))
    try:
        prefix = b""
        while len(prefix) < qemu.PEEK and (data := first.read(qemu.PEEK - len(prefix))):
            prefix += data
        walker = qemu.peek_meta(prefix, first.fail, machine, options)
    finally:
        first.close()
    if not walker.blocks and first.problem is not None:
        raise first.problem
    walker.assign_spaces(image)
    meta.update(walker.meta())
    meta.setdefault("ram_size", xml_ram or None)

    bound = limit(walker.mem_total)

    def stream() -> Iterator[Segment]:
        image.coverage = Coverage()
        ext = image.region_extents(head)
        image.coverage.outside = ext.total()
        yield Segment(ev.data[:start], ext, path)
        src = opener(start, bound)
        try:
            yield from qemu.stream_segments(src, image, machine, options, limit)
        except ImageError:
            yield from _after_payload(ev, image, start, src.end)
            _settle(image)
            raise
        yield from _after_payload(ev, image, start, src.end)
        _settle(image)

    image.stream = stream
