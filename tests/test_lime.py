"""LiME dumps: ranges in any order, and truncated or corrupted files (untrusted input)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from parsers.base import ImageError
from parsers.registry import open_image
from patterns.registry import select
from scanner.engine import Engine, ScanConfig
from tests.plant import PAGE, lime, make_pan

NPAGES = 6


def _memory() -> tuple[bytes, dict[int, str]]:
    mem = bytearray(NPAGES * PAGE)
    planted = {}
    for page in range(NPAGES):
        pan = make_pan(random.Random(page), row=10)  # visa
        at = page * PAGE + 1000
        mem[at - 1 : at + len(pan) + 1] = f" {pan} ".encode()
        planted[at] = pan
    return bytes(mem), planted


def _write(tmp_path_factory, data: bytes):
    path = tmp_path_factory.mktemp("lime") / "dump.lime"
    path.write_bytes(data)
    return path


def _scan(path):
    with open_image(str(path), "lime") as image:
        return Engine(ScanConfig(select("pan"), key=b"k" * 32)).scan_image(image)


@settings(max_examples=60)
@given(cut=st.integers(1, NPAGES * (PAGE + 32) - 1), seed=st.integers(0, 100))
def test_truncated_lime_scans_what_is_there(tmp_path_factory, cut, seed):
    mem, _ = _memory()
    order = list(range(NPAGES))
    random.Random(seed).shuffle(order)
    path = _write(tmp_path_factory, lime(mem, order)[:cut])
    try:
        result = _scan(path)
    except ImageError as err:  # no byte of the first range is in the file
        assert cut <= 32 and str(path) in str(err)
        return
    found = {f.gpa for f in result.findings}
    for k, page in enumerate(order):
        if k * (PAGE + 32) + 32 + 1000 + 16 <= cut:  # the PAN's bytes are in the file
            assert page * PAGE + 1000 in found
    if cut % (PAGE + 32):
        assert result.errors, "a cut inside a range or header is reported"


@settings(max_examples=60)
@given(flip=st.integers(0, NPAGES * (PAGE + 32) - 1), value=st.integers(1, 255))
def test_corrupted_lime_never_crashes(tmp_path_factory, flip, value):
    mem, _ = _memory()
    data = bytearray(lime(mem, list(range(NPAGES))))
    data[flip] ^= value
    path = _write(tmp_path_factory, bytes(data))
    try:
        _scan(path)
    except ImageError as err:
        assert str(path) in str(err)


def test_ranges_out_of_order_found_at_gpas(tmp_path):
    mem, planted = _memory()
    path = tmp_path / "dump.lime"
    path.write_bytes(lime(mem, [3, 0, 5, 1, 4, 2]))
    with open_image(str(path)) as image:
        assert image.format == "lime"
        found = Engine(ScanConfig(select("pan"), key=b"k" * 32)).scan_image(image).findings
    assert {f.gpa: f.masked[-4:] for f in found} == {a: p[-4:] for a, p in planted.items()}
