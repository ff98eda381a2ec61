"""What ``vmleak info`` shows of an image and how ``vmleak extract`` writes its
guest-physical memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from parsers.base import GPA_SPACE, ImageError, MemoryImage
from scanner.dormant import file_mtime
from scanner.units import merged

RANGES_SHOWN = 16  # merged address ranges listed per address space by info


def fmt_meta(v: object) -> str:
    """A metadata value for people (sizes of 1 MiB and more also in MiB, lists one a line)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20:
        return f"{v} ({v / 2**20:,.0f} MiB)"
    if isinstance(v, list | tuple):
        return "\n          ".join(str(x) for x in v) if v else "-"
    return str(v)


def info_lines(img: MemoryImage) -> Iterator[str]:
    """The lines of ``vmleak info``: format, files, metadata, extents, warnings."""
    yield f"image:    {img.path}"
    yield f"format:   {img.format}"
    yield f"files:    {', '.join(img.files)}"
    for k, v in img.meta.items():
        yield f"{k + ':':<9} {fmt_meta(v)}"
    if img.random_access:
        yield from extent_lines(img)
    else:
        yield "extents:  streamed (compressed); mapped while scanning"
    for w in img.warnings:
        yield f"warning:  {w}"


def info_json(img: MemoryImage) -> dict[str, Any]:
    """What ``vmleak info --format json`` prints: format, files, metadata, warnings, and
    ``guest_clock`` / ``file_mtime`` (ISO-8601 UTC or null). A compressed stream holds its
    device state (the guest clock) at its end, so it is read through first."""
    problems = []
    if not img.random_access:
        try:
            for _ in img.segments():
                pass
        except ImageError as err:  # damaged further on: what came before is still shown
            problems.append(str(err))
    meta = dict(img.meta)
    return {
        "image": img.path,
        "format": img.format,
        "files": list(img.files),
        "guest_clock": meta.pop("guest_clock", None),
        "file_mtime": file_mtime(img.path),
        "meta": meta,
        "warnings": [str(w) for w in img.warnings] + problems,
    }


def extent_lines(img: MemoryImage) -> Iterator[str]:
    """Per address space of a random-access image: extents, bytes, merged ranges (the first
    ``RANGES_SHOWN`` listed)."""
    segs = img.fixed_segments or []
    for space_id, space in enumerate(img.spaces):
        rows = [
            (int(a), int(n))
            for seg in segs
            for a, n, sp in zip(
                seg.extents.addr, seg.extents.length, seg.extents.space, strict=True
            )
            if sp == space_id
        ]
        if not rows:
            continue
        runs = merged([(a, a + n) for a, n in rows])
        total = sum(n for _, n in rows)
        label = "GPA" if space_id == GPA_SPACE else space
        yield f"extents:  {label}: {len(rows)} extents, {total:,} bytes, {len(runs)} ranges"
        for a, b in runs[:RANGES_SHOWN]:
            yield f"          {a:#014x}-{b:#014x}  {(b - a) / 2**20:,.1f} MiB"
        if len(runs) > RANGES_SHOWN:
            yield f"          ... {len(runs) - RANGES_SHOWN} more ranges"


def extract(img: MemoryImage, out: str) -> tuple[int, int]:
    """Write ``img``'s guest-physical memory to ``out`` (created 0600) as a flat raw file,
    byte k = GPA k, holes left sparse; returns (guest bytes written, file size)."""
    written = end = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for seg in img.segments():
            ext = seg.extents
            for k in np.flatnonzero(ext.space == GPA_SPACE).tolist():
                b, a, n = int(ext.buf_offset[k]), int(ext.addr[k]), int(ext.length[k])
                os.pwrite(fd, seg.data[b : b + n], a)
                written += n
                end = max(end, a + n)
        os.ftruncate(fd, end)
    finally:
        os.close(fd)
    return written, end
