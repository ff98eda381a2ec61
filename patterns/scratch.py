"""Shared stage-1 helpers for the key and secret detectors (aes, der, pem, secrets).

- :func:`buffer` hands out preallocated scratch arrays (per thread, grown on demand) so the
  full-width passes of stage 1 write into memory that stays in cache instead of allocating
  a fresh array per chunk (the digit stage's chain masks use it too).
- One anchor pass per chunk finds every registered 2-byte anchor (:func:`register_anchor`) at
  every byte offset, as bytes and, for text anchors, as two UTF-16LE characters: a single
  lookup of each uint16 word in a 65536-entry code table, then a shift and an AND that pair
  each word with the next (odd offsets, UTF-16LE at either parity), in L2-sized blocks; the
  rare candidates are checked exactly. No text gate first: on memory-like images a quarter of
  the bytes are text anyway, and DER's binary anchor needs every byte (the former gate,
  packed text streams and lookup in them cost 2.4 s CPU per GiB, this pass 0.65, DER's
  anchor included). Candidates come back
  as chunk offsets with their encoding and character step (:func:`anchor_hits`,
  :func:`literal_hits`); everything after (token length, boundaries, UTF-16LE high bytes)
  reads the chunk itself.
- :func:`u16_hits` finds a 2-byte literal in a small buffer (the engine's edge windows);
  :func:`texty_near_middle` tells which edge windows have text near their middle.
- :func:`gather` / :func:`run_lengths` / :func:`boundary_ok` / :func:`utf16_clean` work on
  candidate offsets as small 2-D windows, vectorized over candidates.
"""

from __future__ import annotations

import threading

import numpy as np

from patterns.base import ASCII, UTF16LE, Chunk

_local = threading.local()
#: bytes: scratch arrays up to this size are kept for the next chunk (the digit stage's work
#: arrays over 8 MiB of dense digit text, a whole engine chunk with its margins, are not: they
#: come and go with their chunk, so peak RSS stays lower)
POOL_LIMIT = 8 << 20

TEXT_LO, TEXT_SPAN = 0x2D, 0x4E  # '-' .. 'z': the bytes of every token we anchor on
#: texty uint32 words (little-endian) of the per-byte code "in range" = 1, "zero" = 2: four
#: ASCII characters, or two UTF-16LE characters at an even / odd address
ASCII_WORD, UTF16_WORDS = 0x01010101, (0x02010201, 0x01020102)


def buffer(
    name: str, n: int, dtype: type | np.dtype, keep: int = POOL_LIMIT
) -> np.ndarray:
    """A scratch array of ``n`` elements, reused between calls in this thread while it is at
    most ``keep`` bytes (a larger one comes and goes). Past 1 MiB grown to whole MiB, so calls
    of slightly different sizes share one.

    The contents are garbage; the caller overwrites them (``out=``). One buffer per name, so
    two live uses need two names."""
    dt = np.dtype(dtype)
    if n * dt.itemsize > keep:  # a rare big batch: not worth keeping around
        return np.empty(n, dt)
    pool: dict[str, np.ndarray] = getattr(_local, "pool", None) or {}
    _local.pool = pool
    arr = pool.get(name)
    if arr is None or arr.dtype != dt or arr.size < n:
        nbytes = n * dt.itemsize
        size = (-(-nbytes >> 20) << 20) // dt.itemsize if nbytes > 1 << 20 else max(n, 1 << 16)
        arr = pool[name] = np.empty(size, dt)
    return arr[:n]


def u16_hits(data: np.ndarray, pair: bytes) -> np.ndarray:
    """Sorted byte offsets ``p`` where ``data[p:p+2] == pair``: two aligned uint16 compares,
    the odd offsets through a shifted copy (for small buffers: a chunk uses the anchor pass)."""
    n = data.size
    value = pair[0] | (pair[1] << 8)
    out = []
    for off in (0, 1):
        m = (n - off) // 2
        if m <= 0:
            continue
        src = data if off == 0 else np.ascontiguousarray(data[1 : 1 + 2 * m])
        hits = np.flatnonzero(src[: 2 * m].view(np.uint16) == value)
        out.append(hits * 2 + off)
    if not out:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(out))


