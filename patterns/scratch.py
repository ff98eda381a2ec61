"""Shared stage-1 helpers for the key and secret detectors (aes, der, pem, secrets).

- :func:`buffer` hands out preallocated scratch arrays (per thread, grown on demand) so the
  full-width passes of stage 1 write into memory that stays in cache instead of allocating
  a fresh array per chunk.
- :func:`u16_hits` finds a 2-byte literal at every byte offset of a buffer with two aligned
  uint16 compares (the odd offsets through a shifted, aligned copy made once per chunk).
- Text detectors share one gate and the streams behind it (:func:`anchor_hits`,
  :func:`literal_hits`). The gate marks *texty* 4-byte words: all four bytes in ``-``..``z``
  (ASCII), or two such characters each followed by a zero byte (UTF-16LE at an even or odd
  address), and keeps two consecutive ones, widened by :data:`REACH` bytes: every token we
  look for (11+ characters of that range, or a PEM header within REACH of its body) lies
  inside. Zero pages, code and random data are rejected in a few passes. The ASCII-hot
  regions are searched as one stream, the UTF-16LE-hot regions as two (their even / odd bytes
  de-interleaved: the characters), packed together with zero separators, or the chunk itself
  when mostly hot. Every anchor is searched in one pass per stream (:func:`register_anchor`);
  candidates come back as chunk offsets with their encoding and character step, and
  everything after (token length, boundaries, UTF-16LE high bytes) reads the chunk itself.
- :func:`gather` / :func:`run_lengths` / :func:`boundary_ok` / :func:`utf16_clean` work on
  candidate offsets as small 2-D windows, vectorized over candidates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from patterns.base import ASCII, UTF16LE, Chunk

_local = threading.local()
POOL_LIMIT = 4 << 20  # bytes: scratch arrays up to this size are kept for the next chunk

#: margin (max_len + context, bytes) every text detector declares: the engine scans detectors
#: with the same margin over the same chunk, so they share this module's per-chunk passes
TEXT_MARGIN = 8192
REACH = 128  # bytes kept around texty words (a PEM header before its base64 body)
SEPARATOR = 8  # zero bytes between hot regions in the compact buffer (ends every run)
MOSTLY_HOT = 0.5  # above this share of hot bytes the whole chunk is searched as is
TEXT_LO, TEXT_SPAN = 0x2D, 0x4E  # '-' .. 'z': the bytes of every token we anchor on
#: texty uint32 words (little-endian) of the per-byte code "in range" = 1, "zero" = 2: four
#: ASCII characters, or two UTF-16LE characters at an even / odd address
ASCII_WORD, UTF16_WORDS = 0x01010101, (0x02010201, 0x01020102)


def buffer(name: str, n: int, dtype: type | np.dtype) -> np.ndarray:
    """A scratch array of ``n`` elements, reused between calls in this thread.

    The contents are garbage; the caller overwrites them (``out=``). One buffer per name, so
    two live uses need two names."""
    dt = np.dtype(dtype)
    if n * dt.itemsize > POOL_LIMIT:  # a rare big batch: not worth keeping around
        return np.empty(n, dt)
    pool: dict[str, np.ndarray] = getattr(_local, "pool", None) or {}
    _local.pool = pool
    arr = pool.get(name)
    if arr is None or arr.dtype != dt or arr.size < n:
        arr = pool[name] = np.empty(max(n, 1 << 16), dt)
    return arr[:n]


def _shifted(data: np.ndarray) -> np.ndarray:
    """``data[1:]`` copied to an aligned buffer (for odd-offset uint16 compares)."""
    out = np.empty(max(data.size - 1, 0), np.uint8)
    np.copyto(out, data[1:])
    return out


def shifted(chunk: Chunk) -> np.ndarray:
    """``chunk.data[1:]`` as an aligned copy, made once per chunk for every detector."""
    return chunk.memo("scratch.shifted", lambda c: _shifted(c.data))


def u16_hits(data: np.ndarray, pair: bytes, shifted: np.ndarray | None = None) -> np.ndarray:
    """Sorted byte offsets ``p`` where ``data[p:p+2] == pair``.

    ``shifted`` is ``data[1:]`` as an aligned copy (pass it when several pairs are searched in
    the same buffer; made here otherwise)."""
    n = data.size
    if n < 2:
        return np.zeros(0, np.int64)
    value = pair[0] | (pair[1] << 8)
    out = []
    for off, src in ((0, data), (1, shifted)):
        if off == 1 and src is None:
            src = _shifted(data)
        m = (n - off) // 2
        if m <= 0:
            continue
        words = src[: 2 * m].view(np.uint16)
        eq = buffer("u16eq", m, np.bool_)
        np.equal(words, value, out=eq)
        if eq.any():
            out.append(np.flatnonzero(eq) * 2 + off)
    if not out:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(out)) if len(out) > 1 else out[0]


# --- the text gate and streams ---------------------------------------------------------------


def _regions(pair: np.ndarray, a0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the byte regions around hot word pairs (``pair[k]``: aligned words
    k and k+1 texty), widened by REACH, merged, in a buffer of ``n`` bytes."""
    none = np.zeros(0, np.int64)
    nb = pair.size // 8  # 8 pairs (32 bytes) per uint64: a block is hot if any pair is
    blocks = pair[: 8 * nb].view(np.uint64)
    tail = bool(pair[8 * nb :].any())
    if not (tail or blocks.any()):
        return none, none
    b = np.flatnonzero(blocks != 0) * 32 + a0  # (bool nonzero is much faster than uint64)
    if tail:
        b = np.append(b, 32 * nb + a0)
    lo = np.maximum(b - REACH, 0)
    hi = np.minimum(b + 32 + 4 + REACH, n)  # the block's last pair reaches 4 bytes past it
    # windows are equally wide and sorted: a region starts where one begins past the last end
    new = np.ones(b.size, np.bool_)
    new[1:] = lo[1:] > hi[:-1]
    first = np.flatnonzero(new)
    return lo[first], np.append(hi[first[1:] - 1], hi[-1])


