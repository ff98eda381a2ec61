"""Decompression of compressed payloads in-process, bounded (``docs/formats.md`` §6).

:class:`StreamDecoder` reads one compressed payload of an evidence file — gzip, bzip2, xz, lzop
or zstd, several concatenated members included — and hands out its decompressed bytes a
bounded piece at a time (the ``parsers.qemu.StreamSource`` interface). gzip, bzip2 and xz use
the standard library; zstd the standard library's ``compression.zstd`` (Python >= 3.14) or its
backport ``backports.zstd``; lzop the container reader below with LZO1X blocks decoded by
``lzokay``. Only where a binding cannot be loaded does the external ``lzop``/``zstd`` program
decompress instead, and the image says so in a remark.

Every decoder is bounded: the caller gives ``max_output`` (bytes), and a stream that expands
past it stops with a one-line error naming the file and the stream offset (a decompression
bomb). Each lzop block is at most 64 MiB (``LZOP_MAX_BLOCK``) and is checked against its
checksums; a damaged block is an error after everything before it was handed out.

The lzop container (big-endian), from lzop's ``src/lzop.c`` (``read_header``, ``p_magic``),
``src/p_lzo.c`` (``lzo_decompress``) and ``src/conf.h`` (flags, methods, limits):
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

from parsers.base import Evidence, ImageError, Remark

LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
# File header after the magic: (field, struct code, present only when ...). "v0940": the
# writer's version is >= 0x0940; "filter": the F_H_FILTER flag is set.
LZOP_HEADER: tuple[tuple[str, str, str | None], ...] = (
    ("version", "H", None),  # lzop version that wrote the file (< 0x0900: not lzop)
    ("lib_version", "H", None),  # LZO library version
    ("version_needed", "H", "v0940"),  # lzop version needed to extract
    ("method", "B", None),  # LZOP_METHODS below
    ("level", "B", "v0940"),  # compression level
    ("flags", "I", None),  # F_* below
    ("filter", "I", "filter"),  # byte filter applied before compressing (not supported)
    ("mode", "I", None),  # the original file's mode
    ("mtime_low", "I", None),  # the original file's mtime
    ("mtime_high", "I", "v0940"),  # its high 32 bits
    ("name_len", "B", None),  # then name_len bytes of file name, then the header checksum
)
LZOP_V0940 = 0x0940
F_ADLER32_D = 0x1  # block header holds the Adler-32 of the uncompressed data
F_ADLER32_C = 0x2  # ... and of the compressed data (only when the block is compressed)
F_H_EXTRA_FIELD = 0x40  # header followed by u32 length, bytes, u32 checksum
F_CRC32_D = 0x100  # block header holds the CRC-32 of the uncompressed data
F_CRC32_C = 0x200  # ... and of the compressed data (only when the block is compressed)
F_H_FILTER = 0x800  # the filter field is present
F_H_CRC32 = 0x1000  # header checksums are CRC-32 (else Adler-32)
F_KNOWN = 0x3FFF | 0xFF000000 | 0x00F00000  # flag bits, OS byte, character set
# Methods, all decoded by LZO1X decompression: LZO1X-1, LZO1X-1(15), LZO1X-999.
LZOP_METHODS = {1: "LZO1X-1", 2: "LZO1X-1(15)", 3: "LZO1X-999"}
# Block header: u32 uncompressed size (0 ends the file; 0xFFFFFFFF marks a split file), u32
# compressed size (0 < compressed <= uncompressed; equal: stored as is), then the checksums the
# flags ask for, in this order: Adler-32 and CRC-32 of the uncompressed data, Adler-32 and
# CRC-32 of the compressed data (the last two only when compressed < uncompressed).
LZOP_BLOCK = struct.Struct(">II")
LZOP_END, LZOP_SPLIT = 0, 0xFFFFFFFF
LZOP_MAX_BLOCK = 64 << 20  # MAX_BLOCK_SIZE of lzop: the largest block it writes or reads

PAYLOAD_MAGICS = {
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "lzop": LZOP_MAGIC,
    "zstd": b"\x28\xb5\x2f\xfd",
}
KINDS = tuple(PAYLOAD_MAGICS)
# The programs libvirt itself runs to restore: the fallback when a binding cannot load.
PROGRAMS = {"lzop": ["lzop", "-dc", "--ignore-warn"], "zstd": ["zstd", "-dcq"]}
READ_CHUNK = 1 << 20  # compressed bytes read at a time
# Read-ahead: the decoding thread asks for at most BLOCK decompressed bytes at a time and stops
# while AHEAD bytes are waiting to be taken; until the caller took that much, it stays only as
# far ahead as the caller took (at least FIRST), so that a short peek decodes little more.
BLOCK = 8 << 20
AHEAD = 32 << 20
FIRST = 1 << 20


class CodecError(Exception):
    """Damaged compressed data at ``offset`` (bytes from the start of the member)."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset


