"""Shared stage 1 and stage 2 for the digit-based detectors (PAN, track data, SSN).

Stage 1 touches every byte of a chunk with a few full-width ufuncs: digits per 8-byte block,
zero bytes per block. A pair of blocks with >= 8 digits (ASCII), or >= 5 digits among >= 6
zero bytes (UTF-16LE text), is *hot*. Hot pairs, widened by ``MARGIN`` bytes each side (the
longest digit-based match plus its context), are copied into one small *compact* buffer —
typically a few percent of the chunk — with a break byte between regions that were not
adjacent. Stage 2 then works only on that buffer, through :class:`TextView`s: one ASCII view
and two UTF-16LE views (characters at even and at odd byte offsets, non-ASCII characters
turned into a break byte), so every detector's logic is written once, for ASCII text.

Everything here is memoized on the :class:`~patterns.base.Chunk`, so PAN, track and SSN
detectors share one stage 1 and one run analysis per view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterns.base import ASCII, UTF16LE, Chunk

#: bytes of context kept around hot blocks: a UTF-16LE Track 1 (79 characters = 158 bytes)
#: anchored anywhere on its PAN, plus a keyword 24 characters before it, fits inside.
MARGIN = 224
_MB = MARGIN // 8  # margin in 8-byte blocks
BREAK = 0xFF  # never a digit, separator or letter in any check below
DASH, SPACE = ord("-"), ord(" ")


@dataclass
class Runs:
    """Maximal digit runs of a text view (text-index units).

    ``start``/``length`` per run; ``link`` is the separator byte joining run i to run i+1
    (``-`` or space: exactly one separator between them) or 0 when they are not joined.
    """

    start: np.ndarray
    length: np.ndarray
    link: np.ndarray

    @property
    def end(self) -> np.ndarray:
        return self.start + self.length


class TextView:
    """ASCII-like text over part of a chunk: ``text`` is uint8, one byte per character;
    ``to_chunk`` maps text indices back to chunk byte offsets."""

    def __init__(self, text: np.ndarray, encoding: int, parity: int, blockmap: np.ndarray):
        self.text = text
        self.encoding = encoding  # ASCII or UTF16LE
        self._parity = parity
        self._blockmap = blockmap  # compact block index -> chunk block index
        self._runs: Runs | None = None
        self._digit: np.ndarray | None = None

    @property
    def width(self) -> int:
        """Bytes per character in the chunk."""
        return 2 if self.encoding == UTF16LE else 1

    def to_chunk(self, idx: np.ndarray) -> np.ndarray:
        """Chunk byte offsets of text indices ``idx``."""
        c = idx * self.width + self._parity  # compact-buffer offset
        return self._blockmap[c >> 3] * 8 + (c & 7)

    @property
    def digit(self) -> np.ndarray:
        """Boolean digit mask of ``text``."""
        if self._digit is None:
            self._digit = (self.text - 48).astype(np.uint8) < 10
        return self._digit

    def runs(self) -> Runs:
        """Maximal digit runs and the single-separator links between them (memoized)."""
        if self._runs is None:
            d = self.digit.view(np.int8)
            edges = np.flatnonzero(np.diff(d, prepend=0, append=0))
            start, end = edges[0::2], edges[1::2]
            link = np.zeros(start.size, np.uint8)
            if start.size > 1:
                gap1 = start[1:] == end[:-1] + 1
                sep = self.text[np.minimum(end[:-1], self.text.size - 1)]
                ok = gap1 & ((sep == DASH) | (sep == SPACE))
                link[:-1] = np.where(ok, sep, 0)
            self._runs = Runs(start.astype(np.int64), (end - start).astype(np.int64), link)
        return self._runs

    def byte_at(self, idx: np.ndarray) -> np.ndarray:
        """Characters at text indices ``idx`` (BREAK outside the text)."""
        inside = (idx >= 0) & (idx < self.text.size)
        out = np.full(idx.shape, BREAK, np.uint8)
        out[inside] = self.text[idx[inside]]
        return out

    def lower_at(self, idx: np.ndarray) -> np.ndarray:
        """ASCII-lowercased characters at ``idx`` (only letters change)."""
        c = self.byte_at(idx)
        upper = (c >= 65) & (c <= 90)
        return np.where(upper, c | 0x20, c)

    def has_word_before(self, pos: np.ndarray, words: tuple[bytes, ...], within: int) -> np.ndarray:
        """For each text index in ``pos``, whether one of ``words`` (lowercase) ends within
        ``within`` characters before it. Vectorized over the whole view, then looked up."""
        ends = self.word_ends(words)
        if ends.size == 0 or pos.size == 0:
            return np.zeros(pos.shape, bool)
        i = np.searchsorted(ends, pos, side="right") - 1
        ok = i >= 0
        return ok & (pos - ends[np.maximum(i, 0)] <= within)

    def word_ends(self, words: tuple[bytes, ...]) -> np.ndarray:
        """Sorted text indices just past each (case-insensitive) occurrence of ``words``."""
        t = self.text
        if t.size == 0:
            return np.zeros(0, np.int64)
        low = np.where((t >= 65) & (t <= 90), t | 0x20, t)
        found = []
        for w in words:
            n = len(w)
            if t.size < n:
                continue
            m = low[: t.size - n + 1] == w[0]
            for k in range(1, n):
                m &= low[k : t.size - n + 1 + k] == w[k]
            found.append(np.flatnonzero(m) + n)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def views(chunk: Chunk) -> list[TextView]:
    """The ASCII and two UTF-16LE text views of the chunk's hot regions (memoized)."""
    return chunk.memo("digits.views", _build_views)


