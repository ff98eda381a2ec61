"""TEST-ONLY writer of Hyper-V saved states: ``.vmrs`` (HyperVStorage) and legacy ``.bin``.

Written from the same public reverse-engineering notes as ``parsers/hyperv.py``
(dissect.hypervisor, VMkatz, Pascal Beyer's VMRS reader; docs/formats.md) and MS-XCA for the
two page codecs — no Hyper-V runs here. Includes small test-only compressors for XPRESS (MS-XCA
2.3, plain LZ77) and LZNT1 (MS-XCA 2.5): greedy matchers, correct but not tuned. Not product
code: nothing in ``parsers/`` imports it.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from dataclasses import dataclass, field

PAGE = 4096
BLOCK_PAGES = 256
SIGNATURE = 0x01282014

# Page encodings a RamBlock may use (see parsers/hyperv.py):
ENCODINGS = ("raw", "xpress", "lznt1", "fill", "variable")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Compressors (test-only)


def _matches(data: bytes, max_dist, max_len, min_len: int = 3):
    """Greedy LZ77 parse: yields ("lit", byte) or ("match", distance, length).
    ``max_dist(pos)``/``max_len(pos)`` give the limits at each position."""
    heads: dict[bytes, list[int]] = {}
    pos, n = 0, len(data)
    while pos < n:
        best_len = best_dist = 0
        key = data[pos : pos + 3]
        if len(key) == 3:
            dmax, lmax = max_dist(pos), max_len(pos)
            for cand in reversed(heads.get(key, [])[-4:]):
                dist = pos - cand
                if dist > dmax:
                    break
                length, top = 0, min(lmax, n - pos)
                while length < top and data[cand + length] == data[pos + length]:
                    length += 1
                if length > best_len:
                    best_len, best_dist = length, dist
        step = best_len if best_len >= min_len else 1
        for k in range(pos, pos + step):
            heads.setdefault(data[k : k + 3], []).append(k)
        if best_len >= min_len:
            yield ("match", best_dist, best_len)
        else:
            yield ("lit", data[pos])
        pos += step


def xpress_compress(data: bytes) -> bytes:
    """MS-XCA plain LZ77: 32-bit flag words (MSB first), 16-bit match words, shared length
    nibbles, longer lengths in a byte / u16."""
    out = bytearray()
    flags = flag_count = 0
    flag_pos = len(out)
    out += b"\0\0\0\0"
    nibble_pos = -1

    def push_flag(bit: int) -> None:
        nonlocal flags, flag_count, flag_pos
        if flag_count == 32:
            out[flag_pos : flag_pos + 4] = struct.pack("<I", flags)
            flag_pos = len(out)
            out.extend(b"\0\0\0\0")
            flags = flag_count = 0
        flags = (flags << 1) | bit
        flag_count += 1

    for tok in _matches(data, lambda p: 8192, lambda p: 4096):
        if tok[0] == "lit":
            push_flag(0)
            out.append(tok[1])
            continue
        _, dist, length = tok
        push_flag(1)
        ml, mo = length - 3, dist - 1
        if ml < 7:
            out += struct.pack("<H", (mo << 3) | ml)
            continue
        out += struct.pack("<H", (mo << 3) | 7)
        rest = ml - 7
        nib = min(rest, 15)
        if nibble_pos < 0:
            nibble_pos = len(out)
            out.append(nib)
        else:
            out[nibble_pos] |= nib << 4
            nibble_pos = -1
        if rest >= 15:
            rest -= 15
            if rest < 255:
                out.append(rest)
            else:
                out.append(255)
                out += struct.pack("<H", ml)
    # Pad the last flag word with 1 bits: a match flag at the end of input ends decoding.
    if flag_count == 32:
        out[flag_pos : flag_pos + 4] = struct.pack("<I", flags)
        out += b"\xff\xff\xff\xff"
    else:
        pad = 32 - flag_count
        out[flag_pos : flag_pos + 4] = struct.pack("<I", (flags << pad) | ((1 << pad) - 1))
    return bytes(out)


def _lznt1_bits(pos: int) -> int:
    """Displacement bits at ``pos`` bytes into a chunk (12 down to 4, MS-XCA 2.5)."""
    d = 12
    while d > 4 and not (1 << (d - 1)) < pos:
        d -= 1
    return d


def lznt1_compress(data: bytes) -> bytes:
    """LZNT1: 4 KiB chunks, each a 2-byte header (compressed flag, signature 3, size - 3) and
    flag bytes (LSB first) over literals and matches whose offset/length split grows with the
    position in the chunk; a chunk that does not shrink is stored uncompressed."""
    out = bytearray()
    for c in range(0, len(data), PAGE):
        chunk = data[c : c + PAGE]
        body = bytearray()
        group: list[bytes] = []
        flags = 0
        pos = 0
        for tok in _matches(chunk, lambda p: 1 << _lznt1_bits(p),
                            lambda p: (1 << (16 - _lznt1_bits(p))) + 2):  # fmt: skip
            if tok[0] == "lit":
                group.append(bytes([tok[1]]))
                pos += 1
            else:
                _, dist, length = tok
                d = _lznt1_bits(pos)
                flags |= 1 << len(group)
                group.append(struct.pack("<H", ((dist - 1) << (16 - d)) | (length - 3)))
                pos += length
            if len(group) == 8:
                body.append(flags)
                body += b"".join(group)
                group, flags = [], 0
        if group:
            body.append(flags)
            body += b"".join(group)
        if len(body) < len(chunk):
            out += struct.pack("<H", 0xB000 | (len(body) + 2 - 3)) + body
        else:
            out += struct.pack("<H", 0x3000 | (len(chunk) + 2 - 3)) + chunk
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# .vmrs


def _pattern_of(page: bytes) -> int | None:
    """The u64 a page repeats, if it is one pattern."""
    head = page[:8]
    return int.from_bytes(head, "little") if head * (PAGE // 8) == page else None


@dataclass
class VmrsFile:
    """A saved state. ``runs``: guest-physical runs (base page, pages) in RamBlock order (Gen 1:
    RAM below the MMIO gap, then RAM from 4 GiB); ``pages``: global RAM page index -> 4 KiB
    (missing pages are zero). ``encoding``: one of ENCODINGS, or a list to draw from per page;
    ``fd_order``/``fc_mode``: the field orders of the disputed tags (Beyer's, VMkatz's);
    ``table_at``: "dissect" (0x2000), "beyer" (twice header_size), "vmkatz" (header field 26);
    ``memory_keys``: write RamMemoryBlock keys (else RamBlocks are identity-mapped);
    ``device_keys``: other array keys (device state), name -> value, stored in the key table
    when under 2 KiB, else as file objects."""

    runs: list[tuple[int, int]]
    pages: dict[int, bytes] = field(default_factory=dict)
    encoding: str | list[str] = "xpress"
    fd_order: str = "pattern-count"
    fc_mode: str = "sized"
    table_at: str = "dissect"
    memory_keys: bool = True
    raw_blocks: set[int] = field(default_factory=set)  # blocks stored as exactly 1 MiB
    seed: int = 0
    sequences: tuple[int, int] = (1, 2)
    bad_header: int | None = None  # corrupt this header copy (0 or 1)
    device_keys: dict[str, bytes] = field(default_factory=dict)

    def total_pages(self) -> int:
        return sum(-(-n // BLOCK_PAGES) * BLOCK_PAGES for _, n in self.runs)

    def gpa_of(self, index: int) -> int | None:
        """GPA of global RAM page ``index`` (None past the runs)."""
        start = 0
        for base, n in self.runs:
            if index < start:
                return None  # the unused tail of a run's last RamBlock
            if index < start + n:
                return (base + index - start) * PAGE
            start += -(-n // BLOCK_PAGES) * BLOCK_PAGES
        return None

    def _encode_block(self, b: int, rng: random.Random) -> bytes:
        pages = [self.pages.get(b * BLOCK_PAGES + j, bytes(PAGE)) for j in range(BLOCK_PAGES)]
        if b in self.raw_blocks:
            return b"".join(pages)
        out = bytearray()
        j = 0
        while j < BLOCK_PAGES:
            page = pages[j]
            enc = self.encoding if isinstance(self.encoding, str) else rng.choice(self.encoding)
            pat = _pattern_of(page)
            if pat is not None and enc in ("fill", "xpress", "lznt1", "variable"):
                run = 1
                while j + run < BLOCK_PAGES and pages[j + run] == page:
                    run += 1
                if run == 1:
                    out += struct.pack("<IQ", 0xFFFFFFFE, pat)
                elif self.fd_order == "count-pattern":
                    out += struct.pack("<IIQ", 0xFFFFFFFD, run, pat)
                else:
                    out += struct.pack("<IQI", 0xFFFFFFFD, pat, run)
                j += run
                continue
            if enc in ("raw", "fill"):
                out += struct.pack("<I", PAGE) + page
            else:
                codec = lznt1_compress if enc == "lznt1" else xpress_compress
                packed = codec(page)
                if enc == "variable" or len(packed) >= PAGE:
                    if len(packed) >= PAGE:
                        packed = page
                    if self.fc_mode == "sized":
                        out += struct.pack("<III", 0xFFFFFFFC, PAGE, len(packed)) + packed
                    elif len(packed) < PAGE:
                        out += struct.pack("<II", 0xFFFFFFFC, len(packed)) + packed
                    else:
                        out += struct.pack("<I", PAGE) + page
                else:
                    out += struct.pack("<I", len(packed)) + packed
            j += 1
        out += b"\xff\xff\xff\xff"
        return bytes(out)

    def to_bytes(self) -> bytes:
        rng = random.Random(self.seed)
        header_size = 0x1000 if self.table_at != "beyer" else 0x1800
        table_off = {"dissect": 0x2000, "beyer": 2 * header_size, "vmkatz": 0x5000}[self.table_at]
        log_off = table_off if self.table_at == "vmkatz" else 0x4000
        body = bytearray(0x6000)
        # Replay log header where dissect expects it (signature only: no entries).
        if self.table_at != "vmkatz":
            body[log_off : log_off + 8] = struct.pack("<II", 0x01110003, 0)
        files: list[tuple[int, int]] = []  # (offset, size) of file objects

        def add_file(data: bytes) -> int:
            while len(body) % PAGE:
                body.append(0)
            at = len(body)
            body.extend(data)
            files.append((at, len(data)))
            return at

        # Key table: root node "savedstate", then its children.
        entries = bytearray()

        def entry(name: str, dtype: int, value: bytes, flags: int = 0, parent=(0, 0)) -> int:
            raw_name = name.encode() + b"\0"
            size = 21 + len(raw_name) + len(value)
            at = 10 + len(entries)
            entries.extend(struct.pack("<HIHIIIB", dtype | flags << 8, size, parent[0],
                                       parent[1], 0, 0, len(raw_name)))  # fmt: skip
            entries.extend(raw_name + value)
            return at

        root = entry("savedstate", 9, bytes(12))
        nblocks = self.total_pages() // BLOCK_PAGES
        if self.memory_keys:
            cursor = 0
            for i, (base, n) in enumerate(self.runs):
                value = struct.pack("<QQQQ", i, n, cursor, base)
                entry(f"RamMemoryBlock{i}", 7, struct.pack("<I", len(value)) + value,
                      parent=(1, root))  # fmt: skip
                cursor += n
        for b in range(nblocks):
            data = self._encode_block(b, rng)
            at = add_file(data)
            entry(f"RamBlock{b}", 7, struct.pack("<IQ", len(data), at), flags=1, parent=(1, root))
        for name, value in self.device_keys.items():
            if len(value) < 2048:
                entry(name, 7, struct.pack("<I", len(value)) + value, parent=(1, root))
            else:
                at = add_file(value)
                entry(name, 7, struct.pack("<IQ", len(value), at), flags=1, parent=(1, root))
        entry("", 1, bytes(8))  # a free entry
        key_table = struct.pack("<HHHI", 2, 1, 1, 0) + bytes(entries) + bytes(4)
        kt_at = add_file(key_table)
        objects = [(2, kt_at, len(key_table), 1)] + [(3, a, s, 1) for a, s in files[:-1]]
        objects.append((4, 0x3000 if self.table_at != "beyer" else 0x2000, 0, 0))  # free
        table = struct.pack("<II", 0x01110001, len(objects))
        for t, a, s, alloc in objects:
            table += struct.pack("<BIQIB", t, 0, a, s, alloc)
        body[table_off : table_off + len(table)] = table
        for copy, seq in enumerate(self.sequences):
            h = bytearray(struct.pack("<IIHIQIQQI", SIGNATURE, 0, seq, 0x400, 0, 0x1000,
                                      log_off, 0x1000, header_size))  # fmt: skip
            h[4:8] = struct.pack("<I", crc32(bytes(h)))
            if self.bad_header == copy:
                h[20] ^= 0xFF
            body[copy * 0x1000 : copy * 0x1000 + len(h)] = h
        return bytes(body)

    def write(self, path: str) -> str:
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())
        return path


ZERO_PAGE = bytes(PAGE)
CACHE_BYTES = 256 << 20  # compressed pages kept for reuse; past this, pages are compressed anew


def _xpress_once(page: bytes, cache: dict[bytes, bytes]) -> bytes | None:
    """The XPRESS form of ``page`` when it compresses to under 3/4 of a page, else None.

    The Python compressor takes ~4 ms a page, too slow for gigabytes; but memory repeats pages
    (shared libraries, the page cache; the benchmark image draws its pages from pools), so each
    distinct page is compressed once, keyed by a 16-byte digest. zlib level 1 (~30 us) screens
    out pages that will not compress (random or already-compressed data); those are not cached."""
    if len(zlib.compress(page, 1)) >= PAGE * 3 // 4:
        return None
    key = hashlib.blake2b(page, digest_size=16).digest()
    packed = cache.get(key)
    if packed is None:
        packed = xpress_compress(page)
        if len(cache) * PAGE < CACHE_BYTES:  # entries are under a page each
            cache[key] = packed
    return packed if len(packed) < PAGE else None


def write_vmrs_from_raw(raw_path: str, out_path: str) -> list[tuple[int, int]]:
    """Stream a flat raw image into a .vmrs (dissect's table placement, Beyer's tag orders):
    RAM below 3 GiB from GPA 0, the rest from 4 GiB (a Gen 1 style gap), one RamBlock at a
    time; zero pages as fill tags, pages that compress well as XPRESS, the rest raw (each
    distinct page is compressed once: :func:`_xpress_once`). Returns the memory runs (base
    page, pages)."""
    size = os.path.getsize(raw_path)
    pages_total = size // PAGE
    low = min(pages_total, 0xC0000)
    runs = [(0, low)] + ([(0x100000, pages_total - low)] if pages_total > low else [])
    cache: dict[bytes, bytes] = {}
    files: list[tuple[int, int]] = []  # (file offset, size) of each RamBlock value
    with open(raw_path, "rb") as src, open(out_path, "w+b") as out:
        out.write(bytes(0x6000))
        for _, n in runs:
            for b0 in range(0, n, BLOCK_PAGES):
                block = bytearray()
                for _ in range(min(BLOCK_PAGES, n - b0)):
                    pg = src.read(PAGE)
                    if pg == ZERO_PAGE:
                        block += struct.pack("<IQ", 0xFFFFFFFE, 0)
                        continue
                    packed = _xpress_once(pg, cache)
                    if packed is not None:
                        block += struct.pack("<I", len(packed)) + packed
                    else:
                        block += struct.pack("<I", PAGE) + pg
                block += b"\xff\xff\xff\xff"
                out.seek(0, 2)
                pad = (-out.tell()) % PAGE
                out.write(bytes(pad))
                files.append((out.tell(), len(block)))
                out.write(block)
        f = VmrsFile(runs)
        entries = bytearray()

        def entry(name: str, dtype: int, value: bytes, flags: int = 0, parent=(0, 0)) -> int:
            raw_name = name.encode() + b"\0"
            at = 10 + len(entries)
            entries.extend(
                struct.pack(
                    "<HIHIIIB",
                    dtype | flags << 8,
                    21 + len(raw_name) + len(value),
                    parent[0],
                    parent[1],
                    0,
                    0,
                    len(raw_name),
                )
            )
            entries.extend(raw_name + value)
            return at

        root = entry("savedstate", 9, bytes(12))
        cursor = 0
        for i, (base, n) in enumerate(f.runs):
            value = struct.pack("<QQQQ", i, n, cursor, base)
            entry(f"RamMemoryBlock{i}", 7, struct.pack("<I", 32) + value, parent=(1, root))
            cursor += n
        for i, (at, n) in enumerate(files):
            entry(f"RamBlock{i}", 7, struct.pack("<IQ", n, at), flags=1, parent=(1, root))
        key_table = struct.pack("<HHHI", 2, 1, 1, 0) + bytes(entries) + bytes(4)
        out.seek(0, 2)
        out.write(bytes((-out.tell()) % PAGE))
        kt_at = out.tell()
        out.write(key_table)
        objects = [(2, kt_at, len(key_table))] + [(3, a, s) for a, s in files]
        table = struct.pack("<II", 0x01110001, len(objects))
        table += b"".join(struct.pack("<BIQIB", t, 0, a, s, 1) for t, a, s in objects)
        if 0x2000 + len(table) > 0x6000:  # a big table goes to the end, chained from 0x2000
            out.seek(0, 2)
            more = out.tell()
            out.write(table)
            table = struct.pack("<II", 0x01110001, 1) + struct.pack("<BIQIB", 1, 0, more, 0, 1)
        out.seek(0x2000)
        out.write(table)
        for copy, seq in enumerate((1, 2)):
            h = bytearray(struct.pack("<IIHIQIQQI", SIGNATURE, 0, seq, 0x400, 0, 0x1000, 0x4000,
                                      0x1000, 0x1000))  # fmt: skip
            h[4:8] = struct.pack("<I", crc32(bytes(h)))
            out.seek(copy * 0x1000)
            out.write(h)
    return runs