# --- text near an engine edge ----------------------------------------------------------------


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


def texty_near_middle(rows: Chunk, reach: int) -> np.ndarray:
    """For the engine's seam windows (``rows.data``: rows whose middle is where two pieces of
    guest memory meet): whether two consecutive texty words lie within ``reach`` bytes of the
    middle. A texty word is 4 aligned bytes that are all in ``-``..``z`` (ASCII) or two such
    characters each followed by a zero byte (UTF-16LE at an even or odd address); any token of
    11+ such characters holds two in a row, so a text match touching the middle, or whose
    context does, has them there. The answer is shared by the detectors asking about the same
    rows (memoized on ``rows``)."""

    def answer(chunk: Chunk) -> np.ndarray:
        n, width = chunk.data.shape
        mid = width // 2
        lo = max(0, mid - reach) // 4 * 4
        hi = lo + (min(width, mid + reach) - lo) // 4 * 4
        band = np.ascontiguousarray(chunk.data[:, lo:hi]).reshape(-1)
        words = _texty_code(band).view(np.uint32).reshape(n, -1)
        hot = words == ASCII_WORD
        for value in UTF16_WORDS:
            hot |= words == value
        return (hot[:, :-1] & hot[:, 1:]).any(axis=1)

    return rows.memo(f"scratch.texty.{reach}", answer)


# --- the anchor pass -------------------------------------------------------------------------

Candidates = list[tuple[int, int, np.ndarray]]  # (encoding, step in bytes, chunk offsets)

#: every 2-byte anchor some detector searches, and whether it is also searched as two UTF-16LE
#: characters (see :func:`register_anchor`)
_ANCHORS: dict[bytes, bool] = {}

# Bits of the per-word code (:func:`_code_table`) of the uint16 word k = bytes (2k, 2k+1).
# The anchors are spread over GROUPS groups; a group's "first" bit of word k and its "second"
# bit (4 places up) of word k+1 together mark a pair: code[k] & (code[k+1] >> 4) is nonzero
# exactly at candidate words (bit 7 is always set, so the exact even-offset bit 3 survives on
# its own). First bit: the high byte is an anchor's first byte (at an odd offset, as a byte or
# a UTF-16LE character), or the low byte is, followed by zero (a UTF-16LE character at an even
# offset). Second bit: the low byte is an anchor's second byte (the byte or character after
# either), or the high byte is, after a zero (a UTF-16LE character at an odd offset). One bit
# per side would pair every first byte with every second byte (``bl`` from ``b_`` and ``_l``:
# 7x more false candidates on a memory-like image); groups keep common pairs apart.
GROUPS = 3
_EVEN, _ALWAYS = 8, 128
_FIRSTS = (1 << GROUPS) - 1  # bits 0..2
_SECONDS = _FIRSTS << 4  # bits 4..6
ANCHOR_BLOCK = 128 << 10  # words per anchor-pass block: its 4 scratch arrays stay in L2


def register_anchor(pair: bytes, text: bool = True) -> None:
    """Declare a 2-byte anchor at import time, so the one anchor pass per chunk covers it;
    ``text`` anchors are also searched as two UTF-16LE characters. Anchor bytes are nonzero
    (zeros are what UTF-16LE high bytes and empty memory are made of)."""
    if len(pair) != 2 or 0 in pair:
        raise ValueError(f"an anchor is 2 nonzero bytes, not {pair!r}")
    _ANCHORS[pair] = _ANCHORS.get(pair, False) or text


