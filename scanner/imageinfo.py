"""What ``vmleak info`` shows of an image and how ``vmleak extract`` writes its
guest-physical memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from parsers.base import (
    GPA_SPACE,
    ImageError,
    MemoryImage,
    Ranges,
    is_damage,
    mib,
    region_kind,
)
from scanner.dormant import file_mtime

RANGES_SHOWN = 16  # merged address ranges listed per address space by info


def fmt_meta(v: object) -> str:
    """A metadata value for people (sizes of 1 MiB and more also in MiB, lists one a line)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20:
        return f"{v} ({v / 2**20:,.0f} MiB)"
    if isinstance(v, list | tuple):
        return "\n          ".join(str(x) for x in v) if v else "-"
    return str(v)


def info_lines(img: MemoryImage) -> Iterator[str]:
    """The lines of ``vmleak info``: format, files, metadata, extents, what the image declares
    against what was read, bytes per file, then its problems: ``error:`` lines for damaged
    parts (see :func:`problems`), ``warning:`` lines for remarks. A compressed stream is read
    through first (its size and damage are known only at its end)."""
    per_file = file_bytes(img)
    yield f"image:    {img.path}"
    yield f"format:   {img.format}"
    yield f"files:    {', '.join(img.files)}"
    for k, v in img.meta.items():
        if k not in ("coverage", "unrecognised"):
            yield f"{k + ':':<9} {fmt_meta(v)}"
    if img.random_access:
        yield from extent_lines(img)
    else:
        yield "extents:  streamed (compressed); mapped while scanning"
    yield from coverage_lines(img, per_file)
    for w in img.warnings:
        yield f"{'error:' if is_damage(w) else 'warning:':<9} {w}"


DECOMPRESSED = " (decompressed)"  # suffix of a kind counted in decoded bytes, not file bytes


def file_bytes(img: MemoryImage) -> dict[str, dict[str, int]]:
    """Per file of ``img``, in bytes: ``"guest"``, the file bytes holding guest memory
    stored plainly (``file_offset`` set; bytes shared by several pages once); ``"guest
    (decompressed)"``, guest memory decoded from compressed data (decoded bytes, not file
    bytes); each region kind likewise, ``"<kind>"`` file bytes, ``"<kind> (decompressed)"``
    bytes of a decompressed stream. The plain figures of all files and the image's structure
    bytes (``coverage.structure``) add up to the files' sizes. A stream is read through; an
    error that stops the reading joins ``img.warnings``."""
    plain: dict[str, dict[str, Ranges]] = {}
    decoded: dict[str, dict[str, int]] = {}
    try:
        for seg in img.segments():
            path = seg.file or img.path
            ext = seg.extents
            plain.setdefault(path, {})
            decoded.setdefault(path, {})
            stored = ext.file_offset >= 0
            for sp in np.unique(ext.space).tolist():
                name = img.spaces[sp]
                kind = region_kind(name) or "guest"
                here = ext.space == sp
                pick = here & stored
                if pick.any():
                    first = ext.file_offset[pick]
                    plain[path].setdefault(kind, Ranges()).add(
                        first, first + ext.length[pick])
                n = int(ext.length[here & ~stored].sum())
                if n:
                    row = decoded[path]
                    row[kind + DECOMPRESSED] = row.get(kind + DECOMPRESSED, 0) + n
    except ImageError as err:  # damaged further on: what came before is still shown
        img.warnings.append(err)
    return {path: {**{k: r.total() for k, r in kinds.items()}, **decoded[path]}
            for path, kinds in plain.items()}


def coverage_lines(img: MemoryImage, per_file: dict[str, dict[str, int]]) -> Iterator[str]:
    """Declared against read guest memory, what the format leaves out on purpose, per file
    the bytes of guest memory stored plainly, decoded from compressed data, and those outside
    it scanned anyway, then the structure bytes: the plain figures and the structure add up
    to the files' sizes."""
    cov = img.coverage
    if img.meta.get("unrecognised"):
        yield ("scanned:  as raw memory only because no known format was recognised "
               "(addresses are file offsets)")
    yield f"memory:   {coverage_text(cov.to_dict())}"
    for path, row in per_file.items():
        outside = {k: n for k, n in row.items() if not k.startswith("guest")}
        kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(outside.items()))
        unpacked = row.get("guest" + DECOMPRESSED, 0)
        yield (f"file:     {path}: guest memory stored plainly {mib(row.get('guest', 0))}"
               + (f"; decoded from compressed data {mib(unpacked)}" if unpacked else "")
               + f"; outside it, scanned anyway: {mib(sum(outside.values()))}"
               + (f" ({kinds})" if kinds else ""))
    if cov.structure:
        yield (f"structure: {mib(cov.structure)} of the format's structure and compressed data,"
               " decoded, not scanned as stored")


