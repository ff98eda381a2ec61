"""Zero-page squeezing (scanner/engine.py ``_Squeezed``): leaving all-zero pages out of the
chunks detectors see changes nothing they report, wherever secrets lie next to zero pages."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers.base import Extents, MemoryImage, Segment
from patterns.base import Hits
from patterns.registry import select
from scanner.engine import GAP_MIN, PAGE, Engine, ScanConfig, _Squeezed
from tests.plant import family_secrets, mixed_pages

NPAGES = 48


def image(data: np.ndarray) -> MemoryImage:
    seg = Segment(data, Extents.build([0], [0], [data.size]), "mem")
    return MemoryImage(path="mem", format="test", files=["mem"], fixed_segments=[seg])


def findings(data: np.ndarray, squeeze: bool, chunk: int) -> list[tuple]:
    eng = Engine(ScanConfig(select("all"), key=b"k" * 32, chunk_size=chunk, squeeze=squeeze))
    found = eng.scan_image(image(data)).findings
    return sorted((f.detector, f.gpa, f.length, f.fingerprint) for f in found)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([16 * PAGE, 64 * PAGE + 8, 1 << 22]),
       near=st.lists(st.one_of(st.integers(-700, 700), st.sampled_from(["end", "start"])),
                     min_size=8, max_size=8))
def test_squeezed_scan_reports_what_the_plain_scan_does(seed, chunk, near, key):
    """Pages are zero, random or text of digits and letters; each secret is planted across or
    beside a page edge (``near`` bytes from it, or ending / starting right at it), so many touch
    a zero page, beyond which the next page's characters would glue on if the squeeze did not
    keep zeros between."""
    rng = random.Random(seed)
    data = mixed_pages(rng, seed, NPAGES, b"0123456789ABCDEFabcdef", 0.4)
    # one edge each, so no plant overwrites another (each lies within 2 KiB of its edge)
    edges = rng.sample(range(1, NPAGES - 2), len(near))
    for blob, off, edge in zip(family_secrets(rng, key("rsa1024")), near, edges, strict=True):
        edge *= PAGE
        at = edge - len(blob) if off == "end" else edge if off == "start" else edge + off
        data[at : at + len(blob)] = np.frombuffer(blob, np.uint8)
    plain = findings(data, False, chunk)
    assert findings(data, True, chunk) == plain
    # the plants whose ends no neighbouring byte can change were found: the AES schedule, the
    # DER and PEM keys, the sentinel-delimited track and the EMV record (text glued to a random
    # page may not be)
    assert {"aes-key", "rsa-key", "pem-key", "track2", "emv-track2"} <= {f[0] for f in plain}


def test_squeeze_keeps_zero_edges_and_drops_hits_across_a_gap():
    gap = 512
    keep = gap // 2
    base = np.zeros(17 * PAGE, np.uint8)
    at = (-base.ctypes.data) % PAGE  # squeezing works on whole memory pages
    data = base[at : at + 16 * PAGE]
    data[:PAGE] = 1
    data[5 * PAGE : 6 * PAGE] = 2  # pages 1-4 and 6-15 are zero
    out = np.full(data.size, 7, np.uint8)  # a reused buffer: whatever it held is overwritten
    sq = _Squeezed.of(data, gap, out)
    assert sq is not None
    assert np.shares_memory(sq.chunk.data, out)
    assert sq.bstart.tolist() == [0, 5 * PAGE - keep, 16 * PAGE - keep]
    assert sq.length.tolist() == [PAGE + keep, PAGE + 2 * keep, keep]
    buf = sq.chunk.data
    for q, b, n in zip(sq.qstart.tolist(), sq.bstart.tolist(), sq.length.tolist(), strict=True):
        assert np.array_equal(buf[q : q + n], data[b : b + n])
    first_end = int(sq.qstart[1])
    hits = Hits.of([10, first_end - 4, first_end + 3], [8, 8, 8], 0)
    assert sq.inside(hits).tolist() == [True, False, True]  # the straddling one left out
    assert sq.unsqueeze(hits.start[[0, 2]]).tolist() == [10, 5 * PAGE - keep + 3]
    assert _Squeezed.of(np.ones(16 * PAGE, np.uint8), gap, out) is None  # no zero page


def test_zeros_kept_cover_every_read_past_a_match():
    """A kernel crypto_aes_ctx is the farthest any detector reads past a match (its
    decryption schedule after an encryption schedule): the zeros standing for a squeezed-out
    run or a gap between pieces must cover it, so what lies beyond reads as zeros."""
    from patterns.aes import CTX_SIZE, AesKeyDetector

    assert GAP_MIN >= CTX_SIZE - AesKeyDetector.max_len


def test_token_ending_at_a_zero_page_is_not_glued_to_the_next_page():
    data = np.zeros(24 * PAGE, np.uint8)
    data[2 * PAGE : 3 * PAGE] = ord(" ")
    data[4 * PAGE : 5 * PAGE] = np.frombuffer(b"0123456789ABCDEF" * (PAGE // 16), np.uint8)
    token = b"AKIAQ7RZ4MXK2TLWB5NP"  # (an alphabet run would be a placeholder)
    data[3 * PAGE - len(token) : 3 * PAGE] = np.frombuffer(token, np.uint8)  # page 3 is zero
    plain = findings(data, False, 16 * PAGE)
    assert [f[:3] for f in plain] == [("aws-key", 3 * PAGE - len(token), len(token))]
    assert findings(data, True, 16 * PAGE) == plain
