"""Differential: scanning a page stream reports exactly what scanning the flat raw file of its
guest memory (``vmleak extract``) reports, finding for finding — for a real QEMU stream, for
written streams with secrets across page boundaries and next to zero pages, and for the
same memory handed to the engine as streamed segments (decompression windows) in any order."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import registry
from parsers.base import Extents, MemoryImage, Segment
from patterns.registry import select
from scanner.engine import Engine, ScanConfig
from scanner.imageinfo import extract
from tests.conftest import TEST_KEY
from tests.plant import family_secrets, group, make_pan, mixed_pages
from tests.qemu_writer import libvirt_save, ram_stream
from tests.samples import qemu_sample

PAGE = 4096
NPAGES = 40


def findings(image: MemoryImage) -> list[tuple]:
    """Every detector's findings in guest-physical memory, as comparable tuples."""
    result = Engine(ScanConfig(select("all"), key=TEST_KEY)).scan_image(image)
    assert not result.errors
    return sorted(
        (f.detector, f.gpa, f.length, f.encoding, f.fingerprint, f.confidence)
        for f in result.findings
        if f.gpa is not None
    )


def scan_file(path: Path) -> list[tuple]:
    with registry.open_image(str(path), None) as image:
        return findings(image)


def scan_extract(path: Path, tmp: Path) -> list[tuple]:
    raw = tmp / (path.name + ".raw")
    with registry.open_image(str(path), None) as image:
        extract(image, str(raw))
    return scan_file(raw)


def test_real_qemu_stream_scans_like_its_extract(tmp_path: Path) -> None:
    stream = qemu_sample("pc-64m.qevm", tmp_path)
    found = scan_file(stream)
    assert len(found) >= 3  # the planted card numbers, one across a page boundary
    assert found == scan_extract(stream, tmp_path)


def memory(seed: int, near: list[int], rsa: Any) -> bytes:
    """NPAGES pages, each zero, text or random; the secrets planted at offsets ``near`` from
    random page boundaries (so across them, or just before or after a zero page)."""
    rng = random.Random(seed)
    mem = mixed_pages(rng, seed, NPAGES, b"lorem ipsum 0123456789 card=;", 0.35)
    for blob, off in zip(family_secrets(rng, rsa, 32, " "), near, strict=False):
        at = rng.randrange(1, NPAGES - 2) * PAGE + off - len(blob) // 2
        at = min(max(at, 0), mem.size - len(blob))
        mem[at : at + len(blob)] = np.frombuffer(blob, np.uint8)
    return mem.tobytes()


def pages_of(mem: bytes) -> dict[int, bytes]:
    return {a: mem[a : a + PAGE] for a in range(0, len(mem), PAGE) if any(mem[a : a + PAGE])}


SETTINGS = settings(max_examples=25)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1),
       near=st.lists(st.integers(-600, 600), min_size=8, max_size=8),
       gzip=st.booleans())
def test_written_stream_scans_like_its_extract(tmp_path: Path, key: Any, seed: int,
                                               near: list[int], gzip: bool) -> None:
    """A stream mapped in place (pages gathered in guest order) or decompressed in windows."""
    mem = memory(seed, near, key("rsa1024"))
    stream = ram_stream(pages_of(mem), len(mem))
    path = tmp_path / f"s{seed}.{'save' if gzip else 'qevm'}"
    if gzip:
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # libvirt's gzip format
        stream = libvirt_save(packer.compress(stream) + packer.flush(), 1, len(mem))
    path.write_bytes(stream)
    raw = tmp_path / f"m{seed}.raw"
    raw.write_bytes(mem)
    assert scan_file(path) == scan_file(raw) == scan_extract(path, tmp_path)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1),
       near=st.lists(st.integers(-600, 600), min_size=8, max_size=8),
       windows=st.integers(0, 6), shuffle=st.booleans())
