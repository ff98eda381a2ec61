"""ELF core files holding guest-physical memory: QEMU ``dump-guest-memory`` (format elf),
``virsh dump --memory-only``, VirtualBox ``dumpvmcore``.

Every PT_LOAD program header maps ``p_filesz`` bytes at file offset ``p_offset`` to the
guest-physical addresses ``p_paddr ...``. The whole file is mmapped once and each PT_LOAD
becomes an extent of that one segment (zero copy). ELF32 and ELF64, either byte order; the
PN_XNUM escape for 65535+ program headers; PT_LOADs that store fewer bytes than they map
(``p_filesz < p_memsz``) or none (``p_offset = -1``, outside a dump filter); and several
PT_LOADs for the same physical bytes (paging dumps), which are kept once.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

from parsers import clock
from parsers.base import (
    GPA_SPACE,
    MAX_GPA,
    Evidence,
    Extents,
    ImageError,
    MemoryImage,
    Remark,
    Segment,
    file_regions,
)

FORMATS = ["elf-core"]

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF  # e_phnum escape: the real count is sh_info of section header 0
NT_PRSTATUS = 1

# e_ident is 16 bytes: magic, class, data (byte order), version, OS ABI, padding.
IDENT = struct.Struct("4s B B B 9x")

# The rest of the ELF header, after e_ident; "{a}" is the address size (I for ELF32, Q for 64).
EHDR_REST = (
    "H"  # e_type: ET_CORE (4) for a core file
    "H"  # e_machine: EM_386 3, EM_X86_64 62, EM_AARCH64 183, ...
    "I"  # e_version
    "{a}"  # e_entry
    "{a}"  # e_phoff: file offset of the program header table
    "{a}"  # e_shoff: file offset of the section header table (PN_XNUM needs it)
    "I"  # e_flags
    "H"  # e_ehsize (QEMU 7.2 writes a wrong value here; not relied on)
    "H"  # e_phentsize: size of one program header
    "H"  # e_phnum: number of program headers, or PN_XNUM
    "H"  # e_shentsize
    "H"  # e_shnum
    "H"  # e_shstrndx
)

# Program headers as numpy dtypes (byte order applied at run time with newbyteorder).
PHDR64 = np.dtype(
    [
        ("p_type", "u4"),  # PT_LOAD 1, PT_NOTE 4
        ("p_flags", "u4"),
        ("p_offset", "u8"),  # file offset of the stored bytes; all ones = not stored
        ("p_vaddr", "u8"),  # guest-virtual address (paging dumps), else = p_paddr
        ("p_paddr", "u8"),  # guest-physical address (GPA) of the first byte
        ("p_filesz", "u8"),  # bytes stored in the file
        ("p_memsz", "u8"),  # bytes the mapping covers in the guest (>= p_filesz)
        ("p_align", "u8"),
    ]
)
PHDR32 = np.dtype(
    [
        ("p_type", "u4"),
        ("p_offset", "u4"),
        ("p_vaddr", "u4"),
        ("p_paddr", "u4"),
        ("p_filesz", "u4"),
        ("p_memsz", "u4"),
        ("p_flags", "u4"),
        ("p_align", "u4"),
    ]
)

# Section header fields up to sh_info (only section 0's sh_info is read, for PN_XNUM).
SHDR_HEAD = (
    "I"  # sh_name
    "I"  # sh_type
    "{a}"  # sh_flags
    "{a}"  # sh_addr
    "{a}"  # sh_offset
    "{a}"  # sh_size
    "I"  # sh_link
    "I"  # sh_info: the real e_phnum when e_phnum == PN_XNUM
)

# Note header: namesz, descsz, type; name and desc follow, each padded to 4 bytes (Linux and
# QEMU pad core notes to 4 in ELF64 too).
NHDR = "III"

MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 20: "ppc", 21: "ppc64",
            22: "s390", 243: "riscv", 8: "mips", 258: "loongarch"}  # fmt: skip

MAX_NOTE_BYTES = 16 << 20  # notes read for metadata only; a bigger PT_NOTE is skipped
PAGE = 4096  # an unexplained gap this long between segments is damage, not alignment


def probe(head: bytes, path: str) -> str | None:
    """``elf-core`` when ``head`` is an ELF header of type ET_CORE (either class/byte order)."""
    if len(head) < 18 or head[:4] != ELF_MAGIC:
        return None
    cls, data = head[4], head[5]
    if cls not in (ELFCLASS32, ELFCLASS64) or data not in (ELFDATA2LSB, ELFDATA2MSB):
        return None
    e_type = struct.unpack_from("<H" if data == ELFDATA2LSB else ">H", head, 16)[0]
    return "elf-core" if e_type == ET_CORE else None


def open_image(path: str, fmt: str, options: dict[str, Any]) -> MemoryImage:
    """Read the ELF and program headers of ``path`` and map every PT_LOAD's stored bytes as an
    extent (GPA = p_paddr + k) of one mmapped segment. Raises ImageError for a file that is
    not an ELF core with memory; damaged PT_LOADs become warnings and are left out."""
    with Evidence(path).closed_on_error() as ev:
        image = _parse(ev, path)
    image.closers.append(ev.close)
    return image


def _parse(ev: Evidence, path: str) -> MemoryImage:
    magic, cls, data, _version = IDENT.unpack(ev.need(0, IDENT.size, "ELF identification"))
    if magic != ELF_MAGIC:
        raise ImageError(path, 0, "not an ELF file (no \\x7fELF magic)")
    if cls not in (ELFCLASS32, ELFCLASS64):
        raise ImageError(path, 4, f"unknown ELF class {cls}")
    if data not in (ELFDATA2LSB, ELFDATA2MSB):
        raise ImageError(path, 5, f"unknown ELF byte order {data}")
    order = "<" if data == ELFDATA2LSB else ">"
    addr = "I" if cls == ELFCLASS32 else "Q"
    ehdr = struct.Struct(order + EHDR_REST.format(a=addr))
    (e_type, e_machine, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize,
     e_shnum, _) = ehdr.unpack(ev.need(IDENT.size, ehdr.size, "ELF header"))  # fmt: skip
    if e_type != ET_CORE:
        raise ImageError(path, 16, f"ELF type {e_type} is not a core file (ET_CORE = 4)")
    phdr_dtype = (PHDR32 if cls == ELFCLASS32 else PHDR64).newbyteorder(order)
    if e_phentsize != phdr_dtype.itemsize:
        raise ImageError(
            path, 16, f"program header size {e_phentsize}, expected {phdr_dtype.itemsize}"
        )
    phnum = e_phnum
    if e_phnum == PN_XNUM:
        # 65535+ headers: the count lives in section header 0 (QEMU writes exactly one).
        shdr = struct.Struct(order + SHDR_HEAD.format(a=addr))
        if e_shnum < 1 or e_shentsize < shdr.size:
            raise ImageError(path, e_shoff, "e_phnum is PN_XNUM but there is no section header")
        phnum = shdr.unpack(ev.need(e_shoff, shdr.size, "section header 0 (PN_XNUM)"))[-1]
    table_size = phnum * phdr_dtype.itemsize
    if e_phoff + table_size > ev.size:
        raise ImageError(
            path, e_phoff, f"truncated: {phnum} program headers ({table_size} bytes) past EOF"
        )
    phdrs = np.frombuffer(ev.data, phdr_dtype, count=phnum, offset=e_phoff)

    image = MemoryImage(path=path, format="elf-core", files=[path])
    image.meta = {
        "elf_class": 32 if cls == ELFCLASS32 else 64,
        "byte_order": "little" if order == "<" else "big",
        "machine": MACHINES.get(e_machine, f"e_machine {e_machine}"),
        "program_headers": int(phnum),
    }
    unstored = 0xFFFFFFFF if cls == ELFCLASS32 else 0xFFFFFFFFFFFFFFFF
    ext = _load_extents(ev, path, image, phdrs, e_phoff, unstored)
    _read_notes(ev, path, image, phdrs, e_phoff, order)
    image.meta["stored_bytes"] = ext.total()
    table_end = e_phoff + table_size
    if e_phnum == PN_XNUM:
        table_end = max(table_end, e_shoff + e_shentsize * e_shnum)
    regions = _regions(ev, image, phdrs, ext, table_end, e_phoff, unstored)
    image.coverage.read = ext.total()
    image.coverage.outside = regions.total()
    image.coverage.structure = ev.size - ext.total() - regions.total()
    image.fixed_segments = [Segment(ev.data, Extents.concat(ext, regions), path)]
    image.check_coverage()
    return image


def _regions(
    ev: Evidence,
    image: MemoryImage,
    phdrs: np.ndarray,
    ext: Extents,
    table_end: int,
    phoff: int,
    unstored: int,
) -> Extents:
    """The file's bytes outside guest memory, as ``region:*`` extents at their file offsets:
    the ELF header and program header table (``header``), the notes (``metadata``), bytes
    after the last thing a header points at (``trailing``) and gaps between them
    (``unreferenced``). A program header that is neither PT_LOAD nor PT_NOTE yet stores data,
    or a gap of a page or more between segments, is damage (a PT_LOAD turned into something
    else): an error, and its bytes are scanned without GPA."""
    size = ev.size
    spans = [("header", 0, table_end)]
    entsize = phdrs.dtype.itemsize
    for i, h in enumerate(phdrs.tolist()):
        ptype, off, filesz = h[0], int(phdrs["p_offset"][i]), int(phdrs["p_filesz"][i])
        if off == unstored or filesz == 0 or off >= size:
            continue
        if ptype == PT_NOTE:
            spans.append(("metadata", off, min(size, off + filesz)))
        elif ptype != PT_LOAD:
            image.warnings.append(
                ImageError(
                    image.path,
                    phoff + i * entsize,
                    f"program header {i} has type {ptype} yet stores {filesz:,} bytes at "
                    f"{off:#x} (a damaged PT_LOAD?): those bytes are scanned without GPA",
                )
            )
    guest = list(zip(ext.file_offset.tolist(), (ext.file_offset + ext.length).tolist(),
                     strict=True))  # fmt: skip
    pieces = file_regions(size, spans, guest)
    gaps = [(a, b) for k, a, b in pieces if k == "unreferenced"]
    gap = sum(b - a for a, b in gaps)
    damaged = any("yet stores" in w.message for w in image.warnings)
    if gap >= PAGE and not damaged:
        image.warnings.append(
            ImageError(
                image.path,
                gaps[0][0],
                f"{gap:,} bytes between the segments belong to no program header "
                "(damaged headers?): scanned without GPA",
            )
        )
    return image.region_extents(pieces)


def _load_extents(
    ev: Evidence, path: str, image: MemoryImage, phdrs: np.ndarray, phoff: int, unstored: int
) -> Extents:
    """Extents (file offset -> GPA) of the bytes the PT_LOADs store, overlaps kept once.
    A core without any physical address gets its virtual addresses, in space 'virtual'."""
    index = np.flatnonzero(phdrs["p_type"] == PT_LOAD)
    loads = phdrs[index]
    if loads.size == 0:
        # Scanned anyway (every byte lands in a region): the error says why nothing has a GPA.
        image.warnings.append(
            ImageError(path, phoff, "ELF core has no PT_LOAD program header: no memory in it")
        )
        image.coverage.declared_by = "the PT_LOAD program headers"
        return Extents.build([], [], [])
    entsize = phdrs.dtype.itemsize
    # Python ints: the fields are unsigned 64-bit and must not wrap in the checks below.
    offset = loads["p_offset"].astype(object)
    paddr = loads["p_paddr"].astype(object)
    space = GPA_SPACE
    if loads.size > 1 and not loads["p_paddr"].any() and loads["p_vaddr"].any():
        # No physical addresses at all: a process core (gdb, kernel coredump), not a
        # guest dump. Its bytes are still scanned, addressed by virtual address.
        paddr = loads["p_vaddr"].astype(object)
        space = image.space_id("virtual")
        image.warnings.append(
            Remark(
                path,
                phoff,
                "no PT_LOAD has a physical address (a process core?): "
                "addresses reported are virtual, in address space 'virtual'",
            )
        )
    filesz = loads["p_filesz"].astype(object)
    memsz = loads["p_memsz"].astype(object)
    image.meta["pt_load"] = int(loads.size)
    image.meta["ram_size"] = _union_length(paddr, memsz)
    missing = sum(m - min(f, m) for f, m in zip(filesz, memsz, strict=True))
    if missing:
        image.meta["not_stored_bytes"] = int(missing)
    # Declared: what the PT_LOADs map; excluded on purpose: what they say is not stored
    # (p_filesz < p_memsz, p_offset = -1: a begin/length filtered dump).
    stored = np.array([min(f, m) if o != unstored else 0 for o, f, m in
                       zip(offset, filesz, memsz, strict=True)], dtype=object)  # fmt: skip
    cov = image.coverage
    cov.declared = image.meta["ram_size"]
    cov.declared_by = "the PT_LOAD program headers"
    cov.declared_at = phoff
    cov.excluded = cov.declared - _union_length(paddr, stored)
    if cov.excluded:
        cov.excluded_why = "PT_LOADs that map memory the dump does not store (a filtered dump)"
    starts, addrs, lens = [], [], []
    for i, hdr_index in enumerate(index):
        where = phoff + int(hdr_index) * entsize
        off, gpa, size = offset[i], paddr[i], min(filesz[i], memsz[i])
        if size == 0 or off == unstored:
            continue  # mapping not stored in this file (outside a dump filter)
        if gpa + size > MAX_GPA:
            image.warnings.append(
                ImageError(path, where, f"PT_LOAD at GPA {gpa:#x} is not physical memory; skipped")
            )
            continue
        if off + size > ev.size:
            kept = max(0, ev.size - off)
            image.warnings.append(
                ImageError(
                    path,
                    where,
                    f"truncated: PT_LOAD for GPA {gpa:#x} stores {size} bytes at {off:#x}, "
                    f"only {kept} are in the file",
                )
            )
            size = kept
            if size == 0:
                continue
        starts.append(off)
        addrs.append(gpa)
        lens.append(size)
    if not starts:
        if not image.warnings:
            image.warnings.append(
                ImageError(path, phoff, "no PT_LOAD stores any bytes in this file")
            )
        return Extents.build([], [], [])
    ext = _dedup(np.asarray(starts, np.int64), np.asarray(addrs, np.int64),
                 np.asarray(lens, np.int64))  # fmt: skip
    ext.space[:] = space
    return ext


def _union_length(start: np.ndarray, length: np.ndarray) -> int:
    """Bytes covered by the union of the ranges [start, start + length) (Python ints)."""
    total, end = 0, -1
    for a, n in sorted(zip(start.tolist(), length.tolist(), strict=True)):
        total += max(0, a + n - max(a, end))
        end = max(end, a + n)
    return total


def _dedup(off: np.ndarray, gpa: np.ndarray, length: np.ndarray) -> Extents:
    """Keep every guest-physical byte once: sort by GPA and trim each piece to start past the
    end of everything before it (paging dumps map the same physical page many times)."""
    order = np.lexsort((off, gpa))
    off, gpa, length = off[order], gpa[order], length[order]
    end = gpa + length
    covered = np.maximum.accumulate(end)
    prev = np.concatenate((gpa[:1], covered[:-1]))  # nothing precedes the first piece
    skip = np.clip(prev - gpa, 0, None)
    keep = skip < length
    skip, off, gpa, length = skip[keep], off[keep], gpa[keep], length[keep]
    return Extents.build(off + skip, gpa + skip, length - skip, file_offset=off + skip)


def _read_notes(
    ev: Evidence, path: str, image: MemoryImage, phdrs: np.ndarray, phoff: int, order: str
) -> None:
    """Cheap metadata from the PT_NOTE segments (see :func:`note_meta`). Bad notes are only a
    warning."""
    budget = MAX_NOTE_BYTES
    vcpus = 0
    for i in np.flatnonzero(phdrs["p_type"] == PT_NOTE):
        start, size = int(phdrs["p_offset"][i]), int(phdrs["p_filesz"][i])
        if size > budget or start + size > ev.size:
            where = phoff + int(i) * phdrs.dtype.itemsize
            image.warnings.append(
                ImageError(path, where, "PT_NOTE past end of file or too large; notes skipped")
            )
            continue
        budget -= size
        meta, bad_at = note_meta(ev.read(start, size), order)
        vcpus += meta.pop("vcpus", 0)
        image.meta.update(meta)
        if bad_at is not None:
            image.warnings.append(
                ImageError(path, start + bad_at, "ELF note runs past its PT_NOTE; rest skipped")
            )
    if vcpus:
        image.meta["vcpus"] = vcpus


def note_meta(blob: bytes, order: str) -> tuple[dict[str, Any], int | None]:
    """Metadata from a run of ELF notes (``order`` "<" or ">"): ``vcpus`` (CORE/NT_PRSTATUS
    notes) and, from a VMCOREINFO note, the guest kernel release and page size. Returns the
    metadata and the byte offset in ``blob`` of a note that runs past its end (else None)."""
    nhdr = struct.Struct(order + NHDR)
    meta: dict[str, Any] = {}
    vcpus = 0
    pos = 0
    while pos + nhdr.size <= len(blob):
        namesz, descsz, ntype = nhdr.unpack_from(blob, pos)
        name_at = pos + nhdr.size
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if end > len(blob):
            return meta, pos
        name = blob[name_at : name_at + namesz].rstrip(b"\0")
        if name == b"CORE" and ntype == NT_PRSTATUS:
            vcpus += 1
        elif name == b"VMCOREINFO":
            meta.update(vmcoreinfo_meta(blob[desc_at : desc_at + descsz]))
        pos = end
    if vcpus:
        meta["vcpus"] = vcpus
    return meta, None


def vmcoreinfo_meta(text: bytes) -> dict[str, str]:
    """The guest kernel release and page size from VMCOREINFO ``KEY=value`` lines."""
    meta = {}
    for key, name in ((b"OSRELEASE", "guest_os_release"), (b"PAGESIZE", "guest_page_size")):
        m = re.search(rb"(?m)^" + key + rb"=([^\n\0]{1,64})", text)
        if m:
            meta[name] = m.group(1).decode("ascii", "replace")
    meta.update(clock.crashtime(text))
    return meta


def _align4(n: int) -> int:
    return (n + 3) & ~3
