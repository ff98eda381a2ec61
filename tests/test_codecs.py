"""In-process decompression (parsers/codecs.py): the lzop container against the real lzop
program and the test writer in every flag combination, damaged and truncated payloads (a
clear error at the right offset after what was readable), concatenated members, and the
output bound."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import codecs
from parsers.base import Evidence, ImageError
from tests.qemu_writer import lzop_compress, zstd_compress

# Compressible text, a stretch of incompressible bytes (stored blocks), zeros.
DATA = (b"card 4111111111111111 lzop block text " * 9000 + random.Random(3).randbytes(300_000)
        + bytes(200_000))
COMPRESS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "lzop": lzop_compress,
    "zstd": zstd_compress,
}


def decode(tmp_path: Path, payload: bytes, kind: str, prefix: bytes = b"HDR!",
           max_output: int | None = None, n: int = 100_000) -> tuple[bytes, ImageError | None]:
    """Everything a StreamDecoder gives for ``payload`` stored after ``prefix`` in a file,
    read ``n`` bytes at a time, and the problem it ended with."""
    path = tmp_path / f"payload.{kind}"
    path.write_bytes(prefix + payload)
    ev = Evidence(str(path))
    dec = codecs.StreamDecoder(ev, len(prefix), kind, max_output)
    out = bytearray()
    while piece := dec.read(n):
        assert len(piece) <= n
        out += piece
    dec.close()
    ev.close()
    return bytes(out), dec.problem


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_every_kind_decodes_in_bounded_pieces(tmp_path: Path, kind: str) -> None:
    out, problem = decode(tmp_path, COMPRESS[kind](DATA), kind, n=65_537)
    assert problem is None and out == DATA


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_concatenated_members_then_padding(tmp_path: Path, kind: str) -> None:
    half = len(DATA) // 2
    payload = COMPRESS[kind](DATA[:half]) + COMPRESS[kind](DATA[half:]) + bytes(4096)
    out, problem = decode(tmp_path, payload, kind)
    assert problem is None and out == DATA


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_output_bound_stops_a_bomb(tmp_path: Path, kind: str) -> None:
    out, problem = decode(tmp_path, COMPRESS[kind](bytes(8 << 20)), kind, max_output=1 << 20)
    assert len(out) == 1 << 20
    assert problem is not None and "decompression bomb" in str(problem)
    assert str(problem).startswith(str(tmp_path / f"payload.{kind}"))


@pytest.mark.parametrize("level", ["-1", "-3", "-7", "-9"])
@pytest.mark.parametrize("extra", [[], ["--crc32"], ["-F"]])
def test_lzop_program_output(tmp_path: Path, level: str, extra: list[str]) -> None:
    """What the real lzop writes (stdin and a named file, every method, checksums on, CRC-32,
    off) decodes to the input."""
    if shutil.which("lzop") is None:
        pytest.skip("the lzop program is not installed (Debian package lzop)")
    src = tmp_path / "guest.bin"
    src.write_bytes(DATA)
    for args in ([], [str(src)]):  # from stdin, and from a file (name and mode in the header)
        run = subprocess.run(["lzop", "-c", level, *extra, *args], input=b"" if args else DATA,
                             capture_output=True, check=True)
        out, problem = decode(tmp_path, run.stdout, "lzop")
        assert problem is None and out == DATA


def test_lzop_writer_output_is_what_the_program_reads(tmp_path: Path) -> None:
    """The test writer's files are real lzop files: the program decompresses them too."""
    if shutil.which("lzop") is None:
        pytest.skip("the lzop program is not installed (Debian package lzop)")
    for flags in (0x1, 0x3, 0x300 | 0x1000, 0x303):
        blob = lzop_compress(DATA, flags=flags, extra=b"x" * 7)
        run = subprocess.run(["lzop", "-dc"], input=blob, capture_output=True, check=True)
        assert run.stdout == DATA


@pytest.mark.parametrize("flags", [0, 0x1, 0x2, 0x3, 0x100, 0x200, 0x300, 0x303, 0x1303])
@pytest.mark.parametrize("version", [0x0900, 0x1040])
def test_lzop_every_checksum_flag_and_old_header(tmp_path: Path, flags: int,
                                                 version: int) -> None:
    blob = lzop_compress(DATA, flags=flags, version=version, name=b"guest.bin",
                         block=100_000, extra=b"extra!" if flags & 0x1000 else None)
    out, problem = decode(tmp_path, blob, "lzop")
    assert problem is None and out == DATA


