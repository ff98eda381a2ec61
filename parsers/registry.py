"""Format detection by content, and opening an image with the right parser.

Each format module exposes ``FORMATS`` (the format names it writes into ``MemoryImage.format``
and accepts for ``--input-format``), ``probe(head, path) -> str | None`` (the format name if
the first bytes of the file are its magic, else None) and
``open_image(path, fmt, options) -> MemoryImage``. Modules are tried in the order listed, most
specific magic first; ``raw`` is last because flat memory has no magic.
"""

from __future__ import annotations

import os
import stat
from types import ModuleType
from typing import Any

from parsers import elf, hyperv, kdump, libvirt, lime, qcow2, qemu, raw, vbox, vmware
from parsers.base import ImageError, MemoryImage, Remark

PARSERS: list[ModuleType] = [elf, kdump, libvirt, lime, qcow2, qemu, vmware, vbox, hyperv, raw]

HEAD_BYTES = 4096  # enough for every magic we know


def formats() -> list[str]:
    """Every format name a user may force with --input-format."""
    return [f for mod in PARSERS for f in mod.FORMATS]


def detect(path: str) -> tuple[ModuleType, str]:
    """Find the parser for ``path`` by its content; ImageError when nothing recognises it."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(path, None, "is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImageError(path, None, "not a regular file")  # a FIFO would block reads
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise ImageError(path, None, exc.strerror or str(exc)) from None
    if not head:
        raise ImageError(path, 0, "empty file")
    for mod in PARSERS:
        fmt = mod.probe(head, path)
        if fmt:
            if mod is raw:
                _refuse_damaged(head, path)
            return mod, fmt
    _refuse_damaged(head, path)
    raise ImageError(
        path,
        0,
        "not a recognised memory image (no known magic and not a whole number of 4 KiB "
        "pages; use --input-format raw to scan it as flat memory anyway)",
    )


def _refuse_damaged(head: bytes, path: str) -> None:
    """A file no parser claimed but that begins with a known format's magic is that format,
    damaged or holding no memory, never flat memory: raw would report its file offsets as
    guest addresses. (A qcow2 disk without internal snapshots, say.)"""
    if head.startswith(qcow2.MAGIC):
        raise ImageError(
            path,
            0,
            "qcow2 image with no internal snapshot (nb_snapshots 0; a disk, or a damaged "
            "header): no VM memory in it (--input-format raw scans it as flat bytes anyway)",
        )
    for magic, name in KNOWN_MAGICS:
        if head.startswith(magic):
            raise ImageError(
                path,
                0,
                f"begins with the {name} magic but its header is not readable (damaged?); "
                "not scanned as raw memory (--input-format raw forces it)",
            )


#: magics whose header, when a probe declines it, means damage rather than flat memory
KNOWN_MAGICS = (
    (b"\x7fELF", "ELF"),
    (b"EMiL", "LiME"),
    (b"QEVM", "QEMU migration stream"),
    (b"LibvirtQemud", "libvirt save"),
)


def open_image(
    path: str, input_format: str | None = None, options: dict[str, Any] | None = None
) -> MemoryImage:
    """Parse ``path`` into a MemoryImage, detecting the format unless ``input_format`` forces
    one. Raises ImageError (file, offset, message) for anything unreadable."""
    options = options or {}
    if os.path.isdir(path):
        raise ImageError(path, None, "is a directory")
    if input_format:
        for mod in PARSERS:
            if input_format in mod.FORMATS:
                return mod.open_image(path, input_format, options)
        raise ImageError(path, None, f"unknown input format {input_format!r}")
    mod, fmt = detect(path)
    image = mod.open_image(path, fmt, options)
    if fmt == "raw":
        image.meta["unrecognised"] = True  # summary, info and report say so
        image.warnings.append(
            Remark(
                path,
                None,
                "no known format recognised: scanned as raw memory (address = file offset); "
                "if this is a damaged image of a known format, its addresses are file offsets",
            )
        )
    return image


def primaries(paths: list[str]) -> list[str]:
    """``paths`` without the companion files of other listed paths (a ``.vmem`` whose
    ``.vmss`` is listed too): one entry per memory state, never the same memory twice."""
    drop: set[str] = set()
    for mod in PARSERS:
        grouping = getattr(mod, "primary", None)
        if grouping:
            for group in grouping(paths):
                drop.update(group[1:])
    return [p for p in paths if p not in drop]
