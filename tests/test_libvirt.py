"""libvirt save images: real ``virsh save`` files from libvirt 9.0 in every compression it
writes (samples/qemu), and written containers for what it does not (zstd, sparse/mapped-ram,
version 1, byte-swapped headers, interrupted saves, bombs), plus hypothesis robustness."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import codecs, libvirt, registry
from parsers.base import ImageError, Remark
from tests.qemu_writer import (
    MIB,
    PAGE,
    Qevm,
    libvirt_head,
    libvirt_save,
    lzop_compress,
    mapped_ram_stream,
    ram_stream,
    zstd_compress,
)
from tests.samples import QEMU_MANIFEST, pan_gpas, qemu_sample

SAVES = sorted(k for k, v in QEMU_MANIFEST.items() if v["kind"] == "libvirt-save")
PAGES = {0x1000: b"guest page one", 0x5000: b"x" * PAGE, 0xF000: b"last"}
# long runs of pages and of zero pages (decoded in numpy batches), cut by windows below
PAGES.update({0x20000 + i * PAGE: b"run page %d" % i for i in range(60)})
STREAM = ram_stream(PAGES, 256 * PAGE)


def write(tmp_path: Path, data: bytes, name: str = "g.save") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


COMPRESSORS = {
    0: lambda d: d,
    1: gzip.compress,
    2: bz2.compress,
    3: lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    4: lzop_compress,
    5: zstd_compress,
}


# ---- real virsh save files --------------------------------------------------------------------


@pytest.mark.parametrize("name", SAVES)
def test_real_save_metadata_and_plants(name: str, read_gpa) -> None:
    entry = QEMU_MANIFEST[name]
    with registry.open_image(str(qemu_sample(name, Path("."))), None) as image:
        m = image.meta
        assert image.format == "libvirt-save"
        assert m["guest_name"] == entry["guest_name"]
        assert m["guest_uuid"] == entry["guest_uuid"]
        assert m["machine"].startswith("pc-q35-")
        assert m["ram_size"] == entry["ram_size"] == m["declared_memory"]
        assert m["compression"] == entry["compression"]
        assert any(b["name"] == "pc.ram" and b["gpa"] for b in m["blocks"])
        for plant in entry["plants"]:
            assert read_gpa(image, plant["gpa"], len(plant["text"])) == plant["text"].encode()
        assert not image.warnings
        assert image.random_access == (entry["compression"] == "raw")


@pytest.mark.parametrize("name", SAVES)
def test_real_save_scan(name: str, scan) -> None:
    with registry.open_image(str(qemu_sample(name, Path(".")))) as image:
        found = scan(image)
        if not image.random_access:
            assert all(f.offset is None for f in found)  # bytes not stored plainly in the file
    assert [f.gpa for f in found] == pan_gpas(QEMU_MANIFEST[name]["plants"])


def test_raw_save_is_mapped_with_file_offsets(scan) -> None:
    path = qemu_sample("libvirt-raw.save", Path("."))
    raw = path.read_bytes()
    with registry.open_image(str(path)) as image:
        (seg,) = image.fixed_segments
        e = seg.extents
        assert np.array_equal(e.file_offset, e.buf_offset)
        assert e.file_offset[e.space == 0].min() > image.meta["payload_offset"]
        assert image.spaces[int(e.space[0])] == "region:header"  # the save header and XML
        plant = QEMU_MANIFEST["libvirt-raw.save"]["plants"][0]
        found = [f for f in scan(image) if f.gpa is not None]
    first = min(found, key=lambda f: f.gpa)
    assert raw[first.offset : first.offset + 6] == plant["text"].split("=")[1][:6].encode()


# ---- written containers -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_every_compression(tmp_path: Path, fmt: int, read_gpa) -> None:
    data = libvirt_save(COMPRESSORS[fmt](STREAM), fmt, 256 * PAGE)
    with registry.open_image(write(tmp_path, data)) as image:
        assert image.meta["compression"] == libvirt.FORMAT_NAMES[fmt]
        assert image.meta["guest_name"] == "written-guest"
        for off, content in PAGES.items():
            assert read_gpa(image, off, len(content)) == content
        assert not image.warnings


def test_small_windows_split_records_and_pages(tmp_path: Path, read_gpa) -> None:
    """Windows far smaller than the stream: records cut at every place still decode."""
    from parsers import qemu

    data = libvirt_save(gzip.compress(STREAM), 1, 256 * PAGE)
    path = write(tmp_path, data)
    image = registry.open_image(path)
    for window in (PAGE + 1, 3 * PAGE + 7, 5 * PAGE - 3, 40 * PAGE + 11):
        def stream(window=window):
            src = codecs.StreamDecoder(libvirt.Evidence(path), image.meta["payload_offset"],
                                       "gzip")
            return qemu.stream_segments(src, image, None, {}, lambda _: 1 << 30, window=window)

        image.stream = stream
        for off, content in PAGES.items():
            assert read_gpa(image, off, len(content)) == content


def test_multi_member_gzip(tmp_path: Path, read_gpa) -> None:
    half = len(STREAM) // 2
    payload = gzip.compress(STREAM[:half]) + gzip.compress(STREAM[half:])
    with registry.open_image(write(tmp_path, libvirt_save(payload, 1, 256 * PAGE))) as image:
        assert read_gpa(image, 0xF000, 4) == b"last"


def test_version1_byte_swapped_and_interrupted(tmp_path: Path, read_gpa) -> None:
    data = libvirt_save(STREAM, 0, 256 * PAGE, version=1)
    with registry.open_image(write(tmp_path, data, "v1.save")) as image:
        assert image.meta["libvirt_header_version"] == 1
        assert read_gpa(image, 0x1000, 14) == PAGES[0x1000]
    data = libvirt_save(gzip.compress(STREAM), 1, 256 * PAGE, order=">")
    with registry.open_image(write(tmp_path, data, "be.save")) as image:
        assert image.meta["byte_order"] == "big"
        assert read_gpa(image, 0x1000, 14) == PAGES[0x1000]
    data = libvirt_save(STREAM[: len(STREAM) // 2], 0, 256 * PAGE, magic=b"LibvirtQemudPart")
    with registry.open_image(write(tmp_path, data, "part.save")) as image:
        msgs = " | ".join(w.message for w in image.warnings)
        assert "interrupted" in msgs and "truncated" in msgs
        assert read_gpa(image, 0x1000, 14) == PAGES[0x1000]


def test_header_format_disagreeing_with_payload(tmp_path: Path, read_gpa) -> None:
    data = libvirt_save(bz2.compress(STREAM), 1, 256 * PAGE)  # says gzip, is bzip2
    with registry.open_image(write(tmp_path, data)) as image:
        assert image.meta["compression"] == "bzip2"
        assert "payload is bzip2" in image.warnings[0].message
        assert read_gpa(image, 0xF000, 4) == b"last"


def test_bad_headers(tmp_path: Path) -> None:
    data = libvirt_save(STREAM, 0, 256 * PAGE, version=7)
    with pytest.raises(ImageError, match="header version"):
        registry.open_image(write(tmp_path, data))
    data = libvirt_save(STREAM, 0, 256 * PAGE, data_len=1 << 31)
    with pytest.raises(ImageError, match="past end of file"):
        registry.open_image(write(tmp_path, data))
    data = libvirt_save(STREAM, 9, 256 * PAGE)
    with pytest.raises(ImageError, match="unknown save image format 9"):
        registry.open_image(write(tmp_path, data))
    data = libvirt_save(b"\0" * 100, 1, 256 * PAGE)
    with pytest.raises(ImageError, match="no gzip stream"):
        registry.open_image(write(tmp_path, data))


def test_sparse_mapped_ram_save(tmp_path: Path, read_gpa) -> None:
    head, start = libvirt_head(6, 4 * MIB, machine="pc-q35-9.2")
    stream = mapped_ram_stream([("pc.ram", 4 * MIB, {7: b"sparse page"})], prefix=start)
    with registry.open_image(write(tmp_path, head + stream)) as image:
        assert image.meta["compression"] == "sparse"
        assert image.meta["mapped_ram"] is True
        (seg,) = image.fixed_segments
        assert np.array_equal(seg.extents.file_offset, seg.extents.buf_offset)
        assert read_gpa(image, 7 * PAGE, 11) == b"sparse page"


def test_decompression_bomb_stops_bounded(tmp_path: Path) -> None:
    """A stream that declares 1 MiB of RAM then expands to ~100 MB of zero-page records."""
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", MIB)])
    w.page("pc.ram", 0, b"readable before the bomb")
    record = struct.pack(">Q", 0x22) + b"\0"  # ZERO|CONTINUE at offset 0, again and again
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    payload = comp.compress(bytes(w.out))
    chunk = record * (1 << 20)
    for _ in range(11):  # ~100 MB, past the 2 x 1 MiB + 80 MiB allowance
        payload += comp.compress(chunk)
    payload += comp.flush()
    data = libvirt_save(payload, 1, MIB)
    tracemalloc.start()
    with registry.open_image(write(tmp_path, data)) as image:
        got = []
        with pytest.raises(ImageError, match="decompression bomb"):
            for seg in image.segments():
                got.append(image.guest_bytes(seg.extents))
        assert sum(got) == PAGE  # the page before the bomb was scanned
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * MIB  # windows, not the whole expansion


@pytest.mark.parametrize("kind", ["lzop", "zstd"])
def test_without_binding_the_program_decompresses_with_a_remark(tmp_path: Path, monkeypatch,
                                                                read_gpa, kind: str) -> None:
    """Where the binding cannot load, the program libvirt itself uses reads the payload (and
    the image says so); where neither is there, a clear error names both."""
    fmt = {"lzop": 4, "zstd": 5}[kind]
    path = write(tmp_path, libvirt_save(COMPRESSORS[fmt](STREAM), fmt, 256 * PAGE))
    real = codecs.decoder_factory

    def no_binding(name: str):
        if name == kind:
            raise ImportError("hidden by the test")
        return real(name)

    monkeypatch.setattr(codecs, "decoder_factory", no_binding)
    if shutil.which(kind) is not None:
        with registry.open_image(path) as image:
            (remark,) = image.warnings
            assert isinstance(remark, Remark)
            assert f"with the {kind!r} program instead" in str(remark)
            assert read_gpa(image, 0xF000, 4) == b"last"
    monkeypatch.setattr(codecs.shutil, "which", lambda _: None)
    with pytest.raises(ImageError, match=f"cannot be loaded .*the {kind!r} program is not"):
        registry.open_image(path)


def test_lzop_and_zstd_saves_scan_with_only_the_venv_on_path(tmp_path: Path, vmleak) -> None:
    """A scan host without the lzop/zstd programs: the real lzop save (libvirt 9.0) and a
    written zstd save scan with PATH holding only the venv's bin/, with the same findings as
    with the programs on PATH, at the planted GPAs."""
    lzop_save = str(qemu_sample("libvirt-lzop.save", tmp_path))
    pan_page = b"card=4532015112830366;".ljust(64, b".")
    stream = ram_stream({0x3000: pan_page}, 64 * PAGE)
    zstd_save = write(tmp_path, libvirt_save(zstd_compress(stream, frames=3), 5, 64 * PAGE))
    bare = {"PATH": str(Path(sys.executable).parent)}
    runs = {}
    for name, env in (("bare", bare), ("full", None)):
        r = vmleak("scan", "--format", "jsonl", "--detectors", "pan", lzop_save, zstd_save,
                   env=env)
        assert r.returncode == 1, r.stderr
        runs[name] = sorted((x["image"], x["gpa"], x["fingerprint"])
                            for x in map(json.loads, r.stdout.splitlines()))
    assert runs["bare"] == runs["full"]
    plants = pan_gpas(QEMU_MANIFEST["libvirt-lzop.save"]["plants"])
    assert [g for img, g, _ in runs["bare"] if img == lzop_save] == plants
    assert [g for img, g, _ in runs["bare"] if img == zstd_save] == [0x3000 + 5]


# ---- robustness ---------------------------------------------------------------------------------

@settings(max_examples=30)
@given(fmt=st.sampled_from([0, 1, 2, 3, 4, 5]), frac=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3))
def test_truncated_or_corrupted_saves(tmp_path: Path, drain, fmt: int, frac: float,
                                      flips: list) -> None:
    full = libvirt_save(COMPRESSORS[fmt](STREAM), fmt, 256 * PAGE)
    data = bytearray(full[: int(len(full) * frac)])
    for f, x in flips:
        if data:
            data[int(f * (len(data) - 1))] ^= x
    drain(write(tmp_path, bytes(data), "h.save"), "libvirt-save")


@settings(max_examples=15)
@given(name=st.sampled_from(SAVES), frac=st.floats(0.0, 1.0), flip=st.floats(0, 1))
def test_truncated_or_corrupted_real_saves(tmp_path: Path, name: str, frac: float,
                                           flip: float, drain) -> None:
    real = qemu_sample(name, tmp_path).read_bytes()
    data = bytearray(real[: max(1, int(len(real) * frac))])
    data[int(flip * (len(data) - 1))] ^= 0x5A
    drain(write(tmp_path, bytes(data), "r.save"), "libvirt-save")


def test_hostile_domain_xml_is_a_warning(tmp_path: Path, read_gpa) -> None:
    head, start = libvirt_head(0, 256 * PAGE)
    xml_at = 92
    for bad in (b"<domain><name>x</name><memory>" + b"9" * 5000 + b"</memory></domain>\0",
                b"<?xml version='1.0' encoding='no-such'?><domain/>\0",
                b"<domain><name>unclosed</domain>\0"):
        data = bytearray(head + STREAM)
        data[xml_at : xml_at + len(bad)] = bad
        with registry.open_image(write(tmp_path, bytes(data))) as image:
            assert any("domain XML" in w.message for w in image.warnings)
            assert read_gpa(image, 0xF000, 4) == b"last"


def test_undecodable_record_in_a_compressed_stream(tmp_path: Path) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.page("pc.ram", 0, b"before the delta")
    at = len(w.out)
    w.xbzrle("pc.ram", PAGE)
    data = libvirt_save(gzip.compress(w.finish()), 1, 4 * PAGE)
    path = write(tmp_path, data)
    with registry.open_image(path) as image:  # opening reads only the metadata
        seen = []
        with pytest.raises(ImageError) as info:
            for seg in image.segments():
                seen.append(read_gpa_segment(seg, 0, 16))
    assert [s for s in seen if s is not None] == [b"before the delta"]
    assert f"gzip stream offset {at:#x}: XBZRLE" in str(info.value)
    assert str(info.value).startswith(path)


def read_gpa_segment(seg, gpa: int, n: int) -> bytes | None:
    e = seg.extents
    hit = np.flatnonzero((e.space == 0) & (e.addr <= gpa) & (e.addr + e.length > gpa))
    if not hit.size:
        return None
    i = int(hit[0])
    b = int(e.buf_offset[i]) + gpa - int(e.addr[i])
    return seg.data[b : b + n].tobytes()


def test_stored_pages_beside_zero_pages_leave_no_waiting_seams(tmp_path: Path, monkeypatch,
                                                               scan_result) -> None:
    """A compressed save is read in windows; a run of stored pages that borders a zero page
    needs no seam (its neighbour is known, and holds nothing). Such runs once each left
    edges waiting for partners that never came: ~60,000 per GiB of a memory-like guest, the
    waiting store filled to its limit (peak memory growing with the image) and most of the
    CPU time of a qcow2 vmstate went to them. Now only real seams wait: the ones where a
    window ends inside stored pages (a number straddling two windows is still found)."""
    from scanner import engine

    waiting = []
    keep = engine._Pending.keep

    def counted(self, tails, heads, sources) -> None:
        keep(self, tails, heads, sources)
        waiting.append(len(self.tails) + len(self.heads))

    monkeypatch.setattr(engine._Pending, "keep", counted)
    monkeypatch.setattr(libvirt.qemu, "WINDOW", 64 << 10)  # (+ 1 MiB of slack a window)
    ram = 32 * MIB
    # stored, zero, stored, zero ...: 1500 runs of stored pages over 6 windows
    pages = {2 * k * PAGE: b"data page %d" % k for k in range(1500)}
    line = b" card 5555555555554444 "
    top = 4000 * PAGE  # two stored pages, the number across them: in two windows
    pages[top], pages[top + PAGE] = bytes(PAGE - 10) + line[:10], line[10:]
    data = libvirt_save(gzip.compress(ram_stream(pages, ram), 1), 1, ram)
    result = scan_result(write(tmp_path, data), "pan")
    assert result.errors == [] and result.warnings == []
    assert [(f.gpa, f.masked) for f in result.findings] == [(top + PAGE - 4, "555555******4444")]
    # waiting: the few edges of the file's regions (header, padding ...) and a window's last
    # run; before, every run's (over 1,000 here after a few windows)
    assert len(waiting) >= 5 and max(waiting) < 16