def lzop_blocks(blob: bytes, flags: int) -> list[tuple[int, int, int]]:
    """(offset, uncompressed size, compressed size) of each block of a writer file with no
    name and no extra field."""
    pos = len(codecs.LZOP_MAGIC) + 2 + 2 + 2 + 1 + 1 + 4 + 4 + 4 + 4 + 1 + 4
    out = []
    while (dst := struct.unpack_from(">I", blob, pos)[0]) != 0:
        src = struct.unpack_from(">I", blob, pos + 4)[0]
        sums = bin(flags & (0x1 | 0x100)).count("1")
        sums += bin(flags & (0x2 | 0x200)).count("1") if src < dst else 0
        out.append((pos, dst, src))
        pos += 8 + 4 * sums + src
    return out


@pytest.mark.parametrize("what", ["data", "checksum"])
def test_lzop_damaged_block_is_an_error_after_what_was_readable(tmp_path: Path,
                                                                what: str) -> None:
    flags = 0x1 | 0x2  # Adler-32 of both the data and the compressed data
    blob = bytearray(lzop_compress(DATA, flags=flags, block=65536))
    blocks = lzop_blocks(bytes(blob), flags)
    at, dst, src = next(b for b in blocks[2:] if b[2] < b[1])  # a compressed block
    if what == "data":
        blob[at + 16 + src // 2] ^= 0x40
    else:
        blob[at + 8] ^= 1  # its uncompressed-data checksum
    out, problem = decode(tmp_path, bytes(blob), "lzop", prefix=b"P" * 10)
    assert out == DATA[: sum(d for a, d, _ in blocks if a < at)]  # every block before it
    assert problem is not None and problem.offset == 10 + at
    assert "lzop" in str(problem) and "checksum" in str(problem)


HEAD_END = len(codecs.LZOP_MAGIC) + 25  # the writer's header (no name): checksum here


def rehead(blob: bytes, at: int, new: bytes, drop: int = 0) -> bytes:
    """``blob`` with ``drop`` header bytes at ``at`` replaced by ``new``, the header checksum
    made right again (a header that lies consistently)."""
    head = blob[len(codecs.LZOP_MAGIC) : HEAD_END]
    k = at - len(codecs.LZOP_MAGIC)
    head = head[:k] + new + head[k + drop :]
    return (codecs.LZOP_MAGIC + head + struct.pack(">I", zlib.adler32(head))
            + blob[HEAD_END + 4 :])


@pytest.mark.parametrize(("change", "words"), [
    (lambda b: b[:12] + bytes([b[12] ^ 1]) + b[13:], "header checksum mismatch"),
    (lambda b: rehead(b, 9, b"\x08\x00", 2), "is not lzop"),
    (lambda b: rehead(b, 15, b"\x09", 1), "method 9 is not LZO1X"),
    (lambda b: rehead(b, 17, struct.pack(">I", 0x03000801) + struct.pack(">I", 5), 4),
     "filter 5 is not supported"),
    (lambda b: rehead(b, 17, struct.pack(">I", 0x03004001), 4), "reserved flag bits"),
    (lambda b: b[:-4], "ends before its end marker"),
    (lambda b: b[:-4] + struct.pack(">I", 0xFFFFFFFF), "split lzop file"),
    (lambda b: b[:-4] + struct.pack(">II", 65 << 20, 10), "more than lzop writes"),
])
def test_lzop_header_and_block_lies(tmp_path: Path, change, words: str) -> None:
    good = lzop_compress(DATA[:1000])
    assert len(good) > HEAD_END + 4 and decode(tmp_path, good, "lzop") == (DATA[:1000], None)
    out, problem = decode(tmp_path, change(good), "lzop")
    assert problem is not None and words in str(problem)
    assert out in (b"", DATA[:1000])


@settings(max_examples=80)
@given(kind=st.sampled_from(sorted(COMPRESS)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3))
def test_truncated_or_corrupted_payloads_fail_cleanly(tmp_path: Path, kind: str, cut: float,
                                                      flips: list) -> None:
    """Any cut or flipped payload: bytes that decoded, then at most one ImageError naming the
    file; never another exception, never more output than the data had plus one block."""
    blob = bytearray(COMPRESS[kind](DATA[:300_000]))
    blob = blob[: int(len(blob) * cut)]
    for f, x in flips:
        if blob:
            blob[int(f * (len(blob) - 1))] ^= x
    out, problem = decode(tmp_path, bytes(blob), kind, max_output=1 << 20)
    assert len(out) <= 1 << 20
    if problem is not None:
        assert str(problem).startswith(str(tmp_path)) and "\n" not in str(problem)