# ---- lzop -------------------------------------------------------------------------------------


class LzopDecompressor:
    """One lzop member, fed its bytes in pieces: ``decompress(data, max_length)`` returns at
    most ``max_length`` decompressed bytes, ``needs_input`` says whether it wants more input,
    ``eof`` whether the end marker was read, ``unused_data`` what follows it (the interface of
    the standard library's decompressors). Raises :class:`CodecError` at damaged data."""

    def __init__(self, lzo1x: Callable[[bytes, int], bytes]) -> None:
        self.lzo1x = lzo1x  # (compressed block, uncompressed size) -> that many bytes
        self.buf = bytearray()  # input not yet parsed
        self.at = 0  # offset of buf[0] in the member
        self.out = b""  # decoded bytes not yet handed out
        self.flags: int | None = None  # from the header, once read
        self.error: CodecError | None = None  # damaged data met after ``out`` was decoded
        self.eof = False
        self.needs_input = True

    @property
    def unused_data(self) -> bytes:
        return bytes(self.buf) if self.eof else b""

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self.error is not None and not self.out:
            raise self.error
        self.buf += data
        starved = False  # the buffered input ends inside the header or a block
        while self.error is None and not self.eof and (max_length < 0
                                                       or len(self.out) < max_length):
            try:
                if not (self._header() if self.flags is None else self._block()):
                    starved = True
                    break
            except CodecError as exc:  # raised once the blocks before it are handed out
                self.error = exc
        n = len(self.out) if max_length < 0 else max_length
        piece, self.out = self.out[:n], self.out[n:]
        self.needs_input = starved and not self.out
        if self.error is not None and not piece:
            raise self.error
        return piece

    def _take(self, n: int) -> bytes:
        piece = bytes(self.buf[:n])
        del self.buf[:n]
        self.at += n
        return piece

    def _header(self) -> bool:
        """Parse the file header when all of it is buffered; False when more is needed."""
        buf = self.buf
        if len(buf) < len(LZOP_MAGIC) + 2:
            return False
        if not buf.startswith(LZOP_MAGIC):
            raise CodecError(0, "not an lzop file (bad magic)")
        pos = len(LZOP_MAGIC)
        fields: dict[str, int] = {}
        for name, code, when in LZOP_HEADER:
            if when == "v0940" and fields["version"] < LZOP_V0940:
                continue
            if when == "filter" and not fields["flags"] & F_H_FILTER:
                continue
            size = struct.calcsize(code)
            if len(buf) < pos + size:
                return False
            fields[name] = struct.unpack_from(">" + code, buf, pos)[0]
            pos += size
        end = pos + fields["name_len"]
        if len(buf) < end + 4:
            return False
        flags = fields["flags"]
        checksum = zlib.crc32 if flags & F_H_CRC32 else zlib.adler32
        stored = struct.unpack_from(">I", buf, end)[0]
        if fields["version"] < 0x0900:
            raise CodecError(9, f"lzop version {fields['version']:#06x} is not lzop")
        if checksum(bytes(buf[len(LZOP_MAGIC) : end])) != stored:
            raise CodecError(end, "lzop header checksum mismatch (header damaged)")
        if fields["method"] not in LZOP_METHODS:
            raise CodecError(15, f"lzop method {fields['method']} is not LZO1X (not supported)")
        if flags & F_H_FILTER:
            raise CodecError(pos, f"lzop filter {fields['filter']} is not supported")
        if flags & ~F_KNOWN & 0xFFFFFFFF:
            raise CodecError(end, f"lzop header has reserved flag bits set ({flags:#x})")
        pos = end + 4
        if flags & F_H_EXTRA_FIELD:
            if len(buf) < pos + 4:
                return False
            extra = struct.unpack_from(">I", buf, pos)[0]
            if extra > LZOP_MAX_BLOCK:
                raise CodecError(pos, f"lzop extra field of {extra} bytes")
            if len(buf) < pos + 4 + extra + 4:
                return False
            stored = struct.unpack_from(">I", buf, pos + 4 + extra)[0]
            if checksum(bytes(buf[pos : pos + 4 + extra])) != stored:
                raise CodecError(pos, "lzop extra field checksum mismatch")
            pos += 4 + extra + 4
        self._take(pos)
        self.flags = flags
        return True

    def _block(self) -> bool:
        """Decode the next block when all of it is buffered; False when more is needed."""
        flags, buf, at = self.flags or 0, self.buf, self.at
        if len(buf) < 4:
            return False
        dst_len = struct.unpack_from(">I", buf)[0]
        if dst_len == LZOP_END:
            self._take(4)
            self.eof = True
            return True
        if dst_len == LZOP_SPLIT:
            raise CodecError(at, "split lzop file (not supported)")
        if dst_len > LZOP_MAX_BLOCK:
            raise CodecError(at, f"lzop block of {dst_len} bytes (more than lzop writes)")
        if len(buf) < LZOP_BLOCK.size:
            return False
        src_len = LZOP_BLOCK.unpack_from(buf)[1]
        if not 0 < src_len <= dst_len:
            raise CodecError(at + 4, f"lzop block of {src_len} bytes for {dst_len} (damaged)")
        compressed = src_len < dst_len
        wanted = [(F_ADLER32_D, zlib.adler32, "d"), (F_CRC32_D, zlib.crc32, "d"),
                  (F_ADLER32_C, zlib.adler32, "c"), (F_CRC32_C, zlib.crc32, "c")]
        checks = [(fn, of) for bit, fn, of in wanted if flags & bit and (of == "d" or compressed)]
        head = LZOP_BLOCK.size + 4 * len(checks)
        if len(buf) < head + src_len:
            return False
        sums = struct.unpack_from(f">{len(checks)}I", buf, LZOP_BLOCK.size)
        data = bytes(buf[head : head + src_len])
        for (fn, of), stored in zip(checks, sums, strict=True):
            if of == "c" and fn(data) != stored:
                raise CodecError(at, "lzop block checksum mismatch (compressed data damaged)")
        if compressed:
            try:
                data = self.lzo1x(data, dst_len)
            except Exception as exc:  # every binding's own error type: damaged data
                raise CodecError(at, f"lzop block does not decode ({exc})") from None
        for (fn, of), stored in zip(checks, sums, strict=True):
            if of == "d" and fn(data) != stored:
                raise CodecError(at, "lzop block checksum mismatch (data damaged)")
        self._take(head + src_len)
        self.out += data
        return True


