"""AES key schedules (encryption form, AES-128/192/256) at any byte offset.

An expanded key of Nk words (Nk = 4, 6, 8) satisfies ``W[i] = W[i-Nk] ^ W[i-1]`` for every
word i that is not a multiple of Nk (and, for Nk = 8, not 4 mod 8): those words need no
S-box. XOR works byte by byte, so the relation holds whatever the byte order inside a word
(OpenSSL keeps ``rd_key`` as host-order words loaded big-endian: every 4 bytes reversed in
memory) and whatever the alignment.

Stage 1 (every byte, a handful of full-width passes on the chunk as aligned uint32 words A,
in blocks that stay in L2):
``P[k] = A[k+1] ^ A[k]`` once, then per Nk one compare ``P[k+Nk-1] == A[k]``, i.e.
``A[k+Nk] == A[k+Nk-1] ^ A[k]``. For a schedule at byte offset 4s + r, aligned word t holds
the relation when the one (r = 0) or two (r > 0) schedule words it overlaps are S-box free;
every period of Nk words has at least two such consecutive aligned words, so "two consecutive
hits for some Nk" keeps every schedule, any alignment, either layout. The four words a hit
reads (A[k], A[k+1], A[k+Nk-1], A[k+Nk]) must be nonzero: zero runs obey the relation
trivially, and so do tables of small integers padded with zero words (relocations, symbol
tables: 12x fewer hits on a memory-like image); inside a schedule a zero word has odds 2^-32
and costs only the hits within 8 words before it, while every schedule keeps 6 or more hits
away from any such span (any size, alignment and layout). Random data passes with
probability ~2^-64 per word; structured data a little more often, which stage 2 absorbs.

Stage 2 (rare windows around candidates, concatenated into one small buffer): for each byte
offset r and each Nk the relation is tested on every S-box-free word of every possible
start, then survivors are expanded from their first Nk words (our own vectorized key
expansion, in both word layouts) and compared with memory byte for byte: a match is exact.

The Linux kernel's ``struct crypto_aes_ctx`` (``u32 key_enc[60]; u32 key_dec[60]; u32
key_length``) is one key: its encryption schedule is reported (the match spans the schedule,
as for any other) with ``details.container = "crypto_aes_ctx"`` when the decryption schedule
(the equivalent inverse cipher's: round keys reversed, InvMixColumns on the inner ones)
follows; the decryption schedule is never reported on its own.
"""

from __future__ import annotations

import numpy as np

from patterns.base import BINARY, Chunk, Described, Detector, Hit, Hits
from patterns.scratch import buffer

NKS = (4, 6, 8)  # key words: AES-128, AES-192, AES-256
CTX_DEC_OFFSET = 240  # offsetof(struct crypto_aes_ctx, key_dec): u32 key_enc[60]
CTX_LEN_OFFSET = 480  # offsetof(struct crypto_aes_ctx, key_length)
CTX_SIZE = 484
LAYOUTS = ("standard", "byteswapped")
STANDARD, BYTESWAPPED = range(2)
IN_CTX = 2  # Hits.tag bit: the schedule heads a crypto_aes_ctx
#: keys with fewer distinct byte values than this are filler, not secrets (the expansion of
#: an all-zero or 0xff.. key, or of a short repeating pattern, is common in initialised memory)
MIN_DISTINCT_KEY_BYTES = 4


def _xtime(x: int) -> int:
    x <<= 1
    return (x ^ 0x11B) if x & 0x100 else x


def _gf_tables() -> tuple[list[int], list[int]]:
    """exp/log tables of GF(2^8) with generator 3."""
    exp, log = [0] * 510, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x ^= _xtime(x)
    return exp, log


_EXP, _LOG = _gf_tables()


def _gmul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _sbox() -> np.ndarray:
    """FIPS-197 5.1.1: multiplicative inverse, then the affine transform."""
    out = np.zeros(256, np.uint8)
    for x in range(256):
        b = 0 if x == 0 else _EXP[255 - _LOG[x]]
        s = b
        for k in range(1, 5):
            s ^= ((b << k) | (b >> (8 - k))) & 0xFF
        out[x] = s ^ 0x63
    return out


SBOX = _sbox()
RCON = np.array([1, 2, 4, 8, 16, 32, 64, 128, 0x1B, 0x36], np.uint8)
#: InvMixColumns as 4 tables per output byte: out[j] = XOR_k MUL[(j - k) % 4][in[k]]
_INV_MIX = np.array([[_gmul(c, x) for x in range(256)] for c in (14, 11, 13, 9)], np.uint8)


def schedule_words(nk: int) -> int:
    """Words in the expanded key for an Nk-word key (Nr + 1 round keys of 4 words)."""
    return 4 * (nk + 7)


