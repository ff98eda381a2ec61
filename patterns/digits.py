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

#: bytes kept around hot blocks: a grouped UTF-16LE PAN (46 bytes) anchored anywhere on a hot
#: pair, its boundary characters, and an SSN keyword up to 24 characters before a bare number.
#: Longer matches (Track 1) read their tail from the chunk itself (``TextView.chunk_text``).
MARGIN = 64
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

    def __init__(
        self, text: np.ndarray, encoding: int, parity: int, blockmap: np.ndarray,
        chunk: np.ndarray,
    ) -> None:
        self.text = text
        self._chunk = chunk
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

    def chunk_text(self, idx: int, nchars: int) -> bytes:
        """Up to ``nchars`` characters from text index ``idx`` on, read from the chunk itself
        (so past the compact buffer's margin), one byte per character (non-ASCII UTF-16
        characters become BREAK)."""
        start = int(self.to_chunk(np.array([idx]))[0])
        raw = self._chunk[start : start + nchars * self.width]
        if self.encoding == UTF16LE:
            m = raw.size // 2
            raw = np.where(raw[1 : 2 * m : 2] == 0, raw[0 : 2 * m : 2], BREAK).astype(np.uint8)
        return raw.tobytes()

    @property
    def digit(self) -> np.ndarray:
        """Boolean digit mask of ``text``."""
        if self._digit is None:
            self._digit = (self.text - 48).astype(np.uint8) < 10
        return self._digit

    def runs(self) -> Runs:
        """Maximal digit runs and the single-separator links between them (memoized)."""
        if self._runs is None:
            d = self.digit
            edges = np.flatnonzero(d[1:] != d[:-1]) + 1
            if d.size and d[0]:
                edges = np.concatenate(([0], edges))
            if d.size and d[-1]:
                edges = np.concatenate((edges, [d.size]))
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
        n = self.text.size
        if n == 0:
            return np.full(idx.shape, BREAK, np.uint8)
        out = self.text.take(np.clip(idx, 0, n - 1))
        out[(idx < 0) | (idx >= n)] = BREAK
        return out

    def lower_at(self, idx: np.ndarray) -> np.ndarray:
        """ASCII-lowercased characters at ``idx`` (only letters change)."""
        c = self.byte_at(idx)
        upper = (c >= 65) & (c <= 90)
        return np.where(upper, c | 0x20, c)

    def has_word_before(self, pos: np.ndarray, words: tuple[bytes, ...], within: int) -> np.ndarray:
        """For each text index in ``pos``, whether one of ``words`` (lowercase) ends within
        ``within`` characters before it."""
        if pos.size == 0:
            return np.zeros(0, bool)
        ends = self.word_ends(words)
        if ends.size == 0:
            return np.zeros(pos.shape, bool)
        i = np.searchsorted(ends, pos, side="right") - 1
        return (i >= 0) & (pos - ends[np.maximum(i, 0)] <= within)

    def word_ends(self, words: tuple[bytes, ...]) -> np.ndarray:
        """Sorted text indices just past each (case-insensitive) occurrence of ``words``,
        anchored on their first letters (few) and checked with small gathers."""
        t = self.text
        found = []
        for first in {w[0] for w in words}:
            anchors = np.flatnonzero((t | 0x20) == first)
            if anchors.size == 0:
                continue
            for w in (w for w in words if w[0] == first):
                ok = np.ones(anchors.size, bool)
                for k in range(1, len(w)):
                    ok &= self.lower_at(anchors + k) == w[k]
                found.append(anchors[ok] + len(w))
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def views(chunk: Chunk) -> list[TextView]:
    """The ASCII and two UTF-16LE text views of the chunk's hot regions (memoized)."""
    return chunk.memo("digits.views", _build_views)


SUB = 256 * 1024  # stage-1 block: fits L2 with its temporaries (PERFORMANCE.md)


_EVEN = np.uint64(0x0001000100010001)  # bytes 0, 2, 4, 6 of a little-endian word
_ODD = np.uint64(0x0100010001000100)  # bytes 1, 3, 5, 7


