"""Test-only writers of ELF cores and kdump-compressed dumps, following ``docs/formats.md`` §8-§9,
for the variants the real QEMU 7.2 here cannot write (ELF32/big-endian cores, PN_XNUM,
lzo/snappy/zstd pages, 32-bit kdump headers, incomplete dumps, odd flattened streams).

Pages and loads are given as GPA -> bytes; everything is written to a path."""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field

PAGE = 4096


def elf_note(name: bytes, ntype: int, desc: bytes, order: str = "<") -> bytes:
    """One ELF note: header, NUL-terminated name and desc, each padded to 4 bytes."""
    name += b"\0"

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack(order + "III", len(name), len(desc), ntype) + pad(name) + pad(desc)


@dataclass
class Load:
    """A PT_LOAD: ``data`` stored for GPA ``paddr`` (None = not stored, p_offset -1);
    ``memsz`` defaults to len(data)."""

    paddr: int
    data: bytes | None
    memsz: int | None = None
    vaddr: int | None = None


def write_elf(
    path: str,
    loads: list[Load],
    *,
    bits: int = 64,
    order: str = "<",
    notes: bytes = b"",
    xnum: bool = False,
    machine: int = 62,
) -> None:
    """An ET_CORE file: PT_NOTE then the PT_LOADs (in the given order); with ``xnum`` the
    count goes in section header 0 (PN_XNUM) as QEMU does for 65535+ headers."""
    a = "I" if bits == 32 else "Q"
    ehdr = struct.Struct(order + "16sHHI" + a * 3 + "IHHHHHH")
    phdr = struct.Struct(order + ("IIIIIIII" if bits == 32 else "IIQQQQQQ"))
    shdr = struct.Struct(order + "II" + a * 4 + "II" + a * 2)
    phnum = 1 + len(loads)
    phoff = ehdr.size
    shoff = phoff + phnum * phdr.size if xnum else 0
    pos = phoff + phnum * phdr.size + (shdr.size if xnum else 0)
    note_off = pos
    pos += len(notes)
    body = bytearray()
    table = []
    unstored = (1 << bits) - 1
    for ld in loads:
        memsz = ld.memsz if ld.memsz is not None else len(ld.data or b"")
        vaddr = ld.vaddr if ld.vaddr is not None else ld.paddr
        if ld.data is None:
            table.append((unstored, vaddr, ld.paddr, 0, memsz))
        else:
            table.append((pos + len(body), vaddr, ld.paddr, len(ld.data), memsz))
            body += ld.data
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if order == "<" else 2, 1])
    out = bytearray(
        ehdr.pack(ident.ljust(16, b"\0"), 4, machine, 1, 0, phoff, shoff, 0, ehdr.size,
                  phdr.size, 0xFFFF if xnum else phnum, shdr.size, 1 if xnum else 0, 0)
    )  # fmt: skip

    def ph(ptype: int, off: int, vaddr: int, paddr: int, filesz: int, memsz: int) -> bytes:
        if bits == 32:
            return phdr.pack(ptype, off, vaddr, paddr, filesz, memsz, 0, 0)
        return phdr.pack(ptype, 0, off, vaddr, paddr, filesz, memsz, 0)

    out += ph(4, note_off, 0, 0, len(notes), len(notes))
    for off, vaddr, paddr, filesz, memsz in table:
        out += ph(1, off, vaddr, paddr, filesz, memsz)
    if xnum:
        out += shdr.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    out += notes + body
    with open(path, "wb") as fh:
        fh.write(out)


def _compressor(codec: str):
    if codec == "zlib":
        return zlib.compress, 0x1
    if codec == "lzo":
        import lzokay

        return lzokay.compress, 0x2
    if codec == "snappy":
        import cramjam

        return (lambda b: bytes(cramjam.snappy.compress_raw(b))), 0x4
    if codec == "zstd":
        import cramjam

        return (lambda b: bytes(cramjam.zstd.compress(b))), 0x20
    if codec == "none":
        return None, 0
    raise ValueError(codec)


@dataclass
class Kdump:
    """Options of :func:`write_kdump` (defaults = what QEMU writes for an x86-64 guest)."""

    bits: int = 64
    order: str = "<"
    codec: str = "zlib"
    block_size: int = PAGE
    version: int = 6
    max_mapnr: int | None = None  # default: one past the highest PFN
    vmcoreinfo: bytes = b""
    notes: bytes = b""
    lost: set[int] = field(default_factory=set)  # PFNs written as lost (offset 0)
    incomplete: bool = False
    machine: bytes = b"x86_64"


