"""aes-key: AES-128/192/256 schedules (pyaes as the reference expansion) found exactly once,
at any offset and chunking, in both word layouts; anything else is not."""

from __future__ import annotations

import struct
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patterns import aes
from patterns.aes import AesKeyDetector, expand_keys, is_degenerate
from patterns.base import Chunk, Hit

pyaes = pytest.importorskip("pyaes", reason="pyaes is the reference key expansion",
                            exc_type=ImportError)

DET = AesKeyDetector()
SETTINGS = settings(max_examples=40)
KEY = st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n))


def pyaes_schedule(key: bytes) -> bytes:
    """The encryption schedule as pyaes computes it (its words are big-endian ints)."""
    rounds = pyaes.AES(key)._Ke
    return b"".join(struct.pack(">4I", *(w & 0xFFFFFFFF for w in rk)) for rk in rounds)


def pyaes_decrypt_schedule(key: bytes) -> bytes:
    """pyaes's equivalent-inverse-cipher schedule (the Linux key_dec contents)."""
    rounds = pyaes.AES(key)._Kd
    return b"".join(struct.pack(">4I", *(w & 0xFFFFFFFF for w in rk)) for rk in rounds)


def byteswapped(schedule: bytes) -> bytes:
    """OpenSSL's rd_key in little-endian memory: each 32-bit word's bytes reversed."""
    return b"".join(schedule[i : i + 4][::-1] for i in range(0, len(schedule), 4))


def background(seed: int, size: int, kind: str) -> bytearray:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytearray(size)
    if kind == "text":
        words = np.frombuffer(b"the quick brown fox jumps over 0123 lazy dogs\n", np.uint8)
        return bytearray(words[rng.integers(0, words.size, size)].tobytes())
    return bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def find(buf: bytes) -> list[tuple[int, int, dict, bytes]]:
    """(offset, length, details, key) of every hit of the detector on one chunk."""
    hits = DET.find(Chunk(np.frombuffer(bytes(buf), np.uint8)))
    out = []
    tags = [0] * len(hits) if hits.tag is None else hits.tag.tolist()
    for s, n, tag in zip(hits.start.tolist(), hits.length.tolist(), tags, strict=True):
        d = DET.describe(Hit(bytes(buf[s : s + n]), "binary", b"", b"", tag))
        assert d is not None
        out.append((s, n, d.details, d.value))
    return out


@given(key=KEY)
@settings(max_examples=30)
def test_expansion_matches_pyaes(key: bytes) -> None:
    ours = expand_keys(np.frombuffer(key, np.uint8)[None, :])[0].tobytes()
    assert ours == pyaes_schedule(key)


# FIPS-197 Appendix A: cipher keys and the last word of each expansion (w[43], w[51], w[59])
FIPS197 = [
    ("2b7e151628aed2a6abf7158809cf4f3c", "b6630ca6"),
    ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", "01002202"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", "706c631e"),
]


@pytest.mark.parametrize(("key_hex", "last_word"), FIPS197)
def test_fips197_appendix_a(key_hex: str, last_word: str, key) -> None:
    key = bytes.fromhex(key_hex)
    schedule = expand_keys(np.frombuffer(key, np.uint8)[None, :])[0].tobytes()
    assert schedule[-4:].hex() == last_word  # the published vector, not our own code
    for layout, image in (("standard", schedule), ("byteswapped", byteswapped(schedule))):
        buf = background(7, 8192, "random")
        buf[1001 : 1001 + len(image)] = image
        assert [(s, n, d["bits"], d["layout"], v) for s, n, d, v in find(buf)] == [
            (1001, len(schedule), 8 * len(key), layout, key)
        ]


@SETTINGS
@given(
    key=KEY,
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["random", "zeros", "text"]),
    swapped=st.booleans(),
    where=st.integers(0, 6000),
)
def test_planted_found_once(key: bytes, seed: int, kind: str, swapped: bool, where: int) -> None:
    assume(not is_degenerate(key))
    schedule = pyaes_schedule(key)
    image = byteswapped(schedule) if swapped else schedule
    buf = background(seed, 6400, kind)
    buf[where : where + len(image)] = image
    found = find(buf)
    assert [(s, n, d["bits"], v) for s, n, d, v in found] == [
        (where, len(schedule), 8 * len(key), key)
    ]
    assert found[0][2]["layout"] == ("byteswapped" if swapped else "standard")


