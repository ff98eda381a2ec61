"""TEST-ONLY writer of VMware checkpoints (.vmss/.vmsn) and .vmem files.

Follows the layout documented in ``docs/formats.md`` §10 and §13 (crash ``vmware_vmss.[ch]``,
volatility 2/3, LeechCore): 12-byte header, 80-byte group entries, tags ending with a zero u16,
blocks with 4- or 8-byte size fields and ``padsize`` padding, the ``memory`` group's region
tags, and memory either in a ``.vmem`` or embedded as the ``Memory[0][0]`` block. Memory is
written sparse: only the planted bytes are stored, so fixtures of hundreds of MiB cost nothing.
Not product code: nothing in ``parsers/`` imports it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

PAGE = 4096

MAGIC_CURRENT = 0xBED2BED2
MAGIC_PARTIAL = 0xBED3BED3
MAGIC_RESTORED = 0xBAD1BAD1
MAGIC_NORESTORE = 0xBAD2BAD2
MAGIC_RESTORED_JOYENT = 0xBED1BED1
MAGIC_OLD = 0xBED0BED0
MAGIC_V0 = 0xBED2BED0
ALL_MAGICS = (
    MAGIC_CURRENT,
    MAGIC_PARTIAL,
    MAGIC_RESTORED,
    MAGIC_NORESTORE,
    MAGIC_RESTORED_JOYENT,
    MAGIC_OLD,
    MAGIC_V0,
)


def width_of(magic: int) -> int:
    """Bytes of a block size field: 4 for the "version 0" magics (low nibble 0), else 8."""
    return 4 if magic & 0xF == 0 else 8


@dataclass
class Region:
    """GPA page ``ppn`` .. ``ppn+pages`` is at page ``pagenum`` of the memory data."""

    ppn: int
    pagenum: int
    pages: int


def pci_hole_layout(low_pages: int, high_pages: int, high_ppn: int = 0x100000) -> list[Region]:
    """The usual x86 layout: RAM from GPA 0, a hole, the rest from ``high_ppn`` (4 GiB)."""
    return [Region(0, 0, low_pages), Region(high_ppn, low_pages, high_pages)]


@dataclass
class Value:
    """A tag with a plain value of 1..61 bytes."""

    name: str
    indices: tuple[int, ...]
    data: bytes


@dataclass
class Block:
    """A block tag: ``data`` bytes, or ``size`` sparse bytes with ``plants`` {offset: bytes}.
    ``align`` pads so the data starts at a multiple of ``align`` in the file (padsize)."""

    name: str
    indices: tuple[int, ...]
    data: bytes = b""
    size: int | None = None
    plants: dict[int, bytes] = field(default_factory=dict)
    pad: int = 0
    align: int = 0
    compressed: bool = False
    mem_size: int | None = None

    @property
    def length(self) -> int:
        return len(self.data) if self.size is None else self.size


def u32(name: str, value: int, *indices: int) -> Value:
    return Value(name, tuple(indices), struct.pack("<I", value))


def u64(name: str, value: int, *indices: int) -> Value:
    return Value(name, tuple(indices), struct.pack("<Q", value))


def memory_group(regions: list[Region] | None, memory: Block | None = None) -> list:
    """The ``memory`` group: align_mask, regionsCount and the region tags (all u32 values,
    as every reader expects), then the embedded Memory block when given (last, as LeechCore's
    inline-memory heuristic needs)."""
    tags: list = [u32("align_mask", 0xFFFF)]
    regions = regions or []
    tags.append(u32("regionsCount", len(regions)))
    for i, r in enumerate(regions):
        tags += [
            u32("regionPageNum", r.pagenum, i),
            u32("regionPPN", r.ppn, i),
            u32("regionSize", r.pages, i),
        ]
    if memory is not None:
        tags.append(memory)
    return tags


def _tag_head(name: str, indices: tuple[int, ...], valsize: int) -> bytes:
    raw = name.encode("ascii")
    assert len(raw) < 256 and len(indices) <= 3 and 0 <= valsize <= 63
    return (
        bytes([(len(indices) << 6) | valsize, len(raw)])
        + raw
        + struct.pack(f"<{len(indices)}I", *indices)
    )


def write_checkpoint(
    path: str | os.PathLike,
    groups: list[tuple[str, list]],
    *,
    magic: int = MAGIC_CURRENT,
    version: int = 0,
) -> dict[str, int]:
    """Write a checkpoint with ``groups`` [(name, [Value | Block, ...])] and return
    {"<group>/<tag>[i][j]": file offset of that block's data} for every block written."""
    width = width_of(magic)
    sizefmt = "<IIH" if width == 4 else "<QQH"
    table_at = 12
    pos = table_at + 80 * len(groups)
    offsets: dict[str, int] = {}
    entries = []
    with open(path, "wb") as fh:
        fh.write(struct.pack("<III", magic, version, len(groups)))
        fh.write(b"\0" * (80 * len(groups)))
        for gname, tags in groups:
            start = pos
            for tag in tags:
                if isinstance(tag, Value):
                    blob = _tag_head(tag.name, tag.indices, len(tag.data)) + tag.data
                    fh.write(blob)
                    pos += len(blob)
                    continue
                head = _tag_head(tag.name, tag.indices, 62 if tag.compressed else 63)
                after = pos + len(head) + struct.calcsize(sizefmt)
                pad = tag.pad
                if tag.align:
                    pad += (-(after + pad)) % tag.align
                mem = tag.length if tag.mem_size is None else tag.mem_size
                blob = head + struct.pack(sizefmt, tag.length, mem, pad) + b"\0" * pad
                fh.write(blob)
                pos += len(blob)
                label = f"{gname}/{tag.name}" + "".join(f"[{i}]" for i in tag.indices)
                offsets[label] = pos
                if tag.size is None:
                    fh.write(tag.data)
                else:
                    for off, data in tag.plants.items():
                        fh.seek(pos + off)
                        fh.write(data)
                    fh.seek(pos + tag.length)
                pos += tag.length
            fh.write(b"\0\0")  # end of the group's tags
            pos += 2
            entries.append((gname, start, pos - start))
        fh.truncate(pos)
        fh.seek(table_at)
        for gname, start, size in entries:
            fh.write(struct.pack("<64sQQ", gname.encode("ascii"), start, size))
    return offsets


def write_vmem(path: str | os.PathLike, size: int, plants: dict[int, bytes]) -> None:
    """A sparse memory file of ``size`` bytes with ``plants`` {data offset: bytes}."""
    with open(path, "wb") as fh:
        for off, data in plants.items():
            fh.seek(off)
            fh.write(data)
        fh.truncate(size)


def write_vmx(path: str | os.PathLike, display_name: str, uuid_bios: str, **extra: str) -> None:
    lines = [
        '.encoding = "UTF-8"',
        'config.version = "8"',
        f'displayName = "{display_name}"',
        f'uuid.bios = "{uuid_bios}"',
    ]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def gpa_to_data(regions: list[Region] | None, gpa: int) -> int:
    """Offset in the memory data of ``gpa`` under ``regions`` (flat when None/empty)."""
    if not regions:
        return gpa
    for r in regions:
        if r.ppn * PAGE <= gpa < (r.ppn + r.pages) * PAGE:
            return r.pagenum * PAGE + gpa - r.ppn * PAGE
    raise ValueError(f"GPA {gpa:#x} is in no region")


def standard_groups(
    regions: list[Region] | None,
    memory: Block | None = None,
    *,
    screenshot: bytes | None = None,
    padded_block_in_memory_group: int = 0,
    platform: int | None = None,
    mem_mib: int | None = None,
) -> list[tuple[str, list]]:
    """Groups like a real checkpoint's: Checkpoint (a version, memSize/Platform), cpu,
    memory, and MKSVMX with a screenshot block when given. ``padded_block_in_memory_group``
    puts a small block with that ``padsize`` before the region tags (crash honours padsize,
    volatility3 ignores it)."""
    ckpt = [u32("version", 8)]
    if mem_mib is not None:
        ckpt.append(u32("memSize", mem_mib))
    if platform is not None:
        ckpt.append(u32("Platform", platform))
    cpu = [
        u32("cpu:numVCPUs", 1),
        u64("rip", 0xFFFFFFFF81000000, 0),
        Block("gpregs", (0,), data=bytes(range(128))),
    ]
    mem = memory_group(regions, memory)
    if padded_block_in_memory_group:
        mem.insert(0, Block("hotplug", (), data=b"\x01" * 24, pad=padded_block_in_memory_group))
    groups = [("Checkpoint", ckpt), ("cpu", cpu), ("memory", mem)]
    if screenshot is not None:
        groups.append(("MKSVMX", [u32("width", 640), Block("imageData", (), data=screenshot)]))
    return groups


TINY_PNG = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(13) + b"fake-image-data"


def make_vm(
    directory: str | os.PathLike,
    stem: str,
    *,
    memory_size: int,
    plants: dict[int, bytes],
    regions: list[Region] | None,
    magic: int = MAGIC_CURRENT,
    ext: str = ".vmss",
    embedded: bool = False,
    with_checkpoint: bool = True,
    padded_block_in_memory_group: int = 0,
    screenshot: bytes | None = TINY_PNG,
    vmx: tuple[str, str] | None = None,
    platform: int | None = None,
) -> dict[str, str | int | None]:
    """Write one VM memory state in ``directory``.

    ``plants`` are {GPA: bytes}, placed in the memory data through ``regions``. Returns
    {"checkpoint", "vmem", "vmx" (paths or None), "memory_base" (file offset of the memory
    data in the file holding it)}.
    """
    directory = os.fspath(directory)
    data_plants = {gpa_to_data(regions, g): b for g, b in plants.items()}
    out: dict[str, str | int | None] = {
        "checkpoint": None,
        "vmem": None,
        "vmx": None,
        "memory_base": 0,
    }
    memory = None
    if embedded:
        memory = Block("Memory", (0, 0), size=memory_size, plants=data_plants, align=PAGE)
    else:
        vmem = os.path.join(directory, stem + ".vmem")
        write_vmem(vmem, memory_size, data_plants)
        out["vmem"] = vmem
    if with_checkpoint:
        ck = os.path.join(directory, stem + ext)
        offsets = write_checkpoint(
            ck,
            standard_groups(
                regions,
                memory,
                screenshot=screenshot,
                padded_block_in_memory_group=padded_block_in_memory_group,
                platform=platform,
                mem_mib=memory_size >> 20,
            ),
            magic=magic,
        )
        out["checkpoint"] = ck
        if embedded:
            out["memory_base"] = offsets["memory/Memory[0][0]"]
    if vmx is not None:
        vpath = os.path.join(directory, stem.split("-")[0] + ".vmx")
        write_vmx(vpath, *vmx)
        out["vmx"] = vpath
    return out