def _texty_code(data: np.ndarray) -> np.ndarray:
    """Per byte (scratch buffer): 1 if in ``-``..``z``, 2 if zero, else 0."""
    n = data.size
    t = buffer("gate.t", n, np.uint8)
    np.subtract(data, TEXT_LO, out=t)  # wraps: bytes below '-' become large
    code = buffer("gate.code", n, np.uint8)
    np.less(t, TEXT_SPAN, out=code.view(np.bool_))
    zero = buffer("gate.zero", n, np.bool_)
    np.equal(data, 0, out=zero)
    np.add(zero.view(np.uint8), zero.view(np.uint8), out=t)  # 2 where zero (a shift is slower)
    np.bitwise_or(code, t, out=code)
    return code


_ROWS_MEMO: list = [None, {}]  # the edge-window rows last asked about, and answers by reach


def texty_near_middle(rows: np.ndarray, reach: int) -> np.ndarray:
    """For the engine's edge windows (rows whose middle is where two pieces of guest memory
    meet): whether two consecutive texty words (see the gate) lie within ``reach`` bytes of
    the middle. A text match touching the middle, or whose context does, has them there; the
    answer is shared by the detectors asking about the same rows."""
    if _ROWS_MEMO[0] is not rows:
        _ROWS_MEMO[:] = [rows, {}]
    answers = _ROWS_MEMO[1]
    if reach not in answers:
        n, width = rows.shape
        mid = width // 2
        lo = max(0, mid - reach) // 4 * 4
        hi = lo + (min(width, mid + reach) - lo) // 4 * 4
        band = np.ascontiguousarray(rows[:, lo:hi]).reshape(-1)
        words = _texty_code(band).view(np.uint32).reshape(n, -1)
        hot = words == ASCII_WORD
        for value in UTF16_WORDS:
            hot |= words == value
        answers[reach] = (hot[:, :-1] & hot[:, 1:]).any(axis=1)
    return answers[reach]