# ---- the other codecs, with one interface --------------------------------------------------


class _Gzip:
    """zlib's gzip decoder with the interface of the others: ``unconsumed_tail`` (input held
    back by ``max_length``) is fed again by the next call."""

    def __init__(self) -> None:
        self.d = zlib.decompressobj(wbits=31)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self.d.decompress(self.d.unconsumed_tail + data, max(max_length, 0))

    @property
    def needs_input(self) -> bool:
        return not self.d.unconsumed_tail and not self.d.eof

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def unused_data(self) -> bytes:
        return self.d.unused_data


def _zstd_module() -> Any:
    try:
        from compression import zstd  # Python >= 3.14
    except ImportError:
        from backports import zstd
    return zstd


def _lzo1x() -> Callable[[bytes, int], bytes]:
    import lzokay

    def lzo1x(data: bytes, size: int) -> bytes:
        # lzokay fills a buffer of exactly ``size``: a block decoding short is zero-padded,
        # which the block's data checksum (written by default) then refuses.
        return bytes(lzokay.decompress(data, size))

    return lzo1x


def decoder_factory(kind: str) -> Callable[[], Any]:
    """A function making a fresh decoder of one ``kind`` member. Raises ImportError (or
    OSError) when the binding cannot be loaded."""
    if kind == "gzip":
        return _Gzip
    if kind == "bzip2":
        return bz2.BZ2Decompressor
    if kind == "xz":
        return lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    if kind == "zstd":
        return _zstd_module().ZstdDecompressor
    if kind == "lzop":
        lzo1x = _lzo1x()
        return lambda: LzopDecompressor(lzo1x)
    raise ValueError(f"unknown compression {kind!r}")


# What the decoders raise at damaged data (zstd adds its own ZstdError).
DAMAGED: tuple[type[Exception], ...] = (CodecError, zlib.error, OSError, EOFError,
                                        lzma.LZMAError)


# ---- a whole payload ------------------------------------------------------------------------


