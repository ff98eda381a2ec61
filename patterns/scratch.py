"""Shared stage-1 helpers for the key and secret detectors (aes, der, pem, secrets).

- :func:`buffer` hands out preallocated scratch arrays (per thread, grown on demand) so the
  full-width passes of stage 1 write into memory that stays in cache instead of allocating
  a fresh array per chunk.
- :func:`u16_hits` finds a 2-byte literal at every byte offset of a byte stream with two
  aligned uint16 compares (the odd offsets through a shifted, aligned copy made once per chunk
  and shared), so no detector loops over bytes.
- :func:`streams` gives the views a text detector runs over: the chunk itself (ASCII) and the
  even / odd bytes of the chunk de-interleaved (the character bytes of UTF-16LE text stored at
  an even / odd address). A detector written for ASCII runs unchanged over all three and checks
  the UTF-16LE high bytes only at its rare candidates (:func:`utf16_clean`).
- :func:`gather` / :func:`run_lengths` turn candidate positions into small 2-D windows and the
  length of the token that starts there, vectorized over candidates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from patterns.base import ASCII, UTF16LE, Chunk

_local = threading.local()


def buffer(name: str, n: int, dtype: type | np.dtype) -> np.ndarray:
    """A scratch array of ``n`` elements, reused between calls in this thread.

    The contents are garbage; the caller overwrites them (``out=``). One buffer per name, so
    two live uses need two names."""
    pool: dict[str, np.ndarray] = getattr(_local, "pool", None) or {}
    _local.pool = pool
    dt = np.dtype(dtype)
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


@dataclass(frozen=True)
class Stream:
    """Text characters as one byte each: ``data[i]`` is the character at chunk offset
    ``base + step * i`` (``step`` 1 for ASCII, 2 for UTF-16LE)."""

    data: np.ndarray
    shifted: np.ndarray
    encoding: int
    step: int
    base: int

    def offsets(self, pos: np.ndarray) -> np.ndarray:
        """Chunk byte offsets of stream positions."""
        return self.base + self.step * np.asarray(pos, np.int64)


def _make_streams(chunk: Chunk) -> list[Stream]:
    d = chunk.data
    out = [Stream(d, shifted(chunk), ASCII, 1, 0)]
    for parity in (0, 1):
        chars = np.ascontiguousarray(d[parity::2])
        if chars.size > 1:
            out.append(Stream(chars, _shifted(chars), UTF16LE, 2, parity))
    return out


def streams(chunk: Chunk) -> list[Stream]:
    """ASCII stream and the two UTF-16LE streams of a chunk (computed once per chunk)."""
    return chunk.memo("scratch.streams", _make_streams)


#: registered 2-byte anchors -> the shortest run of TOKEN characters that must start there
_ANCHORS: dict[bytes, int] = {}


def register_anchor(pair: bytes, min_run: int) -> None:
    """Declare a 2-byte anchor (at import time): :func:`anchor_hits` finds every registered
    anchor in one shared pass per chunk, keeping hits where at least ``min_run`` TOKEN
    characters (see :data:`TOKEN`) start at the anchor."""
    _ANCHORS[pair] = min(min_run, _ANCHORS.get(pair, min_run))


def _anchor_pass(chunk: Chunk) -> dict[bytes, list[tuple[Stream, np.ndarray]]]:
    pairs = list(_ANCHORS)
    values = [p[0] | (p[1] << 8) for p in pairs]
    out: dict[bytes, list[tuple[Stream, np.ndarray]]] = {p: [] for p in pairs}
    for st in streams(chunk):
        found: list[tuple[np.ndarray, np.ndarray]] = []  # (byte offsets, uint16 values)
        n = st.data.size
        for off, src in ((0, st.data), (1, st.shifted)):
            m = (n - off) // 2
            if m <= 0 or not values:
                continue
            words = src[: 2 * m].view(np.uint16)
            hot = buffer("anchor.hot", m, np.bool_)
            tmp = buffer("anchor.tmp", m, np.bool_)
            np.equal(words, values[0], out=hot)
            for v in values[1:]:  # every anchor, then one flatnonzero for all of them
                np.equal(words, v, out=tmp)
                np.logical_or(hot, tmp, out=hot)
            if hot.any():
                idx = np.flatnonzero(hot)
                found.append((idx * 2 + off, words[idx]))
        if not found:
            continue
        pos = np.concatenate([f[0] for f in found])
        val = np.concatenate([f[1] for f in found])
        order = np.argsort(pos, kind="stable")
        pos, val = pos[order], val[order]
        need = np.zeros(pos.size, np.int64)
        for pair, v in zip(pairs, values, strict=True):
            need[val == v] = _ANCHORS[pair]
        keep = run_lengths(st.data, pos, _TOKEN_TABLE, int(need.max())) >= need
        pos, val = pos[keep], val[keep]
        for pair, v in zip(pairs, values, strict=True):
            sel = pos[val == v]
            if sel.size:
                out[pair].append((st, sel))
    return out


def anchor_hits(chunk: Chunk, pair: bytes) -> list[tuple[Stream, np.ndarray]]:
    """(stream, positions) of a registered anchor in every stream of the chunk."""
    return chunk.memo("scratch.anchors", _anchor_pass)[pair]


def literal_hits(chunk: Chunk, literal: bytes, anchor: int) -> list[tuple[Stream, np.ndarray]]:
    """(stream, positions) where ``literal`` starts; ``literal[anchor:anchor+2]`` must be a
    registered anchor (e.g. ``b"eyJ"`` with anchor 1 for ``yJ``)."""
    lit = np.frombuffer(literal, np.uint8)
    out = []
    for st, hits in anchor_hits(chunk, literal[anchor : anchor + 2]):
        pos = hits - anchor
        pos = pos[(pos >= 0) & (pos + len(literal) <= st.data.size)]
        if pos.size:
            pos = pos[(gather(st.data, pos, len(literal)) == lit).all(axis=1)]
        if pos.size:
            out.append((st, pos))
    return out


def gather(data: np.ndarray, pos: np.ndarray, width: int, fill: int = 0) -> np.ndarray:
    """Rows ``data[p:p+width]`` for each ``p`` (a small 2-D copy); bytes past either end of
    ``data`` read as ``fill``."""
    pos = np.asarray(pos, np.int64)
    idx = pos[:, None] + np.arange(width, dtype=np.int64)[None, :]
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
#: characters of every token the anchors lead into (secrets, PEM armour words)
TOKEN = BASE64URL + b"."
_TOKEN_TABLE = charset(TOKEN)


def run_lengths(data: np.ndarray, pos: np.ndarray, table: np.ndarray, limit: int) -> np.ndarray:
    """Length (0..limit) of the run of ``table`` members starting at each ``pos``."""
    if pos.size == 0:
        return np.zeros(0, np.int64)
    win = table[gather(data, pos, limit)]
    full = win.all(axis=1)
    return np.where(full, limit, np.argmin(win, axis=1)).astype(np.int64)


def utf16_clean(chunk: Chunk, stream: Stream, pos: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Mask of candidates whose characters ``[pos, pos+length)`` are real UTF-16LE ASCII (every
    high byte zero); all True on the ASCII stream."""
    if stream.encoding != UTF16LE or pos.size == 0:
        return np.ones(pos.size, np.bool_)
    width = int(length.max())
    hi = gather(chunk.data, stream.offsets(pos) + 1, 2 * width, fill=1)[:, ::2]
    inside = np.arange(width)[None, :] < length[:, None]
    return ~((hi != 0) & inside).any(axis=1)


def boundary_ok(
    chunk: Chunk, stream: Stream, pos: np.ndarray, end: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """Mask of tokens ``[pos, end)`` (stream positions) not glued to another ``table``
    character on either side (a token inside a longer run is some other string). In UTF-16LE
    a neighbour counts only if its high byte is zero (else it is another character)."""
    d = stream.data
    before = np.where(pos > 0, d[np.maximum(pos - 1, 0)], 0)
    after = np.where(end < d.size, d[np.minimum(end, d.size - 1)], 0)
    glued_before, glued_after = table[before], table[after]
    if stream.encoding == UTF16LE:
        data = chunk.data
        hb = stream.offsets(pos - 1) + 1  # high byte of the character before
        ha = stream.offsets(end) + 1
        glued_before &= (hb < 1) | (data[np.clip(hb, 0, data.size - 1)] == 0)
        glued_after &= (ha >= data.size) | (data[np.clip(ha, 0, data.size - 1)] == 0)
    return ~glued_before & ~glued_after