def _hot_regions(data: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(starts, ends) of ASCII-texty regions, (starts, ends) of UTF-16LE-texty regions]."""
    n = data.size
    a0 = (-data.ctypes.data) % 4
    nw = (n - a0) // 4
    if nw < 2:
        whole = (np.zeros(1, np.int64), np.full(1, n, np.int64))
        return [whole, whole]
    words = _texty_code(data)[a0 : a0 + 4 * nw].view(np.uint32)
    hot = buffer("gate.hot", nw, np.bool_)
    tmp = buffer("gate.tmp", nw, np.bool_)
    pair = buffer("gate.pair", nw - 1, np.bool_)
    out = []
    for values in ((ASCII_WORD,), UTF16_WORDS):
        np.equal(words, values[0], out=hot)
        for value in values[1:]:
            np.equal(words, value, out=tmp)
            np.logical_or(hot, tmp, out=hot)
        np.logical_and(hot[:-1], hot[1:], out=pair)
        out.append(_regions(pair, a0, n))
    return out


@dataclass(frozen=True)
class Stream:
    """Characters as one byte each: ``data[i]`` is the character at offset ``base + step*i``
    of the searched buffer (``step`` 1 for ASCII, 2 for UTF-16LE): the chunk, or its hot
    regions packed (``packed_starts[k]`` in the buffer is ``chunk_starts[k]`` in the chunk)."""

    data: np.ndarray
    shifted: np.ndarray
    encoding: int
    step: int
    base: int
    packed_starts: np.ndarray
    chunk_starts: np.ndarray

    def to_chunk(self, pos: np.ndarray) -> np.ndarray:
        """Chunk offsets of stream positions."""
        packed = self.base + self.step * pos
        k = np.searchsorted(self.packed_starts, packed, side="right") - 1
        return self.chunk_starts[k] + (packed - self.packed_starts[k])


def _pack(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """(buffer, packed starts, chunk starts): the regions copied one after another with
    SEPARATOR zero bytes between, or ``data`` itself when mostly hot."""
    lengths = ends - starts
    if lengths.sum() > MOSTLY_HOT * data.size:
        return data, np.zeros(1, np.int64), np.zeros(1, np.int64)
    packed = np.concatenate(([0], np.cumsum(lengths + SEPARATOR)[:-1]))
    buf = np.zeros(int(packed[-1] + lengths[-1] + SEPARATOR), np.uint8)
    for p, a, e in zip(packed.tolist(), starts.tolist(), ends.tolist(), strict=True):
        buf[p : p + e - a] = data[a:e]  # regions are few: merged over REACH bytes
    return buf, packed, starts


def _make_streams(chunk: Chunk) -> list[Stream]:
    d = chunk.data
    (a_starts, a_ends), (u_starts, u_ends) = _hot_regions(d)
    out = []
    if a_starts.size:
        buf, packed, origin = _pack(d, a_starts, a_ends)
        sh = shifted(chunk) if buf is d else _shifted(buf)
        out.append(Stream(buf, sh, ASCII, 1, 0, packed, origin))
    if u_starts.size:
        buf, packed, origin = _pack(d, u_starts, u_ends)
        for parity in (0, 1):
            chars = np.ascontiguousarray(buf[parity::2])
            if chars.size > 1:
                out.append(Stream(chars, _shifted(chars), UTF16LE, 2, parity, packed, origin))
    return out


def _streams(chunk: Chunk) -> list[Stream]:
    return chunk.memo("scratch.streams", _make_streams)


Candidates = list[tuple[int, int, np.ndarray]]  # (encoding, step in bytes, chunk offsets)


#: every 2-character anchor some detector searches (see :func:`register_anchor`)
_ANCHORS: list[bytes] = []


def register_anchor(pair: bytes) -> None:
    """Declare an anchor at import time, so the one anchor pass per chunk covers it."""
    if pair not in _ANCHORS:
        _ANCHORS.append(pair)


_TABLE: list = [None, None]  # (anchors it was built for, 65536-entry bool lookup table)


def _anchor_table() -> np.ndarray:
    """Lookup table over uint16 words: True at every registered anchor's value."""
    if _TABLE[0] != _ANCHORS:
        table = np.zeros(1 << 16, np.bool_)
        table[[p[0] | (p[1] << 8) for p in _ANCHORS]] = True
        _TABLE[:] = [list(_ANCHORS), table]
    return _TABLE[1]


def _anchor_pass(chunk: Chunk) -> dict[bytes, Candidates]:
    """All registered anchors in every stream: one compare per anchor and alignment, OR-ed,
    then a single flatnonzero; the hits are sorted out by their uint16 value."""
    values = [p[0] | (p[1] << 8) for p in _ANCHORS]
    out: dict[bytes, Candidates] = {p: [] for p in _ANCHORS}
    for st in _streams(chunk):
        n = st.data.size
        pos_parts, val_parts = [], []
        for off, src in ((0, st.data), (1, st.shifted)):
            m = (n - off) // 2
            if m <= 0 or not values:
                continue
            words = src[: 2 * m].view(np.uint16)
            hot = buffer("anchor.hot", m, np.bool_)
            np.take(_anchor_table(), words, out=hot)  # one lookup pass for every anchor
            if hot.any():
                idx = np.flatnonzero(hot)
                pos_parts.append(idx * 2 + off)
                val_parts.append(words[idx])
        if not pos_parts:
            continue
        pos, val = np.concatenate(pos_parts), np.concatenate(val_parts)
        offs = st.to_chunk(pos)
        for pair, v in zip(_ANCHORS, values, strict=True):
            sel = offs[val == v]
            if sel.size:
                out[pair].append((st.encoding, st.step, np.sort(sel)))
    return out


