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
from parsers.base import ImageError, MemoryImage

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
            return mod, fmt
    raise ImageError(
        path,
        0,
        "not a recognised memory image (no known magic and not a whole number of 4 KiB "
        "pages; use --input-format raw to scan it as flat memory anyway)",
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
    return mod.open_image(path, fmt, options)


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
