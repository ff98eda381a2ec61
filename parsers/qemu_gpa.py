"""Where QEMU RAMBlocks sit in guest-physical memory.

A QEMU migration stream addresses pages by (RAMBlock name, byte offset inside the block); it
never says which guest-physical address (GPA) a block offset is. The mapping is a property of
the machine type, the RAM size and a few options; this module reconstructs it the way QEMU's
board code lays out main RAM (``docs/formats.md`` §4.8):

- x86 ``pc`` (i440fx): below/above-4 GiB split at 3.5 GiB or, for RAM >= 3.5 GiB on machine
  types newer than 1.7 (gigabyte alignment), at 3 GiB (``hw/i386/pc_piix.c``);
- x86 ``q35``: split at 2 GiB when RAM >= 2.75 GiB (newer than 1.7), else 2.75 GiB
  (``hw/i386/pc_q35.c``); both capped by ``max-ram-below-4g``;
- arm ``virt``: ``mach-virt.ram`` contiguous from 1 GiB (``hw/arm/virt.c``);
- NUMA guests: the main RAM is a container of backend blocks (libvirt names them
  ``ram-node0``, ``ram-node1``, ...) packed back to back in node order, then split as above.

Every other block (VGA RAM, ROMs, ACPI tables, firmware) has no GPA we can derive from the
stream; callers report it in a named address space ``block:<name>`` at its block offset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1 << 30
FOUR_GIB = 4 * GIB
ARM_VIRT_RAM_BASE = 0x40000000  # VIRT_MEM base in hw/arm/virt.c
PC_DEFAULT_MAX_BELOW_4G = 0xE0000000  # pc_piix.c default max-ram-below-4g (3.5 GiB)
Q35_DEFAULT_MAX_BELOW_4G = FOUR_GIB  # q35 default: no cap
AMD_HT_HOLE_START = 0xFD00000000  # above-4G RAM reaching this may be moved to 1 TiB (AMD, >= 7.1)

_NODE_RE = re.compile(r"^ram-node(\d+)$")
_VERSION_RE = re.compile(r"(\d+)\.(\d+)")


@dataclass(frozen=True)
class Piece:
    """A contiguous run of a RAMBlock with a GPA: block offsets [start, start+length) map to
    GPAs [gpa, gpa+length). All in bytes."""

    start: int
    length: int
    gpa: int


@dataclass
class Layout:
    """The GPA layout of a guest's RAM blocks.

    ``pieces`` maps a block name to its GPA pieces (absent: the block has no GPA);
    ``family`` is the machine family recognised (``pc``, ``q35``, ``virt`` or ``unknown``);
    ``main_ram`` the main-RAM size in bytes; ``notes`` says where the layout is a guess.
    """

    pieces: dict[str, list[Piece]]
    family: str
    main_ram: int
    notes: list[str]


def machine_family(machine: str) -> tuple[str, tuple[int, int] | None]:
    """(family, (major, minor) or None) of a resolved QEMU machine type name.

    ``pc-i440fx-7.2``, ``pc-1.7`` and ``pc`` are ``pc``; ``pc-q35-8.2`` / ``q35`` are ``q35``;
    ``virt-9.0`` / ``virt`` are ``virt``. Distro types (``pc-q35-rhel9.4.0``) count as modern:
    their version number is a RHEL release, not a QEMU one, so it is not returned.
    """
    m = machine.strip().lower()
    if m == "q35" or m.startswith("pc-q35"):
        family = "q35"
    elif m == "pc" or m.startswith(("pc-i440fx", "pc-")):
        family = "pc"
    elif m == "virt" or m.startswith("virt-"):
        family = "virt"
    else:
        return "unknown", None
    ver = _VERSION_RE.search(m)
    if ver is None or "rhel" in m:
        return family, None
    return family, (int(ver.group(1)), int(ver.group(2)))


def _x86_split(
    family: str, version: tuple[int, int] | None, ram: int, max_below_4g: int | None
) -> int:
    """Bytes of main RAM mapped below 4 GiB (the rest starts at 4 GiB)."""
    gigabyte_align = version is None or version > (1, 7)
    if family == "pc":
        cap = max_below_4g or PC_DEFAULT_MAX_BELOW_4G
        lowmem = cap
        if ram >= cap and gigabyte_align:
            lowmem = min(lowmem, 0xC0000000)
    else:
        lowmem = 0x80000000 if ram >= 0xB0000000 and gigabyte_align else 0xB0000000
        lowmem = min(lowmem, max_below_4g or Q35_DEFAULT_MAX_BELOW_4G)
    return lowmem if ram >= lowmem else ram


def main_ram_blocks(blocks: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The blocks that together form main RAM, in container order.

    ``pc.ram`` / ``mach-virt.ram`` when present; otherwise the NUMA backends ``ram-nodeN``
    sorted by N (QEMU packs node memory back to back in node order).
    """
    for name, size in blocks:
        if name in ("pc.ram", "mach-virt.ram"):
            return [(name, size)]
    nodes = [(int(m.group(1)), name, size) for name, size in blocks if (m := _NODE_RE.match(name))]
    return [(name, size) for _, name, size in sorted(nodes)]


def layout(
    machine: str, blocks: list[tuple[str, int]], max_ram_below_4g: int | None = None
) -> Layout:
    """GPA layout for ``blocks`` (name, used_length in bytes) of a guest of type ``machine``.

    ``max_ram_below_4g`` is the ``-machine max-ram-below-4g=`` value in bytes when known
    (None: the machine default).
    """
    family, version = machine_family(machine)
    notes: list[str] = []
    ram_blocks = main_ram_blocks(blocks)
    if family == "virt":
        ram_blocks = [(n, s) for n, s in ram_blocks if n != "pc.ram"]
    elif family in ("pc", "q35"):
        ram_blocks = [(n, s) for n, s in ram_blocks if n != "mach-virt.ram"]
    ram = sum(size for _, size in ram_blocks)
    pieces: dict[str, list[Piece]] = {}
    if family == "unknown" or not ram_blocks:
        if family == "unknown":
            notes.append(f"machine type {machine!r} unknown: every RAM block reported by name")
        return Layout(pieces, family, ram, notes)
    if family == "virt":
        below, above_start = ram, 0  # one contiguous run from 1 GiB
        base = ARM_VIRT_RAM_BASE
    else:
        below = _x86_split(family, version, ram, max_ram_below_4g)
        above_start = FOUR_GIB
        base = 0
        if ram > below and above_start + ram - below > AMD_HT_HOLE_START:
            notes.append(
                "RAM above 4 GiB reaches the AMD HyperTransport hole: QEMU >= 7.1 moves it to "
                "1 TiB for AMD vCPUs; assumed an Intel vCPU (RAM kept at 4 GiB)"
            )
    container = 0  # offset of the current block inside the main-RAM container
    for name, size in ram_blocks:
        out = []
        lo_end = min(size, max(0, below - container))  # block bytes below the split
        if lo_end > 0:
            out.append(Piece(0, lo_end, base + container))
        if size > lo_end:
            out.append(Piece(lo_end, size - lo_end, above_start + container + lo_end - below))
        pieces[name] = out
        container += size
    return Layout(pieces, family, ram, notes)