def _build_views(chunk: Chunk) -> list[TextView]:
    data = chunk.data
    n = data.size
    nb = -(-n // 8)
    if n % 8:  # rare (a buffer's last chunk): pad a copy to whole blocks
        padded = np.zeros(nb * 8, np.uint8)
        padded[:n] = data
        data = padded
    blocks = data.reshape(nb, 8)
    t = np.subtract(data, 48, dtype=np.uint8)
    isdig = np.less(t, 10)
    zero = np.equal(data, 0)
    dcount = np.bitwise_count(isdig.view(np.uint64)).astype(np.uint8)
    zcount = np.bitwise_count(zero.view(np.uint64)).astype(np.uint8)
    if nb < 2:
        dpair, zpair = dcount, zcount
    else:
        dpair = dcount[:-1] + dcount[1:]
        zpair = zcount[:-1] + zcount[1:]
    hot = np.flatnonzero((dpair >= 8) | ((dpair >= 5) & (zpair >= 6)))
    if hot.size == 0:
        return []
    # Widen every hot pair by the margin (difference array over blocks; cheap: 1/8 size).
    lo = np.maximum(hot - _MB, 0)
    hi = np.minimum(hot + 2 + _MB, nb)
    cover = np.bincount(lo, minlength=nb + 1)[: nb + 1] - np.bincount(hi, minlength=nb + 1)
    mask = np.cumsum(cover[:nb]) > 0
    blockmap = np.flatnonzero(mask)
    compact = blocks[blockmap].reshape(-1)
    # Break bytes where the compact buffer joins blocks that are not adjacent in the chunk,
    # so no run is stitched across a gap (the bytes overwritten are margin, never a match).
    gaps = np.flatnonzero(np.diff(blockmap) > 1) + 1
    if gaps.size:
        at = gaps * 8
        compact[at] = BREAK
        compact[at + 1] = BREAK
        compact[at - 1] = BREAK
        compact[at - 2] = BREAK
    out = [TextView(compact, ASCII, 0, blockmap)]
    for parity in (0, 1):
        lo_b = compact[parity::2]
        hi_b = compact[parity + 1 :: 2]
        m = min(lo_b.size, hi_b.size)
        text = np.where(hi_b[:m] == 0, lo_b[:m], BREAK).astype(np.uint8)
        out.append(TextView(text, UTF16LE, parity, blockmap))
    return out


def luhn_ok(digits: np.ndarray, ndig: np.ndarray) -> np.ndarray:
    """Luhn check of each row of ``digits`` (int8, right-aligned, left-padded with zeros)."""
    w = digits.shape[1]
    v = digits.astype(np.int16)
    dbl = v[:, w - 2 :: -2]
    v[:, w - 2 :: -2] = dbl * 2 - 9 * (dbl > 4)
    return (v.sum(axis=1) % 10 == 0) & (ndig > 0)


def gather_digits(view: TextView, start: np.ndarray, span: np.ndarray, width: int) -> np.ndarray:
    """Digits of text spans ``[start, start+span)`` (separators skipped), right-aligned into
    rows of ``width`` (int8, zero padded on the left). Spans are short (<= 2*width)."""
    n = start.size
    maxspan = int(span.max()) if n else 0
    cols = np.arange(maxspan)
    idx = start[:, None] + cols[None, :]
    inside = cols[None, :] < span[:, None]
    chars = view.byte_at(np.where(inside, idx, -1))
    isd = ((chars - 48).astype(np.uint8) < 10) & inside
    # rank of each digit counted from the right end of its row
    from_right = np.cumsum(isd[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((n, width), np.int8)
    r, c = np.nonzero(isd)
    out[r, width - from_right[r, c]] = chars[r, c] - 48
    return out
