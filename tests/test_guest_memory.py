"""scanner/vol3/memory.py: overlapping copies of guest bytes resolved as a restore would (the
copy stored later wins; stored bytes over declared zeros), checked against a byte-by-byte
model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.vol3.memory import Run, _disjoint

SPAN = 64


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SPAN - 1), st.integers(1, 24), st.booleans()),
                max_size=12))
def test_later_copy_wins_byte_by_byte(spec: list[tuple[int, int, bool]]) -> None:
    runs, model = [], [None] * (SPAN + 24)
    for k, (start, length, zeros) in enumerate(spec):
        buf = None if zeros else np.full(length + 5, k + 1, np.uint8)
        runs.append(Run(start, length, buf, 5 if buf is not None else 0))
        for a in range(start, start + length):
            model[a] = 0 if zeros else k + 1
    out = _disjoint(runs)
    assert all(a.end <= b.start for a, b in zip(out, out[1:], strict=False))
    got = [None] * (SPAN + 24)
    for r in out:
        assert r.length > 0
        for i in range(r.length):
            got[r.start + i] = 0 if r.buf is None else int(r.buf[r.offset + i])
    assert got == model