class _Payload:
    """What both payload readers share: errors at a stream offset and the output bound."""

    ev: Evidence
    start: int
    kind: str
    max_output: int | None
    produced: int
    problem: ImageError | None
    done: bool
    #: file offset just past the last member, once the payload was read to its clean end
    #: (None before, after damage, and for an external program, which does not say): the
    #: bytes from there to the end of the file are not compressed data
    end: int | None = None

    def fail(self, offset: int, message: str) -> ImageError:
        """The ImageError for ``offset`` in the decompressed stream."""
        where = f"{self.kind} stream offset {offset:#x}"
        return ImageError(self.ev.path, self.start, f"{where}: {message}")

    def _hand_out(self, out: bytes) -> bytes:
        """``out``, cut where the stream passes ``max_output`` (which ends the stream)."""
        if self.max_output is not None and self.produced + len(out) > self.max_output:
            out = out[: self.max_output - self.produced]
            self.problem = self.fail(
                self.max_output, f"stream expands past {self.max_output} bytes, far more than "
                "the guest RAM the image declares (decompression bomb?)")
            self.done = True
        self.produced += len(out)
        return out


class _Decoder(_Payload):
    """The decompressed bytes of the ``kind`` payload at file offset ``start`` of ``ev``, in
    the calling thread: ``read(n)`` gives at most ``n`` bytes (b"" at the end or at the first
    unreadable byte; ``problem`` then says why), at most ``max_output`` bytes in all (None:
    no bound) before a decompression-bomb error. Concatenated members are read in turn;
    bytes after the last one that do not start another are not decoded (``end`` says where
    they begin). :class:`StreamDecoder` runs one in a background thread."""

    def __init__(self, ev: Evidence, start: int, kind: str, max_output: int | None = None,
                 new: Callable[[], Any] | None = None) -> None:
        self.ev, self.start, self.kind, self.max_output = ev, start, kind, max_output
        self.new = new or decoder_factory(kind)
        self.damaged = DAMAGED + ((_zstd_module().ZstdError,) if kind == "zstd" else ())
        self.pos = start  # next compressed byte to read
        self.member = start  # file offset where the current member starts
        self.back = b""  # input read but not yet given to a decoder
        self.dec: Any = self.new()
        self.problem: ImageError | None = None
        self.done = False
        self.produced = 0

    def _input(self) -> bytes:
        if self.back:
            data, self.back = self.back, b""
        else:
            data = self.ev.read(self.pos, READ_CHUNK)
            self.pos += len(data)
        return data

    def read(self, n: int) -> bytes:
        while not self.done:
            want = n
            if self.max_output is not None:
                want = min(n, self.max_output - self.produced + 1)
            d = self.dec
            data = self._input() if d.needs_input else b""
            if not data and d.needs_input:
                self._stop(self.pos, "compressed data ends before its end marker (truncated)")
                break
            try:
                out = d.decompress(data, want)
            except self.damaged as exc:
                if isinstance(exc, CodecError):
                    self._stop(self.member + exc.offset, str(exc))
                else:
                    self._stop(self.pos, f"compressed data is corrupt ({exc})")
                break
            if d.eof:
                self._next_member(d.unused_data)
            if out:
                return self._hand_out(out)
        return b""

    def _next_member(self, rest: bytes) -> None:
        self.member = self.pos - len(rest)
        following = rest or self._input()
        if following.startswith(PAYLOAD_MAGICS[self.kind]):
            self.back = following
            self.dec = self.new()
        else:
            self.done = True  # trailing zero padding or garbage after the last member
            self.end = self.member

    def _stop(self, at: int, message: str) -> None:
        self.problem = ImageError(self.ev.path, at, f"{self.kind} payload: {message}")
        self.done = True

    def close(self) -> None:
        self.dec = None


