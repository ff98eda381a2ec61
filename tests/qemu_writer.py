"""Test-only writers for QEMU migration streams (incl. the mapped-ram layout of QEMU >= 9.0,
which Debian's QEMU 7.2 cannot produce), libvirt save containers and qcow2 rewrites, following
``docs/formats.md`` §4-§7. Nothing here is used by the product."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

PAGE = 4096
MIB = 1 << 20

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20
F_XBZRLE, F_HOOK, F_COMPRESS, F_FLUSH = 0x40, 0x80, 0x100, 0x200


def _name(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


class Qevm:
    """Builds a QEVM stream record by record. ``prefix`` is the number of bytes that will
    precede the stream in its file (a libvirt header): mapped-ram offsets are absolute."""

    def __init__(
        self,
        machine: str | None = "pc-i440fx-7.2",
        page_size: int = PAGE,
        page_bits_subsection: bool = False,
        capabilities: tuple[str, ...] = (),
        uuid: bytes | None = None,
        footers: bool = True,
        prefix: int = 0,
    ) -> None:
        self.out = bytearray(b"QEVM\x00\x00\x00\x03")
        self.ps = page_size
        self.caps = capabilities
        self.footers = footers
        self.prefix = prefix
        self.cur: str | None = None
        if machine is not None:
            m = machine.encode()
            self.out += b"\x07" + struct.pack(">I", len(m)) + m
            if page_bits_subsection:
                self.out += b"\x05" + _name("configuration/target-page-bits") + struct.pack(
                    ">II", 1, page_size.bit_length() - 1
                )
            if capabilities:
                self.out += b"\x05" + _name("configuration/capabilities") + struct.pack(
                    ">II", 1, len(capabilities)
                ) + b"".join(_name(c) for c in capabilities)
            if uuid is not None:
                self.out += b"\x05" + _name("configuration/uuid") + struct.pack(">I", 1) + uuid

    # sections
    def start(self, idstr: str = "ram", sid: int = 2, version: int = 4, full: bool = False) -> None:
        self.sid = sid
        self.out += bytes([4 if full else 1]) + struct.pack(">I", sid) + _name(idstr)
        self.out += struct.pack(">II", 0, version)

    def part(self, end: bool = False, sid: int = 2) -> None:
        self.sid = sid
        self.out += bytes([3 if end else 2]) + struct.pack(">I", sid)

    def footer(self) -> None:
        if self.footers:
            self.out += b"\x7e" + struct.pack(">I", self.sid)

    def word(self, addr: int, flags: int) -> None:
        self.out += struct.pack(">Q", addr | flags)

    def blocks(
        self,
        blocks: list[tuple[str, int]],
        mapped: dict[str, dict[int, bytes]] | None = None,
        empty_bitmap: bool = False,
    ) -> None:
        """MEM_SIZE list. With ``mapped`` (block -> {page index: bytes}) the blocks get
        mapped-ram headers, bitmaps and page areas, and the stream skips past each area."""
        self.word(sum(s for _, s in blocks), F_MEM_SIZE)
        for name, size in blocks:
            self.out += _name(name) + struct.pack(">Q", size)
            if "x-ignore-shared" in self.caps:
                self.out += struct.pack(">Q", 0xDEAD000)
            if mapped is not None:
                self._mapped_block(size, mapped.get(name, {}), empty_bitmap)

    def _mapped_block(self, size: int, pages: dict[int, bytes], empty_bitmap: bool) -> None:
        npages = size // self.ps
        bitmap_off = self.prefix + len(self.out) + 28
        bitmap_len = (npages + 63) // 64 * 8
        pages_off = (bitmap_off + bitmap_len + MIB - 1) // MIB * MIB
        self.out += struct.pack(">IQQQ", 1, self.ps, bitmap_off, pages_off)
        bitmap = bytearray(bitmap_len)
        area = bytearray(size)
        for i, data in pages.items():
            if not empty_bitmap:
                bitmap[i // 8] |= 1 << (i % 8)
            area[i * self.ps : i * self.ps + len(data)] = data
        self.out += bitmap
        self.out += bytes(pages_off - self.prefix - len(self.out))
        self.out += area

    def page(self, block: str, addr: int, data: bytes) -> None:
        cont = block == self.cur
        self.word(addr, F_PAGE | (F_CONTINUE if cont else 0))
        if not cont:
            self.out += _name(block)
        self.out += data.ljust(self.ps, b"\0")
        self.cur = block

    def zero(self, block: str, addr: int, fill: int = 0) -> None:
        cont = block == self.cur
        self.word(addr, F_ZERO | (F_CONTINUE if cont else 0))
        if not cont:
            self.out += _name(block)
        self.out += bytes([fill])
        self.cur = block

    def compressed(self, block: str, addr: int, data: bytes) -> None:
        cont = block == self.cur
        self.word(addr, F_COMPRESS | (F_CONTINUE if cont else 0))
        if not cont:
            self.out += _name(block)
        z = zlib.compress(data.ljust(self.ps, b"\0"))
        self.out += struct.pack(">I", len(z)) + z
        self.cur = block

    def xbzrle(self, block: str, addr: int) -> None:
        self.word(addr, F_XBZRLE | F_CONTINUE)
        self.out += b"\x01" + struct.pack(">H", 2) + b"\x00\x01"

    def eos(self) -> None:
        self.word(0, F_EOS)

    def finish(self, vmdesc: bool = True) -> bytes:
        """A device section, EOF and the VM description; returns the stream."""
        self.start("timer", sid=3, version=2, full=True)
        self.out += bytes(16)
        self.footer()
        self.out += b"\x00"
        if vmdesc:
            desc = json.dumps({"page_size": self.ps, "devices": [{"name": "timer"}]}).encode()
            self.out += b"\x06" + struct.pack(">I", len(desc)) + desc
        return bytes(self.out)


def ram_stream(
    pages: dict[int, bytes],
    ram: int,
    machine: str | None = "pc-i440fx-7.2",
    block: str = "pc.ram",
    extra_blocks: tuple[tuple[str, int, dict[int, bytes]], ...] = (),
    **kw: object,
) -> bytes:
    """A complete stream of a guest whose main RAM block ``block`` (``ram`` bytes) holds
    ``pages`` (block offset -> bytes; other pages zero), split over two ram sections, the
    second continuing the first's block without naming it (RAM_SAVE_FLAG_CONTINUE)."""
    w = Qevm(machine, **kw)  # type: ignore[arg-type]
    ps = w.ps
    blocks = [(block, ram)] + [(n, s) for n, s, _ in extra_blocks]
    w.start()
    w.blocks(blocks)
    w.eos()
    w.footer()
    offsets = list(range(0, ram, ps))
    half = len(offsets) // 2
    for k, chunk in enumerate((offsets[:half], offsets[half:])):
        w.part(end=k == 1)
        for off in chunk:
            if off in pages:
                w.page(block, off, pages[off])
            else:
                w.zero(block, off)
        if k == 0:
            w.word(0, F_FLUSH)
            w.word(0, F_HOOK)
        else:
            for name, _, content in extra_blocks:
                for off, data in content.items():
                    w.page(name, off, data)
        w.eos()
        w.footer()
    return w.finish()