def expand_keys(keys: np.ndarray) -> np.ndarray:
    """FIPS-197 KeyExpansion of a batch: ``keys`` is (n, 4*Nk) uint8, the result (n, 16*(Nr+1))
    uint8, bytes in FIPS order (the key itself first). Vectorized over keys."""
    keys = np.asarray(keys, np.uint8)
    n, nb = keys.shape
    nk = nb // 4
    total = schedule_words(nk)
    w = np.empty((n, total, 4), np.uint8)
    w[:, :nk] = keys.reshape(n, nk, 4)
    for i in range(nk, total):
        t = w[:, i - 1]
        if i % nk == 0:
            t = SBOX[t[:, [1, 2, 3, 0]]]
            t[:, 0] ^= RCON[i // nk - 1]
        elif nk == 8 and i % 8 == 4:
            t = SBOX[t]
        w[:, i] = w[:, i - nk] ^ t
    return w.reshape(n, 16 * (nk + 7))


def inverse_schedule(enc: np.ndarray) -> np.ndarray:
    """The equivalent-inverse-cipher schedule (as the Linux kernel's ``key_dec``) of one
    expanded key in FIPS byte order: round keys reversed, InvMixColumns on all but the first
    and last."""
    rounds = enc.reshape(-1, 4, 4)[::-1].copy()  # (round, column, byte)
    inner = rounds[1:-1]
    mixed = np.zeros_like(inner)
    for j in range(4):
        for k in range(4):
            mixed[:, :, j] ^= _INV_MIX[(k - j) % 4][inner[:, :, k]]
    rounds[1:-1] = mixed
    return rounds.reshape(-1)


def is_degenerate(key: bytes) -> bool:
    """True for filler keys: fewer than MIN_DISTINCT_KEY_BYTES distinct byte values, or an
    all-zero 32-bit word (chance 2^-30 for a random key; stage 2 relies on nonzero key words
    to skip zero runs, which obey every XOR relation)."""
    words = [key[i : i + 4] for i in range(0, len(key), 4)]
    return len(set(key)) < MIN_DISTINCT_KEY_BYTES or bytes(4) in words


def _sbox_free(nk: int) -> np.ndarray:
    """Word indices of the schedule computed without the S-box."""
    i = np.arange(nk, schedule_words(nk))
    keep = (i % nk) != 0
    if nk == 8:
        keep &= (i % 8) != 4
    return i[keep]


_FREE = {nk: _sbox_free(nk) for nk in NKS}
#: S-box-free relations tested before the exact expansion (a prefilter: the expansion decides)
PREFILTER_RELATIONS = 16
_WINDOW = 4 * schedule_words(8) + 16  # bytes on either side of a stage-1 candidate


AES_BLOCK = 64 << 10  # words per stage-1 block: its scratch arrays (~0.4 MiB) stay in L2


def _stage1(data: np.ndarray) -> np.ndarray:
    """Sorted chunk byte offsets near which a schedule may lie (one per stage-1 hit)."""
    a0 = (-data.ctypes.data) % 4  # first 4-aligned byte: aligned uint32 passes run faster
    nw = (data.size - a0) // 4
    if nw < schedule_words(4):
        return np.zeros(0, np.int64)
    a = data[a0 : a0 + 4 * nw].view(np.uint32)
    reach = max(NKS) + 1  # words past t that the test of word t reads
    out = []
    for t0 in range(0, nw - reach, AES_BLOCK):
        size = min(AES_BLOCK, nw - reach - t0)
        w = a[t0 : t0 + size + reach]
        p = buffer("aes.p", size + reach - 1, np.uint32)
        np.bitwise_xor(w[1:], w[:-1], out=p)
        nz = buffer("aes.nz", size + reach, np.bool_)
        np.not_equal(w, 0, out=nz)
        eq = buffer("aes.eq", size + 1, np.bool_)
        pair = buffer("aes.pair", size, np.bool_)
        hot = buffer("aes.hot", size, np.bool_)
        for k, nk in enumerate(NKS):
            np.equal(p[nk - 1 : nk + size], w[: size + 1], out=eq)
            np.logical_and(eq, nz[nk - 1 : nk + size], out=eq)
            np.logical_and(eq[:-1], eq[1:], out=hot if k == 0 else pair)
            if k:
                np.logical_or(hot, pair, out=hot)
        np.logical_and(nz[:size], nz[1 : size + 1], out=pair)
        np.logical_and(hot, pair, out=hot)
        if hot.any():
            out.append(np.flatnonzero(hot) + t0)
    if not out:
        return np.zeros(0, np.int64)
    return np.concatenate(out) * 4 + a0


def _windows(data: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge the byte windows around candidates; returns (window bytes concatenated, chunk
    offset of each of those bytes)."""
    lo = np.maximum(cand - _WINDOW, 0)
    hi = np.minimum(cand + _WINDOW, data.size)
    # candidates are sorted and windows equally wide, so a new region starts where a window
    # begins past the previous one's end
    new = np.ones(cand.size, np.bool_)
    new[1:] = lo[1:] > hi[:-1]
    starts = lo[new]
    ends = np.append(hi[np.flatnonzero(new)[1:] - 1], hi[-1])
    pairs = zip(starts.tolist(), ends.tolist(), strict=True)
    idx = np.concatenate([np.arange(s, e) for s, e in pairs])
    return data[idx], idx


def _stage2(buf: np.ndarray, idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Exact schedules in the window buffer: (chunk offset, Nk, layout)."""
    out: list[tuple[int, int, int]] = []
    # 3 bytes of padding, so the words at every byte offset reach the buffer's last byte (a
    # schedule may end right at the end of an image); a match reading padding runs past the
    # chunk, and the engine does not keep it
    buf = np.concatenate((buf, np.zeros(3, np.uint8)))
    idx = np.concatenate((idx, idx[-1] + np.arange(1, 4))) if idx.size else idx
    m = (buf.size - 3) // 4
    if m < schedule_words(4):
        return out
    w = np.stack([buf[r : r + 4 * m].view(np.uint32) for r in range(4)])  # row r: offset r
    nonzero = w != 0
    for nk in NKS:
        total = schedule_words(nk)
        nbytes = 4 * total
        ns = m - total + 1
        if ns <= 0:
            continue
        rel = w[:, nk:] == (w[:, nk - 1 : -1] ^ w[:, :-nk])  # rel[:, j]: word j + nk obeys it
        # the key words must be nonzero (zero runs obey every XOR relation trivially)
        ok = nonzero[:, :ns].copy()
        for i in range(1, nk):
            ok &= nonzero[:, i : i + ns]
        for i in _FREE[nk][:PREFILTER_RELATIONS]:
            ok &= rel[:, i - nk : i - nk + ns]
        r, s = np.nonzero(ok)
        pos = [r + 4 * s]
        if not pos:
            continue
        p = np.concatenate(pos)
        p = p[idx[p + nbytes - 1] - idx[p] == nbytes - 1]  # contiguous in the chunk
        if p.size == 0:
            continue
        mem = buf[p[:, None] + np.arange(nbytes)]
        swapped = mem.reshape(-1, total, 4)[:, :, ::-1].reshape(-1, nbytes)
        for layout, img in ((STANDARD, mem), (BYTESWAPPED, swapped)):
            good = (expand_keys(img[:, : 4 * nk]) == img).all(axis=1)
            for k in np.flatnonzero(good).tolist():
                if not is_degenerate(img[k, : 4 * nk].tobytes()):
                    out.append((int(idx[p[k]]), nk, layout))
    return out


def _is_crypto_aes_ctx(data: np.ndarray, start: int, nk: int) -> bool:
    """Whether a standard-layout schedule at ``start`` is the head of a crypto_aes_ctx."""
    if start + CTX_SIZE > data.size:
        return False
    nbytes = 16 * (nk + 7)
    enc = data[start : start + nbytes]
    dec = data[start + CTX_DEC_OFFSET : start + CTX_DEC_OFFSET + nbytes]
    return bool(np.array_equal(dec, inverse_schedule(enc)))


class AesKeyDetector(Detector):
    """``aes-key``: expanded AES encryption key schedules (FIPS-197 and byte-swapped word
    layouts, Linux crypto_aes_ctx as one key)."""

    name = "aes-key"
    group = "keys"
    max_len = 16 * (8 + 7)  # an AES-256 schedule (bytes)
    # bytes after a schedule looked at: the rest of a crypto_aes_ctx (>= 1 before it, so the
    # engine keeps matches starting at an extent edge)
    context = CTX_SIZE - max_len

    def find(self, chunk: Chunk) -> Hits:
        data = chunk.data
        cand = _stage1(data)
        if cand.size == 0:
            return Hits.empty()
        buf, idx = _windows(data, cand)
        found = _stage2(buf, idx)
        if not found:
            return Hits.empty()
        starts, lengths, tags = [], [], []
        for start, nk, layout in sorted(found):
            in_ctx = layout == STANDARD and _is_crypto_aes_ctx(data, start, nk)
            starts.append(start)
            lengths.append(16 * (nk + 7))
            tags.append(nk * 4 + (IN_CTX if in_ctx else 0) + layout)
        return Hits.of(starts, lengths, BINARY, tags)

    def describe(self, hit: Hit) -> Described | None:
        nk, flags = divmod(hit.tag, 4)
        layout = flags & 1
        key = np.frombuffer(hit.raw[: 4 * nk], np.uint8)
        if layout == BYTESWAPPED:
            key = key.reshape(nk, 4)[:, ::-1].reshape(-1)
        value = key.tobytes()
        bits = 32 * nk
        details: dict[str, object] = {"bits": bits, "layout": LAYOUTS[layout], "confidence": 1.0}
        if flags & IN_CTX:
            details["container"] = "crypto_aes_ctx"
        return Described(
            value=value, masked=f"AES-{bits} {value[:2].hex()}...{value[-2:].hex()}",
            details=details,
        )