def anchor_hits(chunk: Chunk, pair: bytes) -> Candidates:
    """Chunk offsets of a registered 2-character anchor (ASCII, or UTF-16LE characters with
    their high bytes not yet checked) in the chunk's texty regions."""
    return chunk.memo("scratch.anchors", _anchor_pass)[pair]


def literal_hits(chunk: Chunk, literal: bytes, anchor: int) -> Candidates:
    """Chunk offsets where ``literal`` starts (ASCII or UTF-16LE characters, high bytes not
    yet checked); ``literal[anchor:anchor+2]`` is the registered pair searched in stage 1
    (e.g. ``b"eyJ"`` with anchor 1 for ``yJ``)."""
    lit = np.frombuffer(literal, np.uint8)
    out = []
    for enc, step, hits in anchor_hits(chunk, literal[anchor : anchor + 2]):
        pos = hits - anchor * step
        pos = pos[(pos >= 0) & (pos + step * len(literal) <= chunk.data.size)]
        if pos.size:
            pos = pos[(gather(chunk.data, pos, len(literal), step) == lit).all(axis=1)]
        if pos.size:
            out.append((enc, step, pos))
    return out


# --- candidate helpers -----------------------------------------------------------------------


def gather(
    data: np.ndarray, pos: np.ndarray, width: int, step: int = 1, fill: int = 0
) -> np.ndarray:
    """Rows ``data[p : p + step*width : step]`` for each ``p`` (a small 2-D copy); bytes past
    either end of ``data`` read as ``fill``."""
    pos = np.asarray(pos, np.int64)
    idx = pos[:, None] + step * np.arange(width, dtype=np.int64)[None, :]
    ok = (idx >= 0) & (idx < data.size)
    out = np.full(idx.shape, fill, np.uint8)
    out[ok] = data[idx[ok]]
    return out


def charset(chars: bytes) -> np.ndarray:
    """A 256-entry membership table for :func:`run_lengths`."""
    t = np.zeros(256, np.bool_)
    t[np.frombuffer(chars, np.uint8)] = True
    return t


ALNUM = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE64URL = ALNUM + b"-_"


def run_lengths(
    data: np.ndarray, pos: np.ndarray, table: np.ndarray, limit: int, step: int = 1
) -> np.ndarray:
    """Length in characters (0..limit) of the run of ``table`` members starting at each
    ``pos``, reading every ``step``-th byte."""
    if pos.size == 0:
        return np.zeros(0, np.int64)
    # most runs are short: read 8 characters, then further only where the run goes on
    run = np.zeros(pos.size, np.int64)
    todo = np.arange(pos.size)
    for width in (8, 64, limit):
        width = min(width, limit)
        run[todo] = _runs(data, pos[todo], table, width, step)
        if width == limit:
            break
        todo = todo[run[todo] == width]
        if todo.size == 0:
            break
    return run


def _runs(
    data: np.ndarray, pos: np.ndarray, table: np.ndarray, width: int, step: int
) -> np.ndarray:
    win = table[gather(data, pos, width, step)]
    return np.where(win.all(axis=1), width, np.argmin(win, axis=1)).astype(np.int64)


def utf16_clean(data: np.ndarray, pos: np.ndarray, length: np.ndarray, step: int) -> np.ndarray:
    """Mask of candidates whose ``length`` characters from chunk offset ``pos`` are real
    UTF-16LE ASCII (every high byte zero); all True when ``step`` is 1 (ASCII)."""
    if step == 1 or pos.size == 0:
        return np.ones(pos.size, np.bool_)
    width = int(length.max())
    hi = gather(data, pos + 1, width, 2, fill=1)
    inside = np.arange(width)[None, :] < length[:, None]
    return ~((hi != 0) & inside).any(axis=1)


def boundary_ok(
    data: np.ndarray, pos: np.ndarray, length: np.ndarray, step: int, table: np.ndarray
) -> np.ndarray:
    """Mask of tokens of ``length`` characters at chunk offsets ``pos`` not glued to another
    ``table`` character on either side (a token inside a longer run is some other string).
    In UTF-16LE a neighbour counts only if its high byte is zero (else it is another
    character)."""
    before = gather(data, pos - step, step)
    after = gather(data, pos + step * length, step)
    glued_before, glued_after = table[before[:, 0]], table[after[:, 0]]
    if step == 2:
        glued_before &= before[:, 1] == 0
        glued_after &= after[:, 1] == 0
    return ~glued_before & ~glued_after