class _Stage1:
    """Preallocated stage-1 buffers (one set per process, reused for every block)."""

    def __init__(self) -> None:
        self.t = np.empty(SUB, np.uint8)
        self.dig = np.empty(SUB, bool)
        self.w = np.empty(SUB // 8, np.uint64)
        self.counts = np.empty((3, SUB // 8), np.uint8)

    def hot_pairs(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block-pair indices of ``a`` (len a multiple of 8, <= SUB) that look like ASCII
        digit text, and those that look like UTF-16LE digits (digits on one parity only).

        Per 8-byte block: digits, digits at even and at odd offsets (popcounts of the
        digit mask seen as uint64 words). A pair of blocks is hot with >= 8 digits (ASCII)
        or >= 5 digits on one parity (UTF-16LE; zeros between are checked in stage 2)."""
        n = a.size
        t, dig, w = self.t[:n], self.dig[:n], self.w[: n // 8]
        dc, ec, oc = self.counts[:, : n // 8]
        np.less(np.subtract(a, 48, out=t), 10, out=dig)
        words = dig.view(np.uint64)
        np.bitwise_count(words, out=dc)
        np.bitwise_count(np.bitwise_and(words, _EVEN, out=w), out=ec)
        np.bitwise_count(np.bitwise_and(words, _ODD, out=w), out=oc)
        if dc.size < 2:
            z = np.zeros(0, np.int64)
            return z, z
        dp = dc[:-1] + dc[1:]
        par = np.maximum(ec[:-1] + ec[1:], oc[:-1] + oc[1:])
        return np.flatnonzero(dp >= 8), np.flatnonzero((par >= 5) & (dp - par <= 1))


_STAGE1: list[_Stage1] = []


def _build_views(chunk: Chunk) -> list[TextView]:
    data = chunk.data
    n = data.size
    nb = -(-n // 8)
    if n % 8:  # rare (a buffer's last chunk): pad a copy to whole blocks
        padded = np.zeros(nb * 8, np.uint8)
        padded[:n] = data
        data = padded
    if not _STAGE1:
        _STAGE1.append(_Stage1())
    st1 = _STAGE1[0]
    found: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    # Stage 1 in L2-sized blocks overlapping by one 8-byte block, so pairs across a block
    # boundary are seen too.
    lo = 0
    while True:
        for acc, hot in zip(found, st1.hot_pairs(data[lo : lo + SUB]), strict=True):
            if hot.size:
                acc.append(hot + lo // 8)
        if lo + SUB >= nb * 8:
            break
        lo += SUB - 8
    blocks = data.reshape(nb, 8)
    out = []
    ascii_hot, utf16_hot = (_sorted_unique(h) for h in found)
    if ascii_hot.size:
        bm = _regions(ascii_hot, nb, _MB)
        out.append(TextView(_compact(blocks, bm), ASCII, 0, bm, chunk.data))
    if utf16_hot.size:
        bm = _regions(utf16_hot, nb, _MB)
        c16 = _compact(blocks, bm)
        for parity in (0, 1):
            lo_b = c16[parity::2]
            hi_b = c16[parity + 1 :: 2]
            m = min(lo_b.size, hi_b.size)
            text = np.where(hi_b[:m] == 0, lo_b[:m], BREAK).astype(np.uint8)
            out.append(TextView(text, UTF16LE, parity, bm, chunk.data))
    return out


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate ascending index arrays whose neighbours may share their edge value."""
    if not parts:
        return np.zeros(0, np.int64)
    hot = np.concatenate(parts)
    if len(parts) > 1:
        hot = hot[np.concatenate(([True], hot[1:] > hot[:-1]))]
    return hot


def _compact(blocks: np.ndarray, blockmap: np.ndarray) -> np.ndarray:
    """The chosen 8-byte blocks, concatenated, with break bytes where blocks that are not
    adjacent in the chunk meet (so no digit run is stitched across a gap; the bytes
    overwritten are margin, never part of a match)."""
    compact = blocks[blockmap].reshape(-1)
    gaps = np.flatnonzero(np.diff(blockmap) > 1) + 1
    if gaps.size:
        at = gaps * 8
        for d in (-2, -1, 0, 1):
            compact[at + d] = BREAK
    return compact


def _regions(hot: np.ndarray, nb: int, k: int) -> np.ndarray:
    """Sorted block indices within ``k`` blocks of a hot pair (pair i covers blocks i and
    i+1): merged intervals expanded with one repeat/cumsum over the (small) result."""
    lo = np.maximum(hot - k, 0)
    hi = np.minimum(hot + 2 + k, nb)  # exclusive; hot is sorted, so are lo and hi
    new = np.ones(hot.size, bool)
    new[1:] = lo[1:] > hi[:-1]
    starts = lo[new]
    ends = np.maximum.reduceat(hi, np.flatnonzero(new))
    lengths = ends - starts
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum())) + offsets


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