def mapped_ram_stream(
    blocks: list[tuple[str, int, dict[int, bytes]]],
    machine: str = "pc-q35-9.0",
    prefix: int = 0,
    empty_bitmap: bool = False,
) -> bytes:
    """A mapped-ram stream (``file:`` migration with the mapped-ram capability): blocks of
    (name, size, {page index: bytes}). ``prefix`` bytes will precede it in the file."""
    w = Qevm(machine, capabilities=("mapped-ram",), prefix=prefix)
    w.start()
    w.blocks([(n, s) for n, s, _ in blocks], mapped={n: p for n, _, p in blocks},
             empty_bitmap=empty_bitmap)
    w.eos()
    w.footer()
    w.part(end=True)
    w.word(0, F_FLUSH)
    w.eos()
    w.footer()
    return w.finish()


LIBVIRT_XML = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>{kib}</memory>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
</domain>
"""


def libvirt_save(
    payload: bytes,
    fmt: int,
    ram: int,
    name: str = "written-guest",
    uuid: str = "11111111-2222-3333-4444-555555555555",
    machine: str = "pc-i440fx-7.2",
    version: int = 2,
    order: str = "<",
    magic: bytes = b"LibvirtQemudSave",
    data_len: int | None = None,
) -> bytes:
    """A libvirt save container: header, XML + cookie + 64 KiB padding, then ``payload``
    (already compressed as ``fmt`` says). For mapped-ram payloads use :func:`libvirt_prefix`
    to know where the stream will start."""
    head, _ = libvirt_head(fmt, ram, name, uuid, machine, version, order, magic, data_len)
    return head + payload


def libvirt_head(
    fmt: int, ram: int, name: str = "written-guest",
    uuid: str = "11111111-2222-3333-4444-555555555555", machine: str = "pc-i440fx-7.2",
    version: int = 2, order: str = "<", magic: bytes = b"LibvirtQemudSave",
    data_len: int | None = None,
) -> tuple[bytes, int]:
    """(header + data area, payload offset)."""
    xml = LIBVIRT_XML.format(name=name, uuid=uuid, kib=ram // 1024, machine=machine).encode()
    xml += b"\0"
    cookie = b"<cookie/>\0"
    area = xml + cookie + bytes(65536)
    dlen = len(area) if data_len is None else data_len
    hdr = magic + struct.pack(order + "5I", version, dlen, 1, fmt, len(xml)) + bytes(56)
    return hdr + area, 92 + len(area)


def compress_qcow2_vmstate(src: Path, dst: Path, every: int = 2, zstd: bool = False) -> int:
    """Copy qcow2 ``src`` to ``dst`` with every ``every``-th vmstate cluster of each snapshot
    rewritten as a compressed cluster (raw deflate, or zstd with the header's compression type
    set, appended at the end of the file, L2 entry pointed at it). Returns the number of
    clusters compressed."""
    data = bytearray(src.read_bytes())
    if zstd:
        import cramjam

        assert struct.unpack_from(">I", data, 0x64)[0] > 0x68  # header has compression_type
        data[0x68] = 1
        data[0x48 + 7] |= 1 << 3  # incompatible feature: compression type
    cbits = struct.unpack_from(">I", data, 0x14)[0]
    cs = 1 << cbits
    l2_bits = cbits - 3
    nsnap, snap_off = struct.unpack_from(">IQ", data, 0x3C)
    disk = struct.unpack_from(">Q", data, 0x18)[0]
    pos = snap_off
    done = 0
    for _ in range(nsnap):
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", data, pos)
        vm32, extra_len = struct.unpack_from(">II", data, pos + 0x20)
        vmsize = struct.unpack_from(">Q", data, pos + 0x28)[0] if extra_len >= 8 else vm32
        span = 1 << (cbits + l2_bits)
        start = (disk + span - 1) // span * span
        for k, guest in enumerate(range(start, start + vmsize, cs)):
            if k % every:
                continue
            l1e = struct.unpack_from(">Q", data, l1_off + 8 * (guest >> (cbits + l2_bits)))[0]
            l2_off = l1e & 0x00FFFFFFFFFFFE00
            at = l2_off + 8 * ((guest >> cbits) & ((1 << l2_bits) - 1))
            entry = struct.unpack_from(">Q", data, at)[0]
            host = entry & 0x00FFFFFFFFFFFE00
            if host == 0 or entry & (1 << 62):  # unallocated, or an L2 table already rewritten
                continue
            if zstd:
                z = bytes(cramjam.zstd.compress(bytes(data[host : host + cs])))
            else:
                co = zlib.compressobj(6, zlib.DEFLATED, -12)
                z = co.compress(bytes(data[host : host + cs])) + co.flush()
            off = len(data) + 3  # deliberately not sector aligned
            data += bytes(3) + z
            sectors = (off + len(z) - 1) // 512 - off // 512
            x = 62 - (cbits - 8)
            struct.pack_into(">Q", data, at, (1 << 62) | (sectors << x) | off)
            done += 1
        pos = (pos + 0x28 + extra_len + id_len + name_len + 7) // 8 * 8
    data += bytes(-len(data) % 512)
    dst.write_bytes(bytes(data))
    return done


def lzop_compress(data: bytes, flags: int = 0x03000001, block: int = 256 * 1024,
                  version: int = 0x1040, method: int = 1, name: bytes = b"",
                  extra: bytes | None = None) -> bytes:
    """An lzop file of ``data`` as lzop writes it (``docs/formats.md`` §6.2): the header with
    its checksum, ``block``-byte blocks LZO1X-compressed by ``lzokay`` (stored as is when that
    does not shrink them) with the checksums ``flags`` asks for, the end marker. The default
    flags are lzop's own from stdin on Unix (F_ADLER32_D, OS byte 3)."""
    import lzokay

    from parsers import codecs as c

    head = struct.pack(">HH", version, 0x20A0)
    if version >= c.LZOP_V0940:
        head += struct.pack(">H", 0x0940)
    head += bytes([method])
    if version >= c.LZOP_V0940:
        head += b"\x05"
    if extra is not None:
        flags |= c.F_H_EXTRA_FIELD
    head += struct.pack(">II", flags, 0o100644) + struct.pack(">I", 0)
    if version >= c.LZOP_V0940:
        head += struct.pack(">I", 0)
    head += bytes([len(name)]) + name
    check = zlib.crc32 if flags & c.F_H_CRC32 else zlib.adler32
    out = bytearray(c.LZOP_MAGIC + head + struct.pack(">I", check(head)))
    if extra is not None:
        field = struct.pack(">I", len(extra)) + extra
        out += field + struct.pack(">I", check(field))
    for at in range(0, len(data), block):
        raw = data[at : at + block]
        packed = bytes(lzokay.compress(raw))
        stored = len(packed) >= len(raw)
        body = raw if stored else packed
        out += struct.pack(">II", len(raw), len(body))
        sums = [(c.F_ADLER32_D, zlib.adler32, raw), (c.F_CRC32_D, zlib.crc32, raw)]
        if not stored:
            sums += [(c.F_ADLER32_C, zlib.adler32, body), (c.F_CRC32_C, zlib.crc32, body)]
        for bit, fn, what in sums:
            if flags & bit:
                out += struct.pack(">I", fn(what))
        out += body
    return bytes(out + struct.pack(">I", 0))


def zstd_compress(data: bytes, frames: int = 1) -> bytes:
    """``data`` as ``frames`` consecutive zstd frames (as ``zstd`` or a parallel writer
    produces), compressed by the standard library's zstd module or its backport."""
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    step = -(-len(data) // frames) or 1
    return b"".join(zstd.compress(data[i : i + step]) for i in range(0, len(data), step))