def _byte_weights() -> np.ndarray:
    """A rough share of each byte value in memory (lower-case text is the most common there),
    only used to spread anchors over the groups."""
    w = np.full(256, 0.05)
    for lo, hi, share in ((b"a", b"z", 1.0), (b"A", b"Z", 0.3), (b"0", b"9", 0.3)):
        w[lo[0] : hi[0] + 1] = share
    w[list(b"_-./")] = 0.3
    w[1:16] = 0.3  # small integers in binary structures
    return w


def _anchor_groups(anchors: list[bytes]) -> list[int]:
    """Group of each anchor: greedily, commonest anchors first, the group where its first
    byte meets the fewest common second bytes (and its second byte the fewest first bytes)."""
    weight = _byte_weights()
    members: list[list[bytes]] = [[] for _ in range(GROUPS)]

    def crossings(pairs: list[bytes]) -> float:
        firsts, seconds = {p[0] for p in pairs}, {p[1] for p in pairs}
        return float(sum(weight[f] * weight[s] for f in firsts for s in seconds))

    group = {}
    for pair in sorted(anchors, key=lambda p: -(weight[p[0]] + weight[p[1]])):
        cost = [crossings(m + [pair]) - crossings(m) for m in members]
        group[pair] = cost.index(min(cost))
        members[group[pair]].append(pair)
    return [group[p] for p in anchors]


#: the Chunk memo key of the anchor pass (``Chunk.has(ANCHOR_PASS)``: it already ran)
ANCHOR_PASS = "scratch.anchors"
_TABLE: list = [None, None, None]  # (anchors built for, code table, anchor index table)


def _code_table() -> tuple[np.ndarray, np.ndarray]:
    """(code per uint16 word value, index into _ANCHORS per pair value or -1). Pairs are
    little-endian words: byte ``pair[0]`` is the low byte."""
    if _TABLE[0] != _ANCHORS:
        w = np.arange(1 << 16)
        lo, hi = w & 0xFF, w >> 8
        index = np.full(1 << 16, -1, np.int16)
        code = np.full(1 << 16, _ALWAYS, np.uint8)
        anchors = list(_ANCHORS)
        for i, (pair, g) in enumerate(zip(anchors, _anchor_groups(anchors), strict=True)):
            index[pair[0] | pair[1] << 8] = i
            text = _ANCHORS[pair]
            first = (hi == pair[0]) | (text & (lo == pair[0]) & (hi == 0))
            second = (lo == pair[1]) | (text & (lo == 0) & (hi == pair[1]))
            code[first] |= 1 << g
            code[second] |= 16 << g
        code[index >= 0] |= _EVEN  # the pair itself at an even offset
        _TABLE[:] = [dict(_ANCHORS), code, index]
    return _TABLE[1], _TABLE[2]


