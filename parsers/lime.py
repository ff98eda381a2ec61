"""LiME memory dumps (``format=lime``): a series of ranges, each a 32-byte header giving the
physical address range followed by its bytes. Ranges may come in any order."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from parsers.base import MAX_GPA, Evidence, Extents, ImageError, MemoryImage, Segment

FORMATS = ["lime"]

# Range header, little-endian (LiME src/lime.h):
HEADER = struct.Struct(
    "<I"  # magic 0x4C694D45 ("EMiL")
    "I"  # version, 1
    "Q"  # s_addr: first physical address of the range
    "Q"  # e_addr: last physical address, inclusive
    "8x"  # reserved
)
MAGIC = 0x4C694D45
VERSION = 1


def probe(head: bytes, path: str) -> str | None:
    if len(head) >= HEADER.size:
        magic, version, _, _ = HEADER.unpack_from(head)
        if magic == MAGIC and version == VERSION:
            return "lime"
    return None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Walk the range headers (only headers are read) and map the ranges as extents of one
    mmapped segment. A bad header ends the walk: what came before is still scanned and the
    problem is kept as a warning."""
    ev = Evidence(path)
    image = MemoryImage(path=path, format="lime", files=[path], closers=[ev.close])
    bufs, addrs, lens = [], [], []
    pos = declared = 0
    while pos < ev.size:
        length = None
        try:
            magic, version, start, end = HEADER.unpack(ev.need(pos, HEADER.size, "LiME header"))
            if magic != MAGIC or version != VERSION:
                raise ImageError(path, pos, f"bad LiME range header (magic {magic:#x})")
            if end < start:
                raise ImageError(
                    path, pos, f"LiME range ends before it starts ({start:#x}>{end:#x})"
                )
            if end >= MAX_GPA:
                raise ImageError(path, pos, f"LiME range end {end:#x} is not a physical address")
            length = end - start + 1
            if pos + HEADER.size + length > ev.size:
                # scan what the file still holds of the range, and say it is cut short
                have = ev.size - pos - HEADER.size
                if have > 0:
                    bufs.append(pos + HEADER.size)
                    addrs.append(start)
                    lens.append(have)
                pos = ev.size  # the rest of the file is that range: no trailing bytes
                raise ImageError(
                    path, pos, f"LiME range of {length} bytes runs past end of file (truncated)"
                )
        except ImageError as err:
            if not bufs:
                ev.close()
                raise
            image.warnings.append(err)
            declared += length or 0
            break
        declared += length
        bufs.append(pos + HEADER.size)
        addrs.append(start)
        lens.append(length)
        pos += HEADER.size + length
    ext = Extents.build(bufs, addrs, lens, file_offset=np.asarray(bufs, np.int64))
    # Range headers are structure; bytes after the last range (or from a bad header on) are
    # not, and are scanned as region:trailing.
    pieces = [("trailing", pos, ev.size)] if pos < ev.size else []
    regions = image.region_extents(pieces)
    image.fixed_segments = [Segment(ev.data, Extents.concat(ext, regions), path)]
    image.meta = {"ram_size": ext.total(), "ranges": len(ext)}
    cov = image.coverage
    cov.declared, cov.declared_by = declared, "the LiME range headers"
    cov.read, cov.outside = ext.total(), regions.total()
    cov.structure = ev.size - cov.read - cov.outside
    image.check_coverage()
    return image