def assemble_kdump(pages: dict[int, bytes], opt: Kdump) -> bytes:
    """The plain kdump file for ``pages`` (PFN -> block_size bytes). All-zero pages share
    one stored zero page, as QEMU writes them."""
    o, bs = opt.order, opt.block_size
    max_mapnr = opt.max_mapnr if opt.max_mapnr is not None else max(pages, default=0) + 1
    compress, flag = _compressor(opt.codec)
    status = flag | (0x8 if opt.incomplete else 0)
    head = struct.pack(o + "8sI", b"KDUMP   ", opt.version)
    uts = [b"Linux", b"guest", b"6.1.0-test", b"#1", opt.machine, b""]
    head += b"".join(u.ljust(65, b"\0") for u in uts)
    head += b"\0" * (22 if opt.bits == 64 else 10)
    extra = opt.vmcoreinfo + opt.notes
    sub_blocks = 1 + -(-len(extra) // bs)
    bm_bytes = -(-max_mapnr // 8)
    bm_half_blocks = max(1, -(-bm_bytes // bs))
    bitmap_blocks = 2 * bm_half_blocks
    head += struct.pack(o + "10I", status, bs, sub_blocks, bitmap_blocks, max_mapnr & 0xFFFFFFFF,
                        max_mapnr, 0, 0, 0, 1)  # fmt: skip
    vmci_off = 2 * bs
    note_off = vmci_off + len(opt.vmcoreinfo)
    if opt.bits == 64:
        sub = struct.pack(o + "QIIQQQQQQQQQQQ", 0, 1, 0, 0, 0, vmci_off, len(opt.vmcoreinfo),
                          note_off, len(opt.notes), 0, 0, 0, max_mapnr, max_mapnr)  # fmt: skip
    else:
        sub = struct.pack(o + "IIIIIQIQIQIQQQ", 0, 1, 0, 0, 0, vmci_off, len(opt.vmcoreinfo),
                          note_off, len(opt.notes), 0, 0, 0, max_mapnr, max_mapnr)  # fmt: skip
    bitmap = bytearray(bm_half_blocks * bs)
    pfns = sorted(p for p in pages if p < max_mapnr)
    for p in pfns:
        bitmap[p // 8] |= 1 << (p % 8)
    desc_off = (1 + sub_blocks + bitmap_blocks) * bs
    data_off = desc_off + 24 * len(pfns)
    zero = bytes(bs)
    data = bytearray(zero)  # the shared zero page
    descs = bytearray()
    for p in pfns:
        page = pages[p]
        assert len(page) == bs
        if p in opt.lost:
            descs += struct.pack(o + "QIIQ", 0, 0, 0, 0)
        elif page == zero:
            descs += struct.pack(o + "QIIQ", data_off, bs, 0, 0)
        else:
            packed = compress(page) if compress else page
            if len(packed) >= bs:
                packed, pflag = page, 0
            else:
                pflag = flag
            descs += struct.pack(o + "QIIQ", data_off + len(data), len(packed), pflag, 0)
            data += packed
    out = bytearray(head.ljust(bs, b"\0"))
    out += sub.ljust(bs, b"\0") + extra.ljust((sub_blocks - 1) * bs, b"\0")
    out += bitmap + bitmap + descs + data
    return bytes(out)


def flatten(assembled: bytes, *, chunk: int = 16384, shuffle: int | None = None,
            overwrite: bool = False) -> bytes:  # fmt: skip
    """makedumpfile's flattened stream of ``assembled``: records of ``chunk`` bytes, in a
    shuffled order when ``shuffle`` is a seed; with ``overwrite`` the first records are
    garbage later overwritten by the right bytes (last writer wins)."""
    head = b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    recs = [(i, assembled[i : i + chunk]) for i in range(0, len(assembled), chunk)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(recs)
    if overwrite:
        recs = [(i, b"\xee" * len(b)) for i, b in recs[:4]] + recs
    out = bytearray(head.ljust(4096, b"\0"))
    for off, b in recs:
        out += struct.pack(">qq", off, len(b)) + b
    out += struct.pack(">qq", -1, -1)
    return bytes(out)


def write_kdump(path: str, pages: dict[int, bytes], opt: Kdump | None = None, *,
                flat: bool = False, **flat_args) -> None:  # fmt: skip
    data = assemble_kdump(pages, opt or Kdump())
    if flat:
        data = flatten(data, **flat_args)
    with open(path, "wb") as fh:
        fh.write(data)