def _candidate_words(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(word indices k, their pair bits) where an anchor may start at byte 2k or 2k+1: one
    table lookup per uint16 word, in L2-sized blocks."""
    code_of, _ = _code_table()
    n = data.size
    m = n // 2
    words = data[: 2 * m].view(np.uint16)
    # the word after the last: only what its low byte (the odd last byte, if any) decides
    last = _ALWAYS
    if n % 2:
        last |= int(code_of[data[-1]]) & _SECONDS  # (a zero byte is in no anchor)
    ks, bits = [], []
    for k0 in range(0, m, ANCHOR_BLOCK):
        size = min(ANCHOR_BLOCK, m - k0)
        code = buffer("anchor.code", size + 1, np.uint8)
        if k0 + size < m:
            np.take(code_of, words[k0 : k0 + size + 1], out=code, mode="wrap")
        else:
            np.take(code_of, words[k0:], out=code[:size], mode="wrap")
            code[size] = last
        pairs = buffer("anchor.pairs", size, np.uint8)
        np.floor_divide(code[1:], 16, out=pairs)  # >> 4 (NumPy's uint8 shift is slower)
        np.bitwise_and(code[:-1], pairs, out=pairs)
        # candidates are rare: find the nonzero 8-word groups first (a bool nonzero is much
        # faster than a uint8 one), then the words inside them
        groups = size // 8
        packed = pairs[: 8 * groups].view(np.uint64)
        busy = buffer("anchor.busy", groups, np.bool_)
        np.not_equal(packed, 0, out=busy)
        g = np.flatnonzero(busy)
        inside = packed[g].view(np.uint8).reshape(-1, 8)
        row, col = np.nonzero(inside)
        k = np.concatenate((g[row] * 8 + col, np.flatnonzero(pairs[8 * groups :]) + 8 * groups))
        ks.append(k + k0)
        bits.append(pairs[k])
    if not ks:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(ks), np.concatenate(bits)


def _anchor_pass(chunk: Chunk) -> dict[bytes, Candidates]:
    """Every registered anchor at every byte offset of the chunk, as bytes and (text anchors)
    as UTF-16LE characters; the lookup gives a superset for odd offsets and UTF-16LE, checked
    here exactly on the few candidates."""
    d = chunk.data
    out: dict[bytes, Candidates] = {pair: [] for pair in _ANCHORS}
    if d.size < 2 or not _ANCHORS:
        return out
    _, index = _code_table()
    k, bits = _candidate_words(d)
    even, grouped = k[(bits & _EVEN) != 0], k[(bits & _FIRSTS) != 0]
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {ASCII: [], UTF16LE: []}
    # a grouped candidate word may hold any of the three shapes: each is checked exactly
    for p, enc, step in (
        (2 * even, ASCII, 1),
        (2 * grouped + 1, ASCII, 1),
        (2 * grouped, UTF16LE, 2),
        (2 * grouped + 1, UTF16LE, 2),
    ):
        p = p[p + step < d.size]
        if step == 2:
            p = p[d[p + 1] == 0]  # the first character's high byte
        which = index[d[p].astype(np.int64) | d[p + step].astype(np.int64) << 8]
        keep = which >= 0
        parts[enc].append((p[keep], which[keep]))
    text = np.array(list(_ANCHORS.values()), np.bool_)
    for enc, step in ((ASCII, 1), (UTF16LE, 2)):
        p = np.concatenate([q for q, _ in parts[enc]])
        which = np.concatenate([w for _, w in parts[enc]])
        if enc == UTF16LE:
            p, which = p[text[which]], which[text[which]]
        order = np.lexsort((p, which))
        p, which = p[order], which[order]
        bounds = np.searchsorted(which, np.arange(len(_ANCHORS) + 1))
        for i, pair in enumerate(_ANCHORS):
            if bounds[i + 1] > bounds[i]:
                out[pair].append((enc, step, p[bounds[i] : bounds[i + 1]]))
    return out


def anchor_hits(chunk: Chunk, pair: bytes) -> Candidates:
    """Chunk offsets of a registered anchor, sorted, per encoding: the two bytes (ASCII), and
    for text anchors the two UTF-16LE characters (the first one's high byte zero, the
    second's not yet checked)."""
    return chunk.memo(ANCHOR_PASS, _anchor_pass)[pair]


def literal_hits(chunk: Chunk, literal: bytes, anchor: int) -> Candidates:
    """Chunk offsets where ``literal`` starts (ASCII or UTF-16LE characters, high bytes not
    yet checked); ``literal[anchor:anchor+2]`` is the registered pair searched in stage 1
    (e.g. ``b"eyJ"`` with anchor 1 for ``yJ``)."""
    lit = np.frombuffer(literal, np.uint8)
    out = []
    for enc, step, hits in anchor_hits(chunk, literal[anchor : anchor + 2]):
        pos = hits - anchor * step
        pos = pos[(pos >= 0) & (pos + step * len(literal) <= chunk.data.size)]
        # the last character first: it drops most anchors (``--`` in ``-------`` rules) before
        # the whole literal is gathered
        pos = pos[chunk.data[pos + step * (len(literal) - 1)] == lit[-1]]
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
    if pos.size and pos.min() >= 0 and pos.max() + step * (width - 1) < data.size:
        return data[idx]  # the usual case: no masking (a boolean-mask gather is much slower)
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
