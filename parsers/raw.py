"""Raw memory: a flat file whose byte k is guest-physical address k (dd, .vmem without its
metadata, LiME ``padded``, ``extract`` output)."""

from __future__ import annotations

from typing import Any

from parsers.base import Evidence, Extents, ImageError, MemoryImage, Segment

FORMATS = ["raw"]
PAGE = 4096


def probe(head: bytes, path: str) -> str | None:
    """Flat memory has no magic: accept a file that is a whole number of 4 KiB pages."""
    import os

    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    return "raw" if size and size % PAGE == 0 else None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Map ``path`` read-only as one segment: buffer offset == GPA == file offset."""
    ev = Evidence(path)
    if ev.size == 0:
        raise ImageError(path, 0, "empty file")
    seg = Segment(ev.data, Extents.single(ev.size, addr=0, file_offset=0), path)
    image = MemoryImage(
        path=path,
        format="raw",
        files=[path],
        meta={"ram_size": ev.size},
        fixed_segments=[seg],
        closers=[ev.close],
    )
    image.coverage.read = ev.size  # every byte is guest memory; the format declares no size
    image.check_coverage()
    return image
