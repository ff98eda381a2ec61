"""kdump-compressed parser: real QEMU dumps (samples/dumps) and written variants."""

from __future__ import annotations

import builtins
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import kdump, registry
from parsers.base import ImageError, is_damage
from tests.dumpwriter import Kdump, assemble_kdump, elf_note, flatten, write_kdump
from tests.samples import dump_entry, dump_sample, dumps_of, planted_pans

PAGE = 4096


def problems(image, errors: list) -> str:
    """Every problem of a read: the error the stream raised at its end, then the warnings."""
    return " | ".join(str(e) for e in errors + image.warnings)


def scan_all(image) -> None:
    """Walk every segment and check its extents lie inside its buffer."""
    for seg in image.segments():
        ext = seg.extents
        assert (ext.buf_offset >= 0).all()
        assert (ext.buf_offset + ext.length <= seg.data.size).all()


@pytest.mark.parametrize("entry", dumps_of("kdump"), ids=lambda d: d["file"])
def test_real_qemu_kdump_planted_values_at_their_gpas(entry: dict, tmp_path: Path,
                                                      read_ranges) -> None:
    path = dump_sample(entry["file"], tmp_path)
    with registry.open_image(str(path)) as image:
        assert image.format == "kdump" and not image.random_access
        assert image.meta["compression"] == "zlib"
        assert image.meta["ram_size"] >= 64 << 20
        assert ("container" in image.meta) == entry["file"].endswith(".flat.gz")
        plants = entry["plants"]
        got = read_ranges(image, [(p["gpa"], len(p["hex"]) // 2) for p in plants])
        for p, data in zip(plants, got, strict=True):
            assert data == bytes.fromhex(p["hex"]), p["name"]
        assert not [w for w in image.warnings if is_damage(w)]


def test_long_raw_runs_are_zero_copy_views(tmp_path: Path) -> None:
    """40 incompressible pages stored back to back come as one zero-copy view of exactly
    their bytes in the file (not the compressed bytes around them); an isolated raw page
    is copied into a window."""
    import random

    rnd = random.Random(11)
    pages = {pfn: rnd.randbytes(PAGE) for pfn in range(100, 140)}
    pages[150] = rnd.randbytes(PAGE)
    pages[145] = b"compressible".ljust(PAGE, b"c")  # stored between 139 and 150
    path = tmp_path / "dump"
    write_kdump(str(path), pages, Kdump(codec="zlib"))
    raw = path.read_bytes()
    with registry.open_image(str(path)) as image:
        segs = [(s.reused, s.data.size, s.extents) for s in image.segments()
                if image.guest_bytes(s.extents)]  # the header's regions aside
    mapped = [(size, e) for reused, size, e in segs if not reused]
    assert len(mapped) == 1
    size, ext = mapped[0]
    assert size == 40 * PAGE == ext.total() and len(ext) == 1
    fo = int(ext.file_offset[0])
    assert raw[fo : fo + size] == b"".join(pages[p] for p in range(100, 140))
    assert int(ext.addr[0]) == 100 * PAGE
    windowed = sum(e.total() for reused, _, e in segs if reused)
    assert windowed == 2 * PAGE  # pages 145 and 150


def pages_for_test() -> dict[int, bytes]:
    """PFN -> page: text pages (compressible), a random page (stored raw), zero pages."""
    import random

    rnd = random.Random(7)
    pages = {pfn: bytes(PAGE) for pfn in range(0, 64)}
    pages[3] = b"card 4111111111111111 ".ljust(PAGE, b".")
    pages[4] = b"x" * (PAGE - 8) + b"40128888"
    pages[5] = b"88881881" + b"y" * (PAGE - 8)
    pages[40] = rnd.randbytes(PAGE)
    pages[100] = b"far page".ljust(PAGE, b"-")
    return pages


@pytest.mark.parametrize("codec", ["zlib", "lzo", "snappy", "zstd", "none"])
@pytest.mark.parametrize("bits,order", [(64, "<"), (32, "<"), (64, ">"), (32, ">")])
@pytest.mark.parametrize("flat", [False, True])
def test_written_codecs_layouts(tmp_path: Path, codec: str, bits: int, order: str, flat: bool,
                                read_ranges):
    if codec == "lzo":
        pytest.importorskip("lzokay", reason="LZO pages need the lzokay package")
    if codec in ("snappy", "zstd"):
        pytest.importorskip("cramjam", reason="snappy/zstd pages need the cramjam package")
    pages = pages_for_test()
    path = tmp_path / "dump"
    machine = b"i686" if bits == 32 else b"x86_64"
    write_kdump(str(path), pages, Kdump(bits=bits, order=order, codec=codec, machine=machine),
                flat=flat, chunk=5000, shuffle=3 if flat else None)  # fmt: skip
    with registry.open_image(str(path)) as image:
        assert image.meta["guest_bits"] == bits
        assert image.meta["byte_order"] == ("little" if order == "<" else "big")
        assert image.meta["pages_stored"] == len(pages)
        want = sorted(pfn for pfn, page in pages.items() if any(page))
        got = read_ranges(image, [(pfn * PAGE, PAGE) for pfn in want])
        assert got == [pages[pfn] for pfn in want]
        assert not [w for w in image.warnings if is_damage(w)]


def test_zero_pages_share_one_stored_page_and_are_skipped(tmp_path: Path) -> None:
    pages = {pfn: bytes(PAGE) for pfn in range(2000)}
    pages[1500] = b"z".ljust(PAGE, b"!")
    path = tmp_path / "dump"
    write_kdump(str(path), pages)
    with registry.open_image(str(path)) as image:
        rows = sum(len(s.extents) for s in image.segments())
    assert rows <= 3  # not one extent per zero page


def test_metadata_from_sub_header(tmp_path: Path) -> None:
    notes = elf_note(b"CORE", 1, bytes(336)) * 3
    opt = Kdump(vmcoreinfo=b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n", notes=notes)
    path = tmp_path / "dump"
    write_kdump(str(path), pages_for_test(), opt)
    with registry.open_image(str(path)) as image:
        assert image.meta["guest_os_release"] == "6.1.0-test"
        assert image.meta["vcpus"] == 3
        assert image.meta["utsname_release"] == "6.1.0-test"


def test_flattened_overwrites_last_writer_wins(tmp_path: Path, read_ranges) -> None:
    pages = pages_for_test()
    path = tmp_path / "dump"
    write_kdump(str(path), pages, flat=True, chunk=3000, overwrite=True)
    with registry.open_image(str(path)) as image:
        assert read_ranges(image, [(3 * PAGE, PAGE)]) == [pages[3]]
        assert not [w for w in image.warnings if is_damage(w)]


def test_incomplete_dump_lost_pages_reported(tmp_path: Path, read_ranges) -> None:
    pages = pages_for_test()
    path = tmp_path / "dump"
    write_kdump(str(path), pages, Kdump(lost={4, 5}, incomplete=True))
    errors: list = []
    with registry.open_image(str(path)) as image:
        got = read_ranges(image, [(3 * PAGE, PAGE), (4 * PAGE, PAGE)], errors=errors)
        text = problems(image, errors)
    assert got == [pages[3], None]
    assert len(errors) == 1 and "2 page(s) lost" in str(errors[0])
    assert str(errors[0]).startswith(f"{path} at offset 0x")  # the first lost descriptor
    assert "marked incomplete" in text


def test_missing_codec_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    read_ranges) -> None:
    pytest.importorskip("cramjam", reason="writing snappy pages needs cramjam")
    pages = pages_for_test()
    path = tmp_path / "dump"
    write_kdump(str(path), pages, Kdump(codec="snappy"))
    real_import = builtins.__import__

    def no_cramjam(name, *args, **kwargs):
        if name == "cramjam":
            raise ImportError("hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cramjam)
    errors: list = []
    with registry.open_image(str(path)) as image:
        got = read_ranges(image, [(40 * PAGE, PAGE), (3 * PAGE, PAGE)], errors=errors)
        text = problems(image, errors)
    assert got == [pages[40], None]  # the raw page is still read
    assert "snappy not readable" in text and "cramjam" in text


def test_page_expanding_past_block_is_rejected(tmp_path: Path, read_ranges) -> None:
    pages = pages_for_test()
    blob = bytearray(assemble_kdump(pages, Kdump()))
    bomb = zlib.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KiB
    # Point the descriptor of PFN 3 (the 4th stored page) at the bomb appended to the file.
    desc_at = (1 + 1 + 2) * PAGE + 3 * 24
    struct.pack_into("<QII", blob, desc_at, len(blob), len(bomb) if len(bomb) < PAGE else 4000,
                     1)  # fmt: skip
    blob += bomb
    path = tmp_path / "dump"
    path.write_bytes(bytes(blob))
    tracemalloc.start()
    errors: list = []
    with registry.open_image(str(path)) as image:
        got = read_ranges(image, [(3 * PAGE, PAGE), (100 * PAGE, PAGE)], errors=errors)
        text = problems(image, errors)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [None, pages[100]]
    assert "does not decode to one page" in text
    assert peak < 32 << 20


def test_absurd_header_sizes(tmp_path: Path) -> None:
    blob = bytearray(assemble_kdump(pages_for_test(), Kdump()))
    struct.pack_into("<I", blob, 0x1B4, 0x7FFFFFFF)  # bitmap_blocks: 8 TiB of bitmaps
    path = tmp_path / "dump"
    path.write_bytes(bytes(blob))
    with pytest.raises(ImageError, match="bitmaps take") as err:
        kdump.open_image(str(path), "kdump", {})
    assert str(err.value).startswith(str(path))


def test_truncated_descriptors_and_data(tmp_path: Path) -> None:
    pages = pages_for_test()
    full = assemble_kdump(pages, Kdump())
    desc_at = (1 + 1 + 2) * PAGE
    path = tmp_path / "dump"
    path.write_bytes(full[: desc_at + 24 * 10])  # 10 of 65 descriptors, no page data
    with registry.open_image(str(path)) as image:
        with pytest.raises(ImageError) as err:
            scan_all(image)
        text = problems(image, [err.value])
    assert "55 page(s) without a page descriptor" in text
    assert "past the end of the file" in text


@settings(max_examples=80)
@given(data=st.data(), flat=st.booleans())
def test_corrupted_dumps_fail_cleanly(tmp_path: Path, data: st.DataObject, flat: bool,
                                      drain) -> None:
    blob = bytearray(assemble_kdump(pages_for_test(), Kdump()))
    regions = [(0, 0x1E0), (PAGE, PAGE + 0x70), (2 * PAGE, 4 * PAGE), (4 * PAGE, 4 * PAGE + 1600)]
    for _ in range(data.draw(st.integers(0, 6))):
        lo, hi = data.draw(st.sampled_from(regions))
        pos = data.draw(st.integers(lo, hi - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if flat:
        blob = bytearray(flatten(bytes(blob), chunk=3000))
        for _ in range(data.draw(st.integers(0, 3))):
            pos = data.draw(st.integers(4096, len(blob) - 1))
            blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    path = tmp_path / "fuzzed"
    path.write_bytes(bytes(blob[:cut]))
    drain(str(path), "kdump", peak=96 << 20)


@pytest.mark.parametrize("entry", dumps_of("kdump"), ids=lambda d: d["file"])
def test_scan_real_kdump_finds_planted_pans_once(entry: dict, tmp_path: Path, scan) -> None:
    path = dump_sample(entry["file"], tmp_path)
    found = [(f.gpa, f.encoding) for f in scan(str(path), chunk_size=64 * 1024)]
    assert sorted(found) == sorted(planted_pans(entry["plants"]))


@pytest.mark.parametrize("codec", ["zlib", "none"])
def test_scan_pan_straddling_raw_and_compressed_pages(tmp_path: Path, codec: str, scan) -> None:
    """PFN 4 ends with '40128888' and PFN 5 starts with '88881881': one PAN across a page
    seam, found once at its GPA whether the pages come from windows or the mmap."""
    path = tmp_path / "dump"
    write_kdump(str(path), pages_for_test(), Kdump(codec=codec))
    found = sorted((f.gpa, f.encoding) for f in scan(str(path), chunk_size=64 * 1024))
    assert found == [(3 * PAGE + 5, "ascii"), (5 * PAGE - 8, "ascii")]


@settings(max_examples=60)
@given(
    records=st.lists(
        st.tuples(st.integers(0, 300), st.binary(min_size=0, max_size=80)),
        min_size=1,
        max_size=25,
    )
)
def test_flattened_interval_map_equals_naive_reassembly(records: list) -> None:
    """Any records, overlapping or not: the interval map reads what writing the records in
    order into one buffer gives (last writer wins), and says 'missing' for holes."""
    want: list[int | None] = [None] * 400
    for off, data in records:
        for k, b in enumerate(data):
            want[off + k] = b
    blob = b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    blob = blob.ljust(4096, b"\0")
    for off, data in records:
        blob += struct.pack(">qq", off, len(data)) + data
    blob += struct.pack(">qq", -1, -1)
    import tempfile

    with tempfile.NamedTemporaryFile() as fh:
        fh.write(blob)
        fh.flush()
        if not any(data for _, data in records):
            with pytest.raises(ImageError, match="no data"):
                kdump.open_image(fh.name, "kdump", {})
            return
        ev = kdump.Evidence(fh.name)
        src = kdump._Flat(ev, fh.name, kdump.MemoryImage(path=fh.name, format="kdump"))
        for lo in range(0, 400, 7):
            for n in (1, 9, 40):
                piece = want[lo : lo + n]
                if lo + n > 400 or None in piece:
                    with pytest.raises(ImageError):
                        src.view(lo, n, "test")
                else:
                    assert src.view(lo, n, "test").tobytes() == bytes(piece)


def test_cli_truncated_real_dump_reports_what_was_readable_and_exits_2(tmp_path: Path,
                                                                       vmleak) -> None:
    entry = dump_entry("pc-64M.kdump-zlib.gz")
    path = dump_sample(entry["file"], tmp_path)
    path.write_bytes(path.read_bytes()[:-30000])  # the tail of the page data is cut off
    run = vmleak("scan", "--format", "jsonl", str(path))
    assert run.returncode == 2
    gpas = sorted(json.loads(line)["gpa"] for line in run.stdout.splitlines())
    assert gpas == sorted(g for g, _ in planted_pans(entry["plants"]))
    errors = [ln for ln in run.stderr.splitlines() if str(path) in ln]
    # the cause, then what it cost against the 1st bitmap (contract 4)
    assert len(errors) == 2 and f"{path} at offset 0x" in errors[0] and "truncated" in errors[0]
    assert "guest memory missing" in errors[1] and "67,371,008 bytes" in errors[1]


@pytest.mark.parametrize("flat", [False, True])
def test_tiny_batches_runs_and_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       flat: bool, read_ranges) -> None:  # fmt: skip
    """Runs of raw pages crossing batch boundaries, longer than a segment, windows of 3 pages:
    every page still read once, from the right place."""
    import random

    monkeypatch.setattr(kdump, "BATCH_BYTES", 2)  # 16 PFNs per batch
    monkeypatch.setattr(kdump, "MIN_RUN", 3)
    monkeypatch.setattr(kdump, "MAX_RUN", 5)
    monkeypatch.setattr(kdump, "WINDOW_BYTES", 3 * PAGE)
    rnd = random.Random(4)
    pages = {}
    for pfn in range(90):
        kind = rnd.choice(["zero", "raw", "raw", "text"])
        pages[pfn] = {
            "zero": bytes(PAGE),
            "raw": rnd.randbytes(PAGE),
            "text": f"page {pfn} ".encode().ljust(PAGE, b"t"),
        }[kind]
    path = tmp_path / "dump"
    write_kdump(str(path), pages, flat=flat, chunk=65536)  # records hold whole runs
    with registry.open_image(str(path)) as image:
        got = read_ranges(image, [(p * PAGE, PAGE) for p in range(90)])
        segs = [(s.reused, len(s.extents), s.data.size) for s in image.segments()]
    assert got == [pages[p] if any(pages[p]) else None for p in range(90)]
    assert any(not reused for reused, _, _ in segs)
    assert all(size <= 5 * PAGE for reused, _, size in segs if not reused)


@settings(max_examples=60)
@given(data=st.data(), codec=st.sampled_from(["zlib", "lzo", "snappy", "zstd"]))
def test_corrupted_compressed_pages_fail_cleanly(
    tmp_path: Path, data: st.DataObject, codec: str, read_ranges
) -> None:
    """Garbage inside compressed page data: each codec's errors become 'does not decode'
    problems (an ImageError at the end of the stream), never another exception."""
    pytest.importorskip("lzokay" if codec == "lzo" else "cramjam", reason=f"{codec} codec")
    opt = Kdump(codec=codec)
    pages = pages_for_test()
    blob = bytearray(assemble_kdump(pages, opt))
    data_at = (1 + 1 + 2) * PAGE + 24 * len(pages)
    for _ in range(data.draw(st.integers(1, 12))):
        pos = data.draw(st.integers(data_at, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzzed"
    path.write_bytes(bytes(blob))
    errors: list = []
    with kdump.open_image(str(path), "kdump", {}) as image:
        read_ranges(image, [(100 * PAGE, PAGE)], errors=errors)
    for err in errors:
        assert str(err).startswith(str(path)) and "page(s)" in str(err)


def test_real_i386_guest_kdump_has_64bit_layout_despite_i686(tmp_path: Path) -> None:
    entry = dump_entry("i386-pc-64M.kdump-zlib.flat.gz")
    path = dump_sample(entry["file"], tmp_path)
    with registry.open_image(str(path)) as image:
        assert image.meta["utsname_machine"] == "i686"
        assert image.meta["guest_bits"] == 64  # what QEMU 7.2 writes
        assert image.meta["ram_size"] >= 64 << 20