class StreamDecoder(_Payload):
    """The decompressed bytes of the ``kind`` payload at file offset ``start`` of ``ev``,
    in-process and read ahead: a background thread (started by the first ``read``) decodes
    while the caller scans, keeping at most ``AHEAD`` bytes (plus one piece of at most
    ``BLOCK``) decoded and not yet taken. ``read(n)`` gives at most ``n`` bytes (b"" at the
    end or at the first unreadable byte; ``problem`` then says why), at most ``max_output``
    bytes in all (None: no bound) before a decompression-bomb error, exactly the bytes,
    errors and offsets of :class:`_Decoder`: ``problem`` and ``end`` are set when the bytes
    before them were taken, and an unexpected exception of the thread is raised here at that
    point. ``close()`` stops the thread and waits for it. Concatenated members are read in
    turn; bytes after the last one that do not start another are not decoded (``end`` says
    where they begin; the caller scans them as they are)."""

    def __init__(self, ev: Evidence, start: int, kind: str, max_output: int | None = None,
                 new: Callable[[], Any] | None = None) -> None:
        self.ev, self.start, self.kind, self.max_output = ev, start, kind, max_output
        self.source = _Decoder(ev, start, kind, max_output, new)
        self.problem: ImageError | None = None
        self.done = False
        self.produced = 0
        self.cond = threading.Condition()
        # Pieces decoded and not yet taken, each with the decoder's state after it: done,
        # problem, end, and any unexpected exception (the last piece may be empty).
        self.pieces: deque[tuple[bytes, bool, ImageError | None, int | None,
                                 BaseException | None]] = deque()
        self.taken = 0  # bytes of pieces[0] already handed out
        self.held = 0  # bytes in pieces not yet handed out
        self.stopping = False
        self.thread: threading.Thread | None = None

    def _ahead(self) -> int:
        """How far the thread may run ahead: it grows with what the caller took, so that a
        caller reading only a prefix (the metadata peek) does not pay for decoding more."""
        return min(AHEAD, max(FIRST, self.produced))

    def _run(self) -> None:
        src = self.source
        failure: BaseException | None = None
        while failure is None and not src.done:
            with self.cond:
                while self.held >= self._ahead() and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                step = min(BLOCK, self._ahead())
            try:
                out = src.read(step)
            except BaseException as exc:  # raised in the caller's thread, at this point
                out, failure = b"", exc
            with self.cond:
                self.pieces.append((out, src.done, src.problem, src.end, failure))
                self.held += len(out)
                self.cond.notify_all()

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.thread is None:
            # a daemon, so that a caller that never closes cannot keep the process alive
            self.thread = threading.Thread(target=self._run, name="vmleak-decode", daemon=True)
            self.thread.start()
        with self.cond:
            while not self.pieces:
                self.cond.wait()
            piece, done, problem, end, failure = self.pieces[0]
            out = piece[self.taken : self.taken + n] if self.taken or len(piece) > n else piece
            self.taken += len(out)
            self.held -= len(out)
            if self.taken == len(piece):
                self.pieces.popleft()
                self.taken = 0
                self.problem, self.end = problem, end
                self.done = done or failure is not None
            self.produced += len(out)
            self.cond.notify_all()
        if failure is not None:
            raise failure
        return out

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.pieces.clear()
            self.held = 0
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        self.done = True
        self.source.close()


class ProgramDecoder(_Payload):
    """The fallback: the payload decompressed by the external program (``PROGRAMS``) reading
    the file from ``start``, its output read through a pipe a chunk at a time; the same
    interface and bound as :class:`StreamDecoder`."""

    def __init__(self, ev: Evidence, start: int, kind: str, max_output: int | None = None,
                 why: str = "") -> None:
        self.ev, self.start, self.kind, self.max_output = ev, start, kind, max_output
        self.problem: ImageError | None = None
        self.produced = 0
        self.done = False
        tool = PROGRAMS[kind]
        if shutil.which(tool[0]) is None:
            raise ImageError(ev.path, start, f"{kind} payload: {why}, and the {tool[0]!r} "
                                             "program is not installed either")
        self.fh = open(ev.path, "rb")  # noqa: SIM115 - closed in close()
        self.fh.seek(start)
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(tool, stdin=self.fh, stdout=subprocess.PIPE, stderr=self.err)

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        data = self.proc.stdout.read(n) if self.proc.stdout else b""
        if not data and self.proc.wait() != 0:
            self.err.seek(0)
            msg = self.err.read(400).decode("utf-8", "replace").strip().splitlines()
            detail = msg[-1] if msg else f"exit status {self.proc.returncode}"
            self.problem = ImageError(self.ev.path, self.start, f"{self.kind} payload: {detail}")
        return self._hand_out(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.fh.close()
        self.err.close()


def opener(ev: Evidence, kind: str) -> tuple[Callable[..., Any], Remark | None]:
    """How to decompress ``kind`` payloads of ``ev``: ``open(start, max_output)`` making a
    decoder, and a remark to show when the in-process binding could not be loaded and the
    external program is used instead (ImageError at open when neither is available)."""
    try:
        new = decoder_factory(kind)
    except (ImportError, OSError) as exc:
        package = {"lzop": "lzokay", "zstd": "backports.zstd"}[kind]
        why = f"the Python package {package!r} cannot be loaded ({exc})"
        remark = Remark(ev.path, None, f"{kind} payload: {why}; decompressing with the "
                                       f"{PROGRAMS[kind][0]!r} program instead")

        def by_program(start: int, max_output: int | None = None) -> ProgramDecoder:
            return ProgramDecoder(ev, start, kind, max_output, why)

        return by_program, remark

    def in_process(start: int, max_output: int | None = None) -> StreamDecoder:
        return StreamDecoder(ev, start, kind, max_output, new)

    return in_process, None
