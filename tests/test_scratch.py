"""The shared anchor pass (patterns/scratch.py) against a plain byte-by-byte search: every
registered anchor at every offset, as bytes and as UTF-16LE characters, whatever the buffer's
length, start address and block seams."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterns.registry  # noqa: F401  (imports every detector: all anchors registered)
from patterns import scratch
from patterns.base import ASCII, UTF16LE, Chunk

ANCHORS = dict(scratch._ANCHORS)
#: bytes that make near misses likely: every anchor byte, zero, and a few others
ALPHABET = sorted({b for pair in ANCHORS for b in pair} | {0, 0x20, 0x41, 0xFF})


def expected(data: bytes) -> dict[bytes, list[tuple[int, int, list[int]]]]:
    """The anchor pass's answer by brute force."""
    out: dict[bytes, list[tuple[int, int, list[int]]]] = {}
    for pair, text in ANCHORS.items():
        found = []
        as_bytes = [p for p in range(len(data) - 1) if data[p : p + 2] == pair]
        if as_bytes:
            found.append((ASCII, 1, as_bytes))
        utf16 = [p for p in range(len(data) - 2) if data[p : p + 3] == pair[:1] + b"\0" + pair[1:]]
        if text and utf16:
            found.append((UTF16LE, 2, utf16))
        out[pair] = found
    return out


def test_every_detector_registers_its_anchors() -> None:
    assert {b"--", b"TY", b"y-", b"IA", b"gh", b"b_", b"xo", b"_l", b"Iz", b"yJ"} <= set(ANCHORS)
    assert ANCHORS[b"\x02\x01"] is False  # DER's version: bytes only


@settings(max_examples=300)
@given(
    body=st.lists(st.sampled_from(ALPHABET), max_size=200),
    plants=st.lists(
        st.tuples(st.sampled_from(sorted(ANCHORS)), st.booleans(), st.integers(0, 200)),
        max_size=6,
    ),
    shift=st.integers(0, 3),
    block=st.sampled_from([8, 9, 64, scratch.ANCHOR_BLOCK]),
)
def test_anchor_pass_matches_brute_force(
    body: list[int], plants: list[tuple[bytes, bool, int]], shift: int, block: int
) -> None:
    buf = bytearray(body)
    for pair, utf16, at in plants:
        token = pair[:1] + b"\0" + pair[1:] + b"\0" if utf16 else pair
        at = min(at, len(buf))
        buf[at : at + len(token)] = token
    # any start address: the chunk is a view at ``shift`` bytes into a larger buffer
    backing = np.zeros(len(buf) + shift, np.uint8)
    backing[shift:] = np.frombuffer(bytes(buf), np.uint8)
    chunk = Chunk(backing[shift:])
    with mock.patch.object(scratch, "ANCHOR_BLOCK", block):
        got = {pair: scratch.anchor_hits(chunk, pair) for pair in ANCHORS}
    got_lists = {
        pair: [(enc, step, offs.tolist()) for enc, step, offs in hits] for pair, hits in got.items()
    }
    assert got_lists == expected(bytes(buf))


@pytest.mark.parametrize("pair", [b"", b"x", b"abc", b"a\0", b"\0a"])
def test_anchor_must_be_two_nonzero_bytes(pair: bytes) -> None:
    with pytest.raises(ValueError, match="2 nonzero bytes"):
        scratch.register_anchor(pair)