@pytest.mark.parametrize("nbytes", [16, 24, 32])
@pytest.mark.parametrize("swapped", [False, True])
def test_schedule_ending_at_the_last_byte_of_a_chunk(nbytes: int, swapped: bool, key) -> None:
    """At every byte alignment, a schedule whose last byte is the chunk's last is found."""
    key = bytes(range(7, 7 + nbytes))
    schedule = pyaes_schedule(key)
    image = byteswapped(schedule) if swapped else schedule
    for size in range(4000, 4004):
        buf = background(size, size, "random")
        buf[size - len(image) :] = image
        found = find(buf)
        assert [(s, n, v) for s, n, _, v in found] == [(size - len(image), len(image), key)]


def small_int_table(seed: int, size: int) -> bytearray:
    """Rows of small integers padded with zero words (relocations, symbol tables): data that
    obeys the schedule relation on its own, which stage 1 must throw out without losing keys."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((size // 24 + 1, 6), np.uint32)
    rows[:, 0] = 7
    rows[:, 1] = np.arange(rows.shape[0]) + rng.integers(0, 100)
    rows[:, 4] = 8 * np.arange(rows.shape[0]) + rng.integers(0, 1 << 20)
    return bytearray(rows.tobytes()[:size])


@SETTINGS
@given(
    key=KEY,
    seed=st.integers(0, 2**32 - 1),
    swapped=st.booleans(),
    where=st.integers(0, 1800),
    block=st.sampled_from([10, 16, 37, aes.AES_BLOCK]),
)
def test_found_across_stage1_blocks_in_zero_padded_tables(
    key: bytes, seed: int, swapped: bool, where: int, block: int
) -> None:
    """Stage 1 runs in blocks of AES_BLOCK words (small ones here, so schedules straddle
    their seams) and skips hits reading zero words: a schedule is still found once."""
    assume(not is_degenerate(key))
    schedule = pyaes_schedule(key)
    image = byteswapped(schedule) if swapped else schedule
    buf = small_int_table(seed, 2100)
    buf[where : where + len(image)] = image
    with mock.patch.object(aes, "AES_BLOCK", block):
        found = find(buf)
    assert [(s, n, v) for s, n, _, v in found] == [(where, len(schedule), key)]


@SETTINGS
@given(key=KEY, swapped=st.booleans(), shift=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_stage1_hits_survive_any_zero_word(
    key: bytes, swapped: bool, shift: int, seed: int
) -> None:
    """Stage 1 drops hits that read a zero word; a zero word inside a schedule (odds 2^-32
    each) removes only the hits up to 8 words before it, and others remain to find the key."""
    assume(not is_degenerate(key))
    schedule = pyaes_schedule(key)
    image = byteswapped(schedule) if swapped else schedule
    buf = background(seed, 800, "random")
    start = 256 + shift
    buf[start : start + len(image)] = image
    hits = aes._stage1(np.frombuffer(bytes(buf), np.uint8))
    word = (hits - 256) // 4  # aligned word of each hit; the test of word t reads t .. t+8
    inside = word[(word >= 0) & (4 * (word + 9) <= shift + len(image))]
    for z in range(len(image) // 4 + 1):
        assert ((inside < z - 8) | (inside > z)).sum() >= 6


@SETTINGS
@given(key=KEY, index=st.integers(0, 239), delta=st.integers(1, 255), where=st.integers(0, 900))
def test_one_changed_byte_is_not_a_schedule(key: bytes, index: int, delta: int, where: int) -> None:
    assume(not is_degenerate(key))
    schedule = bytearray(pyaes_schedule(key))
    schedule[index % len(schedule)] ^= delta
    buf = background(1, 1400, "zeros")
    buf[where : where + len(schedule)] = schedule
    assert find(buf) == []


def test_degenerate_and_filler_memory_not_reported() -> None:
    buf = bytearray(16384)
    buf[100:276] = pyaes_schedule(bytes(16))  # the all-zero key's schedule: filler
    buf[1000:1240] = pyaes_schedule(b"\xff" * 32)
    buf[2000:3000] = bytes(range(250)) * 4
    buf[4000:8000] = b"\x01\x02\x03\x00" * 1000  # runs obeying XOR relations trivially
    buf[8000:12000] = b"\x00\x00\x00\x00\x11\x22\x33\x44" * 500
    assert find(buf) == []


@pytest.mark.parametrize("nbytes", [16, 24, 32])
def test_linux_crypto_aes_ctx_is_one_key(nbytes: int, key) -> None:
    key = bytes(range(7, 7 + nbytes))
    enc, dec = pyaes_schedule(key), pyaes_decrypt_schedule(key)
    ctx = bytearray(484)  # u32 key_enc[60]; u32 key_dec[60]; u32 key_length
    ctx[: len(enc)] = enc
    ctx[240 : 240 + len(dec)] = dec
    ctx[480:484] = struct.pack("<I", nbytes)
    buf = background(3, 4096, "random")
    buf[333 : 333 + 484] = ctx
    found = find(buf)
    assert [(s, n, d.get("container"), d["bits"], v) for s, n, d, v in found] == [
        (333, len(enc), "crypto_aes_ctx", 8 * nbytes, key)
    ]
    buf[240 + 333 + 20] ^= 1  # a damaged key_dec: an ordinary schedule, reported as such
    assert [(s, n, d.get("container")) for s, n, d, _ in find(buf)] == [(333, len(enc), None)]


def test_masked_shows_size_and_two_bytes_each_end(key) -> None:
    key = bytes.fromhex(FIPS197[0][0])
    buf = background(5, 2048, "random")
    buf[64 : 64 + 176] = pyaes_schedule(key)
    hits = DET.find(Chunk(np.frombuffer(bytes(buf), np.uint8)))
    d = DET.describe(Hit(bytes(buf[64:240]), "binary", b"", b"", int(hits.tag[0])))
    assert d is not None
    assert d.masked == "AES-128 2b7e...4f3c"
    assert key.hex()[4:-4] not in d.masked


# --- through the engine -----------------------------------------------------------------------


@settings(max_examples=25)
@given(
    key=KEY,
    where=st.integers(0, 8 * 4096 - 256),
    chunk=st.sampled_from([4096, 4100, 65536, 262144]),
    shuffle=st.integers(0, 2**32 - 1),
)
def test_engine_any_offset_any_chunking(key: bytes, where: int, chunk: int, shuffle: int,
                                        engine_scan) -> None:
    pytest.importorskip("scanner.engine", reason="engine not present")
    assume(not is_degenerate(key))
    schedule = pyaes_schedule(key)
    buf = background(shuffle, 8 * 4096, "random")
    buf[where : where + len(schedule)] = schedule
    order = list(range(8))
    np.random.default_rng(shuffle).shuffle(order)
    for layout in (None, order):
        found = engine_scan(buf, chunk, layout)
        assert [(f.detector, f.gpa, f.length, f.details["bits"]) for f in found] == [
            ("aes-key", where, len(schedule), 8 * len(key))
        ]


@settings(max_examples=20)
@given(where=st.integers(0, 8 * 4096 - 484), nbytes=st.sampled_from([16, 24, 32]),
       shuffle=st.integers(0, 2**32 - 1))
def test_engine_crypto_aes_ctx_once(where: int, nbytes: int, shuffle: int, engine_scan,
                                    key) -> None:
    """A crypto_aes_ctx anywhere, pages in or out of order: one key, never two."""
    key = bytes(range(40, 40 + nbytes))
    enc, dec = pyaes_schedule(key), pyaes_decrypt_schedule(key)
    buf = background(shuffle, 8 * 4096, "random")
    buf[where : where + len(enc)] = enc
    buf[where + len(enc) : where + 240] = bytes(240 - len(enc))
    buf[where + 240 : where + 240 + len(dec)] = dec
    buf[where + 480 : where + 484] = struct.pack("<I", nbytes)
    order = list(range(8))
    np.random.default_rng(shuffle).shuffle(order)
    for layout in (None, order):
        found = engine_scan(buf, 4096, layout)
        assert [(f.gpa, f.length, f.details["bits"]) for f in found] == [
            (where, len(enc), 8 * nbytes)
        ]
        if layout is None:
            assert found[0].details["container"] == "crypto_aes_ctx"