def test_streamed_segments_scan_like_flat_memory(key: Any, seed: int, near: list[int],
                                                 windows: int, shuffle: bool) -> None:
    """The stored pages handed over in ``windows`` reused buffers (pages of a window in any
    order, 8 junk bytes apart; 0: a page each): seams between windows are stitched, nothing
    else changes."""
    mem = memory(seed, near, key("rsa1024"))
    pages = sorted(pages_of(mem).items())
    if shuffle:
        random.Random(seed).shuffle(pages)
    windows = windows or len(pages)  # 0: a page a window, every page edge a seam
    cut = [len(pages) * k // windows for k in range(windows + 1)]

    def stream():
        buf = np.full(len(pages) * (PAGE + 8), ord("7"), np.uint8)  # junk between pages
        for lo, hi in zip(cut, cut[1:], strict=False):
            part = pages[lo:hi]
            buf[:] = ord("7")
            for k, (_, data) in enumerate(part):
                buf[k * (PAGE + 8) : k * (PAGE + 8) + PAGE] = np.frombuffer(data, np.uint8)
            ext = Extents.build([k * (PAGE + 8) for k in range(len(part))],
                                [a for a, _ in part], [PAGE] * len(part))
            yield Segment(buf, ext, "mem", reused=True)

    streamed = MemoryImage(path="mem", format="test", files=["mem"], stream=stream)
    flat = MemoryImage(path="mem", format="test", files=["mem"], fixed_segments=[
        Segment(np.frombuffer(mem, np.uint8), Extents.single(len(mem), 0, 0), "mem")])
    assert findings(streamed) == findings(flat)


def test_units_of_a_page_stream_scan_like_the_whole(tmp_path: Path, monkeypatch: Any) -> None:
    """RANGE units of an image whose pages are stored out of order (each unit reading its
    guest neighbours from wherever they are stored) find what one scan of it finds."""
    import pickle

    from scanner import runner
    from tests.plant import lime

    rng = random.Random(7)
    mem = bytearray(rng.randbytes(64 * PAGE))
    for k in range(1, 64, 3):  # card numbers across page boundaries
        text = f" {group(make_pan(rng), ' ')} ".encode()
        at = k * PAGE - len(text) // 2
        mem[at : at + len(text)] = text
    order = list(range(64))
    rng.shuffle(order)
    img = tmp_path / "shuffled.lime"
    img.write_bytes(lime(bytes(mem), order))
    monkeypatch.setattr(runner, "SPLIT_MIN", 8 * PAGE)
    runner.install("u", ScanConfig(select("cards"), key=TEST_KEY, chunk_size=16384))
    try:
        spec = runner.ImageSpec(str(img))
        opened = runner.open_task("u", spec, 4)
        assert opened.layout is not None and len(opened.units) == 5
        found = []
        for u in opened.units:
            found += runner.unit_task("u", *pickle.loads(pickle.dumps(
                (opened.layout.for_unit(u), u)))).findings
        whole = runner.open_task("u", spec, 1).result
    finally:
        runner.uninstall("u")
    assert whole is not None and len(whole.findings) >= 15
    assert sorted((f.gpa, f.fingerprint) for f in found) == sorted(
        (f.gpa, f.fingerprint) for f in whole.findings)


def test_edges_forgotten_past_the_pending_limit_are_reported(key: Any, monkeypatch: Any) -> None:
    """Pages handed over one a segment in shuffled order: every page edge waits for its
    partner. With no room for waiting edges (PENDING_LIMIT 0) each segment's are forgotten at
    once, and an edge meeting a forgotten one later says so; with the default room, none."""
    import scanner.engine

    mem = memory(7, [0] * 8, key("rsa1024"))
    pages = sorted(pages_of(mem).items())
    random.Random(7).shuffle(pages)

    def stream():
        for addr, data in pages:
            buf = np.frombuffer(data, np.uint8)
            yield Segment(buf, Extents.build([0], [addr], [PAGE]), "mem")

    def warnings() -> list[str]:
        image = MemoryImage(path="mem", format="test", files=["mem"], stream=stream)
        return Engine(ScanConfig(select("all"), key=TEST_KEY)).scan_image(image).warnings

    assert not any("unmatched memory edges" in w for w in warnings())
    monkeypatch.setattr(scanner.engine, "PENDING_LIMIT", 0)
    assert any("unmatched memory edges" in w for w in warnings())