def coverage_text(cov: dict[str, Any]) -> str:
    """One line of what an image declares against what was read (``Coverage.to_dict``)."""
    if cov.get("declared") is None:
        text = f"{mib(cov['read'])} of guest memory read (the format declares no size)"
    else:
        text = (f"{mib(cov['declared'])} of guest memory declared by "
                f"{cov.get('declared_by') or 'the image'}, {mib(cov['read'])} read")
    if cov.get("missing"):
        text += f", {mib(cov['missing'])} missing (damaged or truncated)"
    if cov.get("excluded"):
        text += f", {mib(cov['excluded'])} excluded on purpose ({cov.get('excluded_why')})"
    return text + f"; {mib(cov.get('outside', 0))} outside guest memory scanned anyway"


def problems(img: MemoryImage) -> list[ImageError]:
    """The damaged or unreadable parts of ``img`` (exit status 2), remarks left out."""
    return [w for w in img.warnings if is_damage(w)]


def info_json(img: MemoryImage) -> dict[str, Any]:
    """What ``vmleak info --format json`` prints: format, files, metadata (``coverage``:
    declared against read guest memory), guest memory and region bytes per file, errors
    (damaged parts), warnings (remarks), and ``guest_clock`` / ``file_mtime`` (ISO-8601 UTC or
    null). A compressed stream holds its device state (the guest clock) at its end, so it is
    read through first."""
    per_file = file_bytes(img)
    meta = dict(img.meta)
    return {
        "image": img.path,
        "format": img.format,
        "files": list(img.files),
        "guest_clock": meta.pop("guest_clock", None),
        "file_mtime": file_mtime(img.path),
        "meta": meta,
        "bytes_per_file": per_file,
        "errors": [str(w) for w in problems(img)],
        "warnings": [str(w) for w in img.warnings if not is_damage(w)],
    }


def extent_lines(img: MemoryImage) -> Iterator[str]:
    """Per address space of a random-access image: extents, bytes, merged ranges (the first
    ``RANGES_SHOWN`` listed)."""
    segs = img.fixed_segments or []
    for space_id, space in enumerate(img.spaces):
        ranges, count, total = Ranges(), 0, 0
        for seg in segs:
            e = seg.extents
            here = e.space == space_id
            ranges.add(e.addr[here], e.addr[here] + e.length[here])
            count += int(np.count_nonzero(here))
            total += int(e.length[here].sum())
        if not count:
            continue
        runs = ranges.pairs()
        label = "GPA" if space_id == GPA_SPACE else space
        yield f"extents:  {label}: {count} extents, {total:,} bytes, {len(runs)} ranges"
        for a, b in runs[:RANGES_SHOWN]:
            yield f"          {a:#014x}-{b:#014x}  {(b - a) / 2**20:,.1f} MiB"
        if len(runs) > RANGES_SHOWN:
            yield f"          ... {len(runs) - RANGES_SHOWN} more ranges"


def extract(img: MemoryImage, out: str) -> tuple[int, int]:
    """Write ``img``'s guest-physical memory to ``out`` (created 0600) as a flat raw file,
    byte k = GPA k, holes left sparse; returns (guest bytes written, file size). An error that
    stops the reading joins ``img.warnings`` after what came before it was written."""
    written = end = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            for seg in img.segments():
                ext = seg.extents
                for k in np.flatnonzero(ext.space == GPA_SPACE).tolist():
                    b, a, n = int(ext.buf_offset[k]), int(ext.addr[k]), int(ext.length[k])
                    os.pwrite(fd, seg.data[b : b + n], a)
                    written += n
                    end = max(end, a + n)
        except ImageError as err:  # damaged further on: what came before is written
            img.warnings.append(err)
        os.ftruncate(fd, end)
    finally:
        os.close(fd)
    return written, end
