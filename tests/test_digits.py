"""The shared digit stage (patterns/digits.py): chains worked out in blocks equal chains worked
out in one piece, and match a plain reading of the text."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from patterns import digits

TEXT = st.binary(min_size=0, max_size=300).map(
    lambda b: bytes(b"0123456789 -a,"[x % 14] for x in b)
)


def chains_of(text: bytes, block: int) -> digits.Chains:
    saved, digits.CHAIN_BLOCK = digits.CHAIN_BLOCK, block
    try:
        t = np.frombuffer(text, np.uint8)
        return digits._chains(t)
    finally:
        digits.CHAIN_BLOCK = saved


@settings(max_examples=300)
@given(text=TEXT, block=st.integers(1, 40).map(lambda k: 8 * k))
def test_chains_in_blocks_equal_chains_in_one_piece(text, block):
    whole = chains_of(text, 1 << 20)
    parts = chains_of(text, block)
    for name in ("start", "end", "links", "sep", "key", "bits"):
        assert np.array_equal(getattr(whole, name), getattr(parts, name)), name


@settings(max_examples=300)
@given(text=TEXT, block=st.integers(1, 40).map(lambda k: 8 * k))
def test_plain_chains_are_the_lone_digit_runs(text, block):
    """Every 7..64-digit run with no space or dash joining it to another digit is a chain
    without separators; every such chain is a whole digit run (more of them where a group
    glued to a word was dropped from a chain: "a1 2345678")."""
    c = chains_of(text, block)
    got = {(s, e) for s, e, k in zip(c.start.tolist(), c.end.tolist(), c.links.tolist(),
                                       strict=True) if k == 0}
    want = set()
    for m in re.finditer(rb"\d+", text):
        s, e = m.span()
        joined = (s >= 2 and text[s - 1] in b" -" and text[s - 2 : s - 1].isdigit()) or (
            e + 1 < len(text) and text[e] in b" -" and text[e + 1 : e + 2].isdigit())
        if 7 <= e - s <= 64 and not joined:
            want.add((s, e))
    assert want <= got
    for s, e in got:
        assert text[s:e].isdigit()
        assert not text[s - 1 : s].isdigit() and not text[e : e + 1].isdigit()


@settings(max_examples=300)
@given(text=TEXT, block=st.integers(1, 40).map(lambda k: 8 * k))
def test_grouped_chains_read_like_the_text(text, block):
    """Digit groups joined by single spaces or dashes: every chain with a group key spells
    that key in the text, and every such run of 7..64 characters with 9+ digits, one kind of
    separator, 2..MAX_GROUPS groups, a first group of 3 or 4 and no letter around is one."""
    c = chains_of(text, block)
    got = {}
    for s, e, k, ln, sp in zip(c.start.tolist(), c.end.tolist(), c.key.tolist(),
                               c.links.tolist(), c.sep.tolist(), strict=True):
        if k >= 0 and ln > 0:
            groups = re.split(rb"[ -]", text[s:e])
            assert len(groups) == ln + 1 and all(g.isdigit() for g in groups)
            assert set(re.findall(rb"[ -]", text[s:e])) == {bytes([sp])}
            assert k == digits.group_key(tuple(len(g) for g in groups))
            got[(s, e)] = k
    for m in re.finditer(rb"\d+(?:[ -]\d+)+", text):
        s, e = m.span()
        run = text[s:e]
        groups = re.split(rb"[ -]", run)
        seps = set(re.findall(rb"[ -]", run))
        letter_around = text[s - 1 : s].isalpha() or text[e : e + 1].isalpha()
        if (7 <= e - s <= 64 and sum(map(len, groups)) >= 9 and len(seps) == 1
                and 2 <= len(groups) <= digits.MAX_GROUPS and len(groups[0]) in (3, 4)
                and not letter_around):
            assert got.get((s, e)) == digits.group_key(tuple(len(g) for g in groups))


@settings(max_examples=300)
@given(text=TEXT, block=st.integers(1, 40).map(lambda k: 8 * k))
def test_chain_bits_are_its_separators(text, block):
    """``Chains.bits`` marks exactly the spaces and dashes inside each chain (after a glued
    group was dropped); none in what is left of a chain that was all glued groups."""
    c = chains_of(text, block)
    for s, e, b in zip(c.start.tolist(), c.end.tolist(), c.bits.tolist(), strict=True):
        if e - s < 1:
            assert b == 0
            continue
        want = sum(1 << (p - s - 1) for p in range(s, e) if text[p] in b" -")
        assert b == want, (text[s:e], bin(b), bin(want))
