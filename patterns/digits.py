"""Shared stage 1 and stage 2 for the digit-based detectors (PAN, track data, SSN).

Stage 1 touches every byte of a chunk with a few full-width ufuncs: digits per 8-byte block,
zero bytes per block. A pair of blocks with >= 8 digits (ASCII), or >= 5 digits among >= 6
zero bytes (UTF-16LE text), is *hot*. Hot pairs, widened by ``MARGIN`` characters each side
(the farthest a digit-based match or its keyword reaches from them), are copied into one
small *compact* buffer — typically a few percent of the chunk — with a break byte between
regions that were not adjacent. Stage 2 then works only on that buffer, through
:class:`TextView`s: one ASCII view and two UTF-16LE views (characters at even and at odd
byte offsets, non-ASCII characters turned into a break byte), so every detector's logic is
written once, for ASCII text. Their common ground is the view's digit chains
(:class:`Chains`), worked out block by block over the text: each chain's separator positions
are one uint64 word, so detectors read its groups with a few integer operations per chain.

Everything here is memoized on the :class:`~patterns.base.Chunk`, so PAN, track and SSN
detectors share one stage 1 and one run analysis per view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from patterns.base import ASCII, UTF16LE, Chunk, Detector
from patterns.scratch import buffer

#: characters kept before and after hot blocks: the farthest reach from a hot pair is an SSN
#: keyword (up to 15 characters) ending 24 characters before a bare number whose digits the
#: pair holds: all but 1 in ASCII, 5 of 9 in UTF-16LE (so 4 may lie before it). Grouped PANs
#: (23 characters), Track 2 (40) and boundary characters reach less; Track 1 reads its tail
#: from the chunk itself (``TextView.chunk_text``).
MARGIN = {ASCII: 15 + 24 + 1, UTF16LE: 15 + 24 + 4}
_MB = {ASCII: -(-MARGIN[ASCII] // 8), UTF16LE: -(-2 * MARGIN[UTF16LE] // 8)}  # in blocks
BREAK = 0xFF  # never a digit, separator or letter in any check below
DASH, SPACE = ord("-"), ord(" ")


#: shortest chain any detector uses (bytes of text): a bare SSN has 9 digits, the digits after
#: a Track 2 '=' at least 7 (expiry and service code)
MIN_CHAIN = 7
#: longest chain worth reading: a 19-digit PAN in 5 groups, plus a word-glued group each end
MAX_CHAIN = 64
#: most digit groups in a chain that detectors look at (a 4-4-4-4-3 PAN has 5)
MAX_GROUPS = 5
#: digits of the first group of every grouped match (PAN groupings 4, an SSN 3)
FIRST_GROUP = np.array([3, 4])


@dataclass
class Chains:
    """Maximal digit chains of a text view (text-index units): digits, and single ``-`` or
    space separators standing between two digits. Only chains of >= MIN_CHAIN characters
    are kept (nothing shorter is any detector's match).

    ``start``/``end`` per chain; ``links``: number of separators in it; ``sep``: the first
    separator's byte (0 if none); ``same_sep``: every separator is that byte; ``key``: the
    lengths of its first MAX_GROUPS digit groups packed 5 bits each, first group lowest
    (-1 when it has more groups, mixed separators, or a first group of other than
    FIRST_GROUP digits); ``bits``: uint64 whose bit k is set when text ``start + 1 + k`` is
    a separator (0 for a chain of all glued groups, which no detector reads).
    """

    start: np.ndarray
    end: np.ndarray
    links: np.ndarray
    sep: np.ndarray
    key: np.ndarray
    bits: np.ndarray


def group_key(groups: tuple[int, ...]) -> int:
    """The ``Chains.key`` of a chain with these digit-group lengths."""
    return sum(g << (5 * j) for j, g in enumerate(groups))


class TextView:
    """ASCII-like text over part of a chunk: ``text`` is uint8, one byte per character;
    ``to_chunk`` maps text indices back to chunk byte offsets."""

    def __init__(
        self, text: np.ndarray, encoding: int, parity: int,
        regions: tuple[np.ndarray, np.ndarray], chunk: np.ndarray,
    ) -> None:
        self.text = text
        self._chunk = chunk
        self.encoding = encoding  # ASCII or UTF16LE
        self._parity = parity
        # compact-buffer byte offset where each region starts, and its chunk byte offset
        self._cstart, self._start = regions
        self._chains: Chains | None = None

    @property
    def width(self) -> int:
        """Bytes per character in the chunk."""
        return 2 if self.encoding == UTF16LE else 1

    def to_chunk(self, idx: np.ndarray) -> np.ndarray:
        """Chunk byte offsets of text indices ``idx``."""
        c = idx * self.width + self._parity  # compact-buffer offset
        k = np.searchsorted(self._cstart, c, side="right") - 1
        return self._start[k] + (c - self._cstart[k])

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

    def chains(self) -> Chains:
        """Digit chains of the view (memoized; see :class:`Chains`)."""
        if self._chains is None:
            self._chains = _chains(self.text)
        return self._chains

    def byte_at(self, idx: np.ndarray) -> np.ndarray:
        """Characters at text indices ``idx`` (BREAK outside the text)."""
        n = self.text.size
        if n == 0:
            return np.full(idx.shape, BREAK, np.uint8)
        out = self.text.take(idx, mode="clip")
        out[(idx < 0) | (idx >= n)] = BREAK
        return out

    def rows_at(self, first: np.ndarray, width: int) -> np.ndarray:
        """(len(first), width): the characters from each text index in ``first`` on (BREAK
        outside the text); rows within the text are one gather of strided windows."""
        t = self.text
        if t.size < width or first.size == 0 or first.min() < 0 or first.max() > t.size - width:
            return self.byte_at(first[:, None] + np.arange(width)[None, :])
        return np.lib.stride_tricks.sliding_window_view(t, width)[first]

    def has_word_before(
        self, pos: np.ndarray, words: re.Pattern[bytes], within: int, longest: int
    ) -> np.ndarray:
        """For each text index in ``pos``, whether ``words`` (a bytes regex, lowercase, whose
        matches are at most ``longest`` characters) ends within ``within`` characters before
        it. The regex runs once (C speed) over the text just before the positions only,
        lowercased and joined with break bytes."""
        if pos.size == 0:
            return np.zeros(0, bool)
        width = within + longest
        rows = np.empty((pos.size, width + 1), np.uint8)
        rows[:, :width] = self.byte_at(pos[:, None] - width + np.arange(width)[None, :])
        rows[:, width] = BREAK  # no match runs from one row into the next
        out = np.zeros(pos.size, bool)
        for m in words.finditer(rows.tobytes().lower()):
            row, end = divmod(m.end(), width + 1)
            if end >= longest:  # within ``within`` characters of the row's end
                out[row] = True
        return out


CHAIN_BLOCK = 256 * 1024  # bytes of text per pass of _chain_masks: temporaries stay in L2


def _chain_masks(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For text ``t`` (n >= MIN_CHAIN): its links packed into uint64 words (bit p, counted
    from the first word's lowest: text p+1 is a space or dash between two digits), and the
    edges of its chain mask (digits and links) eroded to runs of MIN_CHAIN (7) — set at p
    when all of p .. p+6 are chain characters: each such run's first p and its last p + 1,
    ascending. Worked out in blocks of CHAIN_BLOCK, each from its own text plus 8
    characters around, so no text-sized temporary is made."""
    n = t.size
    words = np.zeros((n - 2) // 64 + 3, np.uint64)
    packed = words.view(np.uint8)
    parts = []
    step = max(CHAIN_BLOCK & ~7, 8)  # whole bytes of packed links per block
    for lo in range(0, max(n - 7, 1), step):
        hi = min(n - 7, lo + step)  # eroded mask at lo .. hi: chain characters lo .. hi+6
        a, b = max(lo - 1, 0), min(hi + 6, n - 2)
        z = min(hi + 8, n)  # digits a .. z-1: the links' neighbours and chain characters
        d = buffer("digits.d", z - a, bool)
        np.less(np.subtract(t[a:z], 48, out=buffer("digits.sub", z - a, np.uint8)), 10, out=d)
        lk, sp = buffer("digits.link", b - a, bool), buffer("digits.space", b - a, bool)
        np.equal(t[a + 1 : b + 1], SPACE, out=lk)
        np.equal(t[a + 1 : b + 1], DASH, out=sp)
        np.logical_or(lk, sp, out=lk)
        np.logical_and(lk, d[: b - a], out=lk)
        np.logical_and(lk, d[2 : b - a + 2], out=lk)  # link p - a: text p+1
        pe = hi if hi < n - 7 else n - 2  # this block's links (the last block's go to the end)
        bits = np.packbits(lk[lo - a : pe - a], bitorder="little")
        packed[lo // 8 : lo // 8 + bits.size] = bits  # lo is a multiple of 8
        m = hi + 7 - lo
        c = buffer("digits.c", m, bool)  # chain characters lo .. hi+6
        np.copyto(c, d[lo - a : lo - a + m])
        q0, q1 = max(lo, 1), min(lo + m, n - 1)
        np.logical_or(c[q0 - lo : q1 - lo], lk[q0 - 1 - a : q1 - 1 - a], out=c[q0 - lo : q1 - lo])
        e2, e4 = buffer("digits.erode2", m - 1, bool), buffer("digits.erode4", m - 3, bool)
        np.logical_and(c[:-1], c[1:], out=e2)  # c[p .. p+1]
        np.logical_and(e2[:-2], e2[2:], out=e4)  # c[p .. p+3]
        e = e2[: m - 6]
        np.logical_and(e4[:-3], e4[3:], out=e)  # c[p .. p+6], p = lo .. hi
        if lo == 0 and e[0]:
            parts.append(np.zeros(1, np.int64))
        edge = buffer("digits.edge", hi - lo, bool)
        np.not_equal(e[1:], e[:-1], out=edge)
        parts.append(np.flatnonzero(edge) + (lo + 1))
        if hi == n - 7 and e[-1]:
            parts.append(np.full(1, n - 6, np.int64))
    return words, np.concatenate(parts)


def _chains(t: np.ndarray) -> Chains:
    n = t.size
    if n < MIN_CHAIN:
        z = np.zeros(0, np.int64)
        return Chains(z, z, z, np.zeros(0, np.uint8), z, np.zeros(0, np.uint64))
    # only the long runs' edges: far fewer than all runs' in dense digit text
    words, edges = _chain_masks(t)
    start, end = edges[0::2], edges[1::2] + (MIN_CHAIN - 1)
    keep = end - start <= MAX_CHAIN
    start, end = start[keep], end[keep]
    bits = _link_bits(words, start, end)
    links = np.bitwise_count(bits).astype(np.int64)
    sep = np.zeros(start.size, np.uint8)
    key = end - start  # one group: its length
    # Chains with separators: group lengths, one separator kind, word-glued end groups.
    # At most MAX_GROUPS groups count, plus one glued to a word at each end.
    # ... and only those with the 9 digits the shortest such match (an SSN) has
    sub = np.flatnonzero((links > 0) & (links <= MAX_GROUPS + 1) & (end - start - links >= 9))
    # ... whose first group has FIRST_GROUP digits, unless an end group is glued to a word
    b = bits[sub]
    fit = (
        is_in(bit_index(b & (~b + np.uint64(1))) + 1, FIRST_GROUP)
        | _is_letter(t, start[sub] - 1)
        | _is_letter(t, end[sub])
    )
    sub = sub[fit]
    pos = start[sub, None] + 1 + set_bits(bits[sub], MAX_GROUPS + 1)  # their links
    key[links > 0] = -1  # unless set below
    if sub.size:
        s, e, k, ln, sp = _group_keys(t, pos, start[sub], end[sub], links[sub])
        # the separators of what is left when a glued group was dropped (none if nothing is)
        b = bits[sub] >> (s - start[sub]).astype(np.uint64)
        bits[sub] = b & (~np.uint64(0) >> (np.uint64(65) - np.clip(e - s, 1, 64).astype(np.uint64)))
        start[sub], end[sub], key[sub], links[sub], sep[sub] = s, e, k, ln, sp
    return Chains(start, end, links, sep, key, bits)


def _link_bits(words: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Per chain ``[start, end)`` (<= 64 characters), a uint64 whose bit k is set when text
    ``start + 1 + k`` is a link (``words``: the packed links of :func:`_chain_masks`; a
    chain's first and last characters are digits)."""
    j, r = start >> 6, (start & 63).astype(np.uint64)
    x = (words[j] >> r) | ((words[j + 1] << (np.uint64(63) - r)) << np.uint64(1))
    return x & (~np.uint64(0) >> (np.uint64(65) - (end - start).astype(np.uint64)))


def bit_index(x: np.ndarray) -> np.ndarray:
    """Index of the set bit of each uint64 power of two (-1 for 0)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1  # a power of two is exact


def set_bits(x: np.ndarray, k: int) -> np.ndarray:
    """(len(x), k): positions of the lowest ``k`` set bits of each uint64 (-1 past the
    last)."""
    out = np.empty((x.size, k), np.int64)
    x = x.copy()
    for j in range(k):
        low = x & (~x + np.uint64(1))
        out[:, j] = bit_index(low)
        x ^= low
    return out


def _group_keys(
    t: np.ndarray, pos: np.ndarray, start: np.ndarray, end: np.ndarray, links: np.ndarray
) -> tuple[np.ndarray, ...]:
    """For chains with 1..MAX_GROUPS+1 separators at text ``pos`` (one row each, columns
    past the last unused): (start, end, key, links, sep) after dropping a group glued to a
    word at either end ("numa1 4111 ..."); key -1 for mixed separators or more than
    MAX_GROUPS groups."""
    g = MAX_GROUPS + 2  # groups looked at: a glued one at each end
    sep = t[pos[:, 0]]
    same = np.ones(start.size, bool)
    lens = []
    prev = start - 1  # position before the current group
    for j in range(g):
        inside = links > j  # group j ends at link j
        stop = np.where(inside, pos[:, j], end) if j < g - 1 else end
        if j < g - 1:
            same &= ~inside | (t.take(pos[:, j], mode="clip") == sep)
        lens.append(np.where(links >= j, stop - prev - 1, 0))
        prev = np.where(inside, stop, prev)
    lens_a = np.stack(lens, axis=1)  # (chains, g) group lengths, 0 past the last group
    lead = _is_letter(t, start - 1)
    trail = _is_letter(t, end)
    first = lead.astype(np.int64)
    ngroups = links + 1 - lead - trail
    start = np.where(lead, pos[:, 0] + 1, start)
    end = np.where(trail, np.take_along_axis(pos, links[:, None] - 1, axis=1)[:, 0], end)
    cols = first[:, None] + np.arange(MAX_GROUPS)[None, :]
    kept = np.take_along_axis(lens_a, np.minimum(cols, g - 1), axis=1)
    kept = np.where(np.arange(MAX_GROUPS)[None, :] < ngroups[:, None], kept, 0)
    key = (np.minimum(kept, 31) << (5 * np.arange(MAX_GROUPS))[None, :]).sum(axis=1)
    ok = same & (ngroups >= 1) & (ngroups <= MAX_GROUPS)
    # a chain that is all glued groups keeps its separators (no detector reads it)
    links = np.where(ngroups >= 1, ngroups - 1, links)
    return start, end, np.where(ok, key, -1), links, sep


def _is_letter(t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Whether ``t[idx]`` is an ASCII letter (False outside ``t``)."""
    inside = (idx >= 0) & (idx < t.size)
    c = t.take(idx, mode="clip") | 0x20 if t.size else np.zeros(idx.shape, np.uint8)
    return inside & (c >= 97) & (c <= 122)


def _digit_counts(rows: Chunk) -> np.ndarray:
    dig = np.less(np.subtract(rows.data, 48, dtype=np.uint8), 10)
    return np.count_nonzero(dig, axis=1)


def rows_with_digits(rows: Chunk, least: int) -> np.ndarray:
    """Rows of ``rows.data`` (2-D uint8) holding at least ``least`` digit bytes: no
    digit-based match fits in a row with fewer (a digit is one byte in ASCII and in UTF-16LE).
    The counts are shared by the detectors asking about the same rows."""
    return rows.memo("digits.row_counts", _digit_counts) >= least


class DigitDetector(Detector):
    """A detector built on this module's stage 1 and 2."""

    stage = "digits"
    #: any digit-based match touching a seam has at least 4 digits within 64 bytes of it
    #: (a UTF-16LE Track 1 name is at most 26 characters, with PAN or expiry digits beside)
    seam_band = 64

    def may_touch(self, rows: Chunk) -> np.ndarray:
        return rows_with_digits(rows, 4)


def views(chunk: Chunk) -> list[TextView]:
    """The ASCII and two UTF-16LE text views of the chunk's hot regions (memoized)."""
    return chunk.memo("digits.views", _build_views)


SUB = 512 * 1024  # stage-1 block: with its temporaries within L2 (2 MiB); measured best


#: the digit mask packed 8 bytes to a bit-byte (np.packbits: byte 0 is the top bit):
#: the bits of bytes 0, 2, 4, 6 and of bytes 1, 3, 5, 7
_EVEN, _ODD = 0xAA, 0x55


class _Stage1:
    """Preallocated stage-1 buffers (one set per process, reused for every block)."""

    def __init__(self) -> None:
        self.t = np.empty(SUB, np.uint8)
        self.dig = np.empty(SUB, bool)
        self.dc = np.empty(SUB // 8, np.uint8)
        self.dp = np.empty(SUB // 8, np.uint8)
        self.w = np.empty(SUB // 8, np.uint8)
        self.even = np.empty(SUB // 8, np.uint8)
        self.odd = np.empty(SUB // 8, np.uint8)
        self.pe = np.empty(SUB // 8, np.uint8)
        self.hot = np.empty(SUB // 8, bool)

    def hot_pairs(self, a: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Block-pair indices of ``a`` (len a multiple of 8, <= SUB) that look like ASCII
        digit text (None when they lie 8 blocks apart or closer: the whole block is text),
        and those that look like UTF-16LE digits (digits on one parity only).

        Full width: the digit mask, packed to bits (one byte per 8-byte block: a SIMD pass,
        measured a third faster than a popcount of the mask seen as uint64 words), and its
        popcount per block. A pair of blocks with >= 8 digits is ASCII-hot; pairs with >= 5
        are looked at closer: >= 5 digits on one byte parity and at most one on the other
        is UTF-16LE-hot (zeros between are checked in stage 2)."""
        n = a.size
        nw = n // 8
        if nw < 2:
            z = np.zeros(0, np.int64)
            return z, z
        t, dig, dc, dp = self.t[:n], self.dig[:n], self.dc[:nw], self.dp[: nw - 1]
        np.less(np.subtract(a, 48, out=t), 10, out=dig)
        bits = np.packbits(dig)
        np.bitwise_count(bits, out=dc)
        np.add(dc[:-1], dc[1:], out=dp)
        hot = self.hot[: nw - 1]
        np.greater_equal(dp, 5, out=hot)
        if np.count_nonzero(hot) * 16 < nw:  # sparse (memory-like data): look at those
            some = np.flatnonzero(hot)
            if some.size == 0:
                return some, some
            w0, w1 = bits[some], bits[some + 1]
            even = np.bitwise_count(w0 & _EVEN) + np.bitwise_count(w1 & _EVEN)
            odd = np.bitwise_count(w0 & _ODD) + np.bitwise_count(w1 & _ODD)
            par = np.maximum(even, odd)
            return some[dp[some] >= 8], some[(par >= 5) & (dp[some] - par <= 1)]
        # dense digit text: parities at full width too (cheaper than gathering most pairs)
        even, odd, pe = self.even[:nw], self.odd[:nw], self.pe[: nw - 1]
        np.bitwise_count(np.bitwise_and(bits, _EVEN, out=self.w[:nw]), out=even)
        np.subtract(dc, even, out=odd)
        np.add(even[:-1], even[1:], out=pe)  # even digits per pair
        np.add(odd[:-1], odd[1:], out=odd[: nw - 1])  # odd digits per pair
        np.maximum(pe, odd[: nw - 1], out=pe)  # the busier parity
        np.greater_equal(pe, 5, out=hot)
        hot &= np.less_equal(np.subtract(dp, pe, out=pe), 1)
        utf16 = np.flatnonzero(hot)
        np.greater_equal(dp, 8, out=hot)
        if np.count_nonzero(hot) * 8 >= nw - 1:
            return None, utf16
        return np.flatnonzero(hot), utf16


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
    dense = False  # some stage-1 block is digit text throughout: read the chunk as text
    # Stage 1 in L2-sized blocks overlapping by one 8-byte block, so pairs across a block
    # boundary are seen too.
    lo = 0
    while True:
        for k, hot in enumerate(st1.hot_pairs(data[lo : lo + SUB])):
            if hot is None:
                dense = True
            elif hot.size and not (k == 0 and dense):
                found[k].append(hot + lo // 8)
        if lo + SUB >= nb * 8:
            break
        lo += SUB - 8
    out = []
    if dense:
        ascii_hot = np.zeros(1, np.int64), np.full(1, nb, np.int64)
    else:
        ascii_hot = _hot_text(found[0], nb, _MB[ASCII])
    utf16_hot = _hot_text(found[1], nb, _MB[UTF16LE])
    if ascii_hot is not None:
        compact, regions = _compact(data, *ascii_hot)
        out.append(TextView(compact, ASCII, 0, regions, chunk.data))
    if utf16_hot is not None:
        c16, regions = _compact(data, *utf16_hot)
        for parity in (0, 1):
            lo_b = c16[parity::2]
            hi_b = c16[parity + 1 :: 2]
            m = min(lo_b.size, hi_b.size)
            text = np.where(hi_b[:m] == 0, lo_b[:m], BREAK).astype(np.uint8)
            out.append(TextView(text, UTF16LE, parity, regions, chunk.data))
    return out


def _hot_text(
    parts: list[np.ndarray], nb: int, margin: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Block ranges (starts, lengths) to read as text, from the hot pairs found per stage-1
    block (ascending; neighbours may share their edge pair), widened by ``margin`` blocks;
    None when nothing is hot. Dense digit data is one range over the whole chunk (no merging
    work, no copy)."""
    if not parts:
        return None
    total = sum(p.size for p in parts)
    if total * margin >= nb:  # hot pairs every `margin` blocks or closer: margins cover all
        return np.zeros(1, np.int64), np.full(1, nb, np.int64)
    hot = np.concatenate(parts)
    if len(parts) > 1:
        hot = hot[np.concatenate(([True], hot[1:] > hot[:-1]))]
    return _regions(hot, nb, margin)


def _compact(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The chosen block ranges (``starts``/``lengths`` in 8-byte blocks) of ``data``,
    concatenated, and their (compact offset, chunk offset) table in bytes. Break bytes go
    where ranges meet, so no digit run is stitched across a gap (the bytes overwritten are
    margin, never part of a match)."""
    cstart = np.concatenate(([0], np.cumsum(lengths)[:-1])) * 8
    if starts.size == 1 and lengths[0] * 8 == data.size:  # the whole chunk: no copy
        return data, (cstart, starts * 8)
    if starts.size <= 64:  # few ranges (dense digit data): slices, one copy
        compact = np.concatenate(
            [data[a * 8 : (a + n) * 8] for a, n in zip(starts.tolist(), lengths.tolist(),
                                                       strict=True)]
        )
    else:  # many small ranges: one 1-D take of 8-byte words
        blockmap = np.arange(int(lengths.sum())) + np.repeat(starts - cstart // 8, lengths)
        compact = data.view(np.uint64)[blockmap].view(np.uint8)
    at = cstart[1:]
    for d in (-2, -1, 0, 1):
        compact[at + d] = BREAK
    return compact, (cstart, starts * 8)


def _regions(hot: np.ndarray, nb: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged ranges of blocks within ``k`` blocks of a hot pair (pair i covers blocks i and
    i+1): (first block, number of blocks) per range, ascending."""
    lo = np.maximum(hot - k, 0)
    hi = np.minimum(hot + 2 + k, nb)  # exclusive; hot is sorted, so are lo and hi
    new = np.ones(hot.size, bool)
    new[1:] = lo[1:] > hi[:-1]
    starts = lo[new]
    ends = np.maximum.reduceat(hi, np.flatnonzero(new))
    return starts, ends - starts


def is_in(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``np.isin`` for a small sorted ``members`` array, without its per-call set-up."""
    i = np.searchsorted(members, values)
    return members.take(i, mode="clip") == values


def luhn_ok(digits: np.ndarray, ndig: np.ndarray) -> np.ndarray:
    """Luhn check of each row of ``digits`` (int8, right-aligned, left-padded with zeros)."""
    w = digits.shape[1]
    v = digits.astype(np.int16)
    dbl = v[:, w - 2 :: -2]
    v[:, w - 2 :: -2] = dbl * 2 - 9 * (dbl > 4)
    return (v.sum(axis=1) % 10 == 0) & (ndig > 0)


def gather_digits(
    view: TextView, start: np.ndarray, span: np.ndarray, width: int,
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """Digits of text spans ``[start, start+span)`` (separators skipped), right-aligned into
    rows of ``width`` (int8, zero padded on the left). Spans are short (<= 2*width); those
    marked ``plain`` are known to be digits only (read as one slice each)."""
    out = np.zeros((start.size, width), np.int8)
    if plain is None:
        plain = np.zeros(start.size, bool)
    p = np.flatnonzero(plain)
    if p.size:  # the last ``width`` characters, the ones before the span zeroed
        cols = np.arange(width)
        chars = view.rows_at(start[p] + span[p] - width, width)
        out[p] = np.where(cols[None, :] >= (width - span[p])[:, None], chars - 48, 0)
    g = np.flatnonzero(~plain)
    if g.size:
        out[g] = _gather_grouped(view, start[g], span[g], width)
    return out


def _gather_grouped(view: TextView, start: np.ndarray, span: np.ndarray, width: int) -> np.ndarray:
    n = start.size
    maxspan = int(span.max())
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
