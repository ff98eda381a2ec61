"""QEMU migration streams: real streams written by qemu-system-x86_64 7.2 (samples/qemu,
made by samples/gen_qemu.py), streams written by tests/qemu_writer.py for what QEMU 7.2 does
not write (mapped-ram, ARM page-bits, x-ignore-shared, XBZRLE, hostile input), the
RAMBlock -> GPA rules, a volatility3 cross-check and hypothesis robustness."""

from __future__ import annotations

import mmap
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import qemu, qemu_gpa, registry
from parsers.base import ImageError
from tests.qemu_writer import F_XBZRLE, MIB, PAGE, Qevm, mapped_ram_stream, ram_stream
from tests.samples import QEMU_MANIFEST, pan_gpas, qemu_sample

GIB = 1 << 30
STREAMS = sorted(k for k, v in QEMU_MANIFEST.items() if v["kind"] == "qemu-migration")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qemu-samples")


def write(tmp_path: Path, data: bytes, name: str = "s.qevm") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# ---- real QEMU streams ------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_real_stream_plants_at_their_gpas(unpacked: Path, name: str, read_gpa) -> None:
    entry = QEMU_MANIFEST[name]
    with registry.open_image(str(qemu_sample(name, unpacked))) as image:
        assert image.format == "qemu-migration"
        family = {"pc": "pc-i440fx-", "q35": "pc-q35-", "virt": "virt-"}[entry["machine"]]
        assert image.meta["machine"].startswith(family)
        assert image.meta["ram_size"] == entry["ram_size"]
        assert image.meta["vmdesc"]["devices"] > 10
        assert not image.warnings
        for plant in entry["plants"]:
            assert read_gpa(image, plant["gpa"], len(plant["text"])) == plant["text"].encode()


@pytest.mark.parametrize("name", STREAMS)
def test_real_stream_scan_finds_each_pan_once_at_its_gpa(unpacked: Path, name: str, scan) -> None:
    with registry.open_image(str(qemu_sample(name, unpacked))) as image:
        found = scan(image)
    assert [f.gpa for f in found] == pan_gpas(QEMU_MANIFEST[name]["plants"])


def test_raw_stream_is_scanned_in_place(unpacked: Path) -> None:
    path = qemu_sample("pc-64m.qevm", unpacked)
    raw = path.read_bytes()
    with registry.open_image(str(path)) as image:
        (seg,) = image.fixed_segments
        base = seg.data
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        assert isinstance(base, mmap.mmap)  # the file's mapping, not a copy
        e = seg.extents
        assert np.array_equal(e.file_offset, e.buf_offset)
        guest = np.array([image.is_guest_space(int(x)) for x in e.space], bool)
        assert np.all(e.length[guest] % PAGE == 0)
        pages = image.meta["pages"]
        # every PAGE record's payload is a guest extent; the rest of the file outside them is
        # in region:* extents or decoded structure (record headers), nothing unaccounted for
        assert int(e.length[guest].sum()) == pages * PAGE
        cov = image.coverage
        assert int(e.length[~guest].sum()) == cov.outside
        assert int(e.length.sum()) + cov.structure == len(raw)
        assert cov.declared == cov.read == sum(b["size"] for b in image.meta["blocks"])
    plant = QEMU_MANIFEST["pc-64m.qevm"]["plants"][0]
    assert plant["text"].encode() in raw


def test_content_above_4gib_both_machines(unpacked: Path, read_gpa) -> None:
    for name, split in (("pc-5g.qevm.xz", 3 * GIB), ("q35-5g.qevm.xz", 2 * GIB)):
        with registry.open_image(str(qemu_sample(name, unpacked))) as image:
            (ram,) = [b for b in image.meta["blocks"] if b["name"] == "pc.ram"]
            assert ram["gpa"] == [[0, 0, split], [split, 4 * GIB, 5 * GIB - split]]
            high = [p for p in QEMU_MANIFEST[name]["plants"] if p["gpa"] >= 4 * GIB]
            assert len(high) == 2
            for p in high:
                assert read_gpa(image, p["gpa"], len(p["text"])) == p["text"].encode()
            # The same bytes are NOT at the block offset (identity mapping would be wrong).
            off = high[0]["gpa"] - 4 * GIB + split
            assert read_gpa(image, off, len(high[0]["text"])) != high[0]["text"].encode()


def test_zlib_compressed_pages(unpacked: Path) -> None:
    with registry.open_image(str(qemu_sample("q35-64m-compress.qevm.xz", unpacked))) as image:
        assert image.meta["compressed_pages"] > 0
        assert not image.random_access  # inflated pages come as windows after the mapping
        segs = list(image.segments())
        assert segs[0].reused is False and all(s.reused for s in segs[1:])


def test_numa_nodes_are_packed_in_node_order(unpacked: Path) -> None:
    with registry.open_image(str(qemu_sample("q35-numa.qevm.xz", unpacked))) as image:
        gpa = {b["name"]: b["gpa"] for b in image.meta["blocks"]}
    assert "pc.ram" not in gpa
    assert gpa["ram-node0"] == [[0, 0, 32 * MIB]]
    assert gpa["ram-node1"] == [[0, 32 * MIB, 32 * MIB]]


def test_other_blocks_get_named_spaces(unpacked: Path, read_gpa) -> None:
    with registry.open_image(str(qemu_sample("pc-64m.qevm", unpacked))) as image:
        names = {b["name"]: b["gpa"] for b in image.meta["blocks"]}
        assert names["pc.bios"] is None
        space = image.spaces.index("block:pc.bios")
        # SeaBIOS ends with its reset vector jump in the last 16 bytes of pc.bios.
        tail = read_gpa(image, 256 * 1024 - 16, 16, space=space)
        assert tail[0] == 0xEA  # ljmp


def test_volatility3_reads_the_same_bytes(unpacked: Path, read_gpa, vol3) -> None:
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical
    from volatility3.framework.layers import qemu as vqemu

    for name in ("pc-64m.qevm", "pc-5g.qevm.xz"):
        path = qemu_sample(name, unpacked)
        ctx = contexts.Context()
        ctx.config["base.location"] = path.as_uri()
        ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
        ctx.config["top.base_layer"] = "base"
        layer = vqemu.QemuSuspendLayer(ctx, "top", "top")
        ctx.layers.add_layer(layer)
        rng = random.Random(7)
        ram = QEMU_MANIFEST[name]["ram_size"]
        low = min(ram, 3 * GIB)
        gpas = [p["gpa"] for p in QEMU_MANIFEST[name]["plants"]]
        gpas += [rng.randrange(0, low - 256) for _ in range(40)]
        gpas += [0x200000 - 40, 0xF0000, low - 4096]
        if ram > 4 * GIB:
            gpas += [4 * GIB, 4 * GIB + rng.randrange(0, 2 * GIB - 256)]
        with registry.open_image(str(path)) as image:
            for g in gpas:
                theirs = layer.read(g, 96, pad=True)
                assert read_gpa(image, g, 96) == theirs, hex(g)


# ---- GPA layout rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine, ram, below",
    [
        ("pc-i440fx-7.2", 4 * GIB, 3 * GIB),  # QEMU's own example: -M pc -m 4G
        ("pc-1.7", 4 * GIB, 3584 * MIB),  # no gigabyte alignment before 2.0
        ("pc-i440fx-7.2", 3 * GIB + 256 * MIB, 3 * GIB + 256 * MIB),  # < 3.5 GiB: no split
        ("pc-i440fx-7.2", 3584 * MIB, 3 * GIB),  # exactly 3.5 GiB splits at 3 GiB
        ("pc-q35-7.2", 2816 * MIB, 2 * GIB),  # >= 2.75 GiB: 2 GiB below
        ("pc-q35-7.2", 2815 * MIB, 2815 * MIB),
        ("pc-q35-1.7", 3 * GIB, 2816 * MIB),  # old q35: 2.75 GiB below
        ("pc-q35-rhel9.4.0", 8 * GIB, 2 * GIB),
        ("q35", 8 * GIB, 2 * GIB),
        ("pc", 8 * GIB, 3 * GIB),
    ],
)
def test_x86_split(machine: str, ram: int, below: int) -> None:
    lay = qemu_gpa.layout(machine, [("pc.ram", ram), ("vga.vram", 16 * MIB)])
    pieces = lay.pieces["pc.ram"]
    assert pieces[0] == qemu_gpa.Piece(0, below, 0)
    if ram > below:
        assert pieces[1] == qemu_gpa.Piece(below, ram - below, 4 * GIB)
    else:
        assert len(pieces) == 1
    assert "vga.vram" not in lay.pieces


def test_max_ram_below_4g_option() -> None:
    lay = qemu_gpa.layout("pc-i440fx-7.2", [("pc.ram", 4 * GIB)], max_ram_below_4g=2 * GIB)
    assert lay.pieces["pc.ram"] == [
        qemu_gpa.Piece(0, 2 * GIB, 0), qemu_gpa.Piece(2 * GIB, 2 * GIB, 4 * GIB)
    ]


def test_arm_virt_and_unknown_machines() -> None:
    lay = qemu_gpa.layout("virt-7.2", [("mach-virt.ram", 8 * GIB)])
    assert lay.pieces["mach-virt.ram"] == [qemu_gpa.Piece(0, 8 * GIB, 1 * GIB)]
    lay = qemu_gpa.layout("s390-ccw-virtio-7.2", [("s390.ram", GIB)])
    assert lay.pieces == {} and lay.notes


def test_numa_split_crosses_into_the_second_node() -> None:
    blocks = [("ram-node1", 2 * GIB), ("ram-node0", 2 * GIB)]  # listed out of order
    lay = qemu_gpa.layout("pc-q35-8.2", blocks)
    assert lay.pieces["ram-node0"] == [qemu_gpa.Piece(0, 2 * GIB, 0)]
    assert lay.pieces["ram-node1"] == [qemu_gpa.Piece(0, 2 * GIB, 4 * GIB)]
    lay = qemu_gpa.layout("pc-i440fx-8.2", blocks)
    assert lay.pieces["ram-node1"] == [
        qemu_gpa.Piece(0, GIB, 2 * GIB), qemu_gpa.Piece(GIB, GIB, 4 * GIB)
    ]


# ---- written streams: what QEMU 7.2 does not write here ----------------------------------------


def test_continue_across_sections_fill_pages_flush_hook_and_extra_blocks(tmp_path: Path,
                                                                         read_gpa) -> None:
    pages = {0: b"first page", 0x3000: b"a" * PAGE, 0x7000: b"tail of RAM"}
    vga = ("0000:00:02.0/vga.vram", 4 * PAGE, {PAGE: b"vga text"})
    data = ram_stream(pages, 8 * PAGE, extra_blocks=(vga,))
    with registry.open_image(write(tmp_path, data)) as image:
        for off, content in pages.items():
            assert read_gpa(image, off, len(content)) == content
        space = image.spaces.index("block:0000:00:02.0/vga.vram")
        assert read_gpa(image, PAGE, 8, space=space) == b"vga text"
        assert read_gpa(image, PAGE, 8) != b"vga text"
        assert image.meta["pages"] == 4 and image.meta["zero_pages"] == 5


def test_arm_page_bits_subsection_uuid_and_ignore_shared(tmp_path: Path, read_gpa) -> None:
    uuid = bytes(range(16))
    data = ram_stream(
        {0x2000: b"arm guest"}, 4 * PAGE, machine="virt-9.0", block="mach-virt.ram",
        page_bits_subsection=True, capabilities=("x-ignore-shared",), uuid=uuid,
    )
    with registry.open_image(write(tmp_path, data)) as image:
        assert read_gpa(image, GIB + 0x2000, 9) == b"arm guest"
        assert image.meta["capabilities"] == ["x-ignore-shared"]
        assert image.meta["stream_uuid"] == "00010203-0405-0607-0809-0a0b0c0d0e0f"
        assert image.meta["page_size"] == PAGE


def test_1k_target_pages(tmp_path: Path, read_gpa) -> None:
    data = ram_stream({0x400: b"small pages"}, 8 * 1024, machine="virt-2.12",
                      block="mach-virt.ram", page_size=1024, page_bits_subsection=True)
    with registry.open_image(write(tmp_path, data)) as image:
        assert read_gpa(image, GIB + 0x400, 11) == b"small pages"


def test_no_configuration_section_uses_the_machine_option(tmp_path: Path, read_gpa) -> None:
    data = ram_stream({0x1000: b"old stream"}, 4 * PAGE, machine=None, footers=False)
    with registry.open_image(write(tmp_path, data)) as image:
        assert read_gpa(image, 0x1000, 10) == bytes(10)  # no GPA without a machine type
        space = image.spaces.index("block:pc.ram")
        assert read_gpa(image, 0x1000, 10, space=space) == b"old stream"
    image = qemu.open_image(write(tmp_path, data), "qemu-migration", {"machine": "pc-1.0"})
    assert read_gpa(image, 0x1000, 10) == b"old stream"


def test_xbzrle_is_a_clear_error_after_the_readable_pages(tmp_path: Path, read_gpa) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.page("pc.ram", 0, b"before the delta")
    at = len(w.out)
    w.xbzrle("pc.ram", PAGE)
    w.eos()
    data = w.finish()
    with registry.open_image(write(tmp_path, data)) as image:
        err, loss = image.warnings  # the cause, then what it cost against the block list
        assert err.offset == at and "XBZRLE" in err.message
        assert "declares 16,384 bytes, 4,096 bytes read" in loss.message
        assert read_gpa(image, 0, 16) == b"before the delta"


def test_unknown_flags_and_sections_are_errors(tmp_path: Path) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.word(0, 0x400 | F_XBZRLE)
    with registry.open_image(write(tmp_path, bytes(w.out))) as image:
        assert "unknown ram record flags" in image.warnings[0].message
    w = Qevm()
    w.start("block", version=1)
    with pytest.raises(ImageError, match="iterative section 'block'"):
        registry.open_image(write(tmp_path, bytes(w.out)))
    with pytest.raises(ImageError, match="not a QEMU migration stream"):
        qemu.open_image(write(tmp_path, b"QEVM\0\0\0\2" + bytes(64)), "qemu-migration", {})


def test_mapped_ram_file_is_mapped_in_place(tmp_path: Path, read_gpa) -> None:
    ram = 8 * MIB
    pages = {0: b"page zero", 5: b"x" * PAGE, 2047: b"last page"}
    vga = {1: b"mapped vga"}
    data = mapped_ram_stream([("pc.ram", ram, pages), ("vga.vram", MIB, vga)])
    path = write(tmp_path, data)
    with registry.open_image(path) as image:
        assert image.meta["mapped_ram"] is True
        (seg,) = image.fixed_segments
        e = seg.extents
        assert np.array_equal(e.file_offset, e.buf_offset)
        assert image.guest_bytes(e) == 4 * PAGE  # only pages whose bitmap bit is set
        for i, content in pages.items():
            assert read_gpa(image, i * PAGE, len(content)) == content
        space = image.spaces.index("block:vga.vram")
        assert read_gpa(image, PAGE, 10, space=space) == b"mapped vga"
        assert image.meta["vmdesc"]["devices"] == 1


def test_mapped_ram_empty_bitmap_scans_the_whole_area(tmp_path: Path, read_gpa) -> None:
    data = mapped_ram_stream([("pc.ram", MIB, {3: b"unflagged"})], empty_bitmap=True)
    with registry.open_image(write(tmp_path, data)) as image:
        assert any("empty page bitmap" in w.message for w in image.warnings)
        assert read_gpa(image, 3 * PAGE, 9) == b"unflagged"


def test_mapped_ram_offsets_outside_the_file(tmp_path: Path) -> None:
    data = mapped_ram_stream([("pc.ram", MIB, {0: b"x"})])
    cut = data[: len(data) // 2]
    with pytest.raises(ImageError, match="mapped-ram"):
        registry.open_image(write(tmp_path, cut))


def test_written_stream_scan_finds_straddling_pan_once(tmp_path: Path, scan) -> None:
    pan = b"4532015112830366"
    pages = {0x1000: b"\0" * (PAGE - 8) + pan[:8], 0x2000: pan[8:] + b" end"}
    data = ram_stream(pages, 16 * PAGE)
    with registry.open_image(write(tmp_path, data)) as image:
        found = scan(image)
    assert [f.gpa for f in found] == [0x2000 - 8]


# ---- robustness ---------------------------------------------------------------------------------

SMALL = ram_stream({0: b"p" * 100, 0x3000: b"q" * 100}, 8 * PAGE,
                   extra_blocks=(("pc.rom", 2 * PAGE, {0: b"rom"}),))


@settings(max_examples=60)
@given(cut=st.integers(0, len(SMALL)), flips=st.lists(
    st.tuples(st.integers(0, len(SMALL) - 1), st.integers(1, 255)), max_size=4))
def test_truncated_or_corrupted_written_stream(tmp_path: Path, cut: int, flips: list,
                                               drain) -> None:
    data = bytearray(SMALL[:cut])
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    drain(write(tmp_path, bytes(data), "h.qevm"), "qemu-migration")


@settings(max_examples=25)
@given(frac=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                            max_size=3))
def test_truncated_or_corrupted_real_stream(tmp_path: Path, frac: float, flips: list,
                                            drain) -> None:
    real = (qemu_sample("pc-64m.qevm", tmp_path)).read_bytes()
    data = bytearray(real[: int(len(real) * frac)])
    for f, x in flips:
        if data:
            data[int(f * (len(data) - 1))] ^= x
    drain(write(tmp_path, bytes(data), "r.qevm"), "qemu-migration")


def test_absurd_sizes_do_not_allocate(tmp_path: Path, read_gpa) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 1 << 50)])  # a petabyte block, declared
    w.eos()
    w.part()
    w.zero("pc.ram", (1 << 50) - PAGE)
    w.page("pc.ram", 0, b"tiny")
    w.eos()
    data = w.finish()
    tracemalloc.start()
    with registry.open_image(write(tmp_path, data)) as image:
        assert read_gpa(image, 0, 4) == b"tiny"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * MIB


def test_real_arm_stream_page_bits_and_ram_base(unpacked: Path, read_gpa) -> None:
    name = "arm-virt-64m.qevm.xz"
    if name not in QEMU_MANIFEST:
        pytest.skip("no ARM fixture (samples/gen_qemu.py needs qemu-system-aarch64)")
    with registry.open_image(str(qemu_sample(name, unpacked))) as image:
        assert image.meta["page_size"] == PAGE  # from configuration/target-page-bits
        (ram,) = [b for b in image.meta["blocks"] if b["name"] == "mach-virt.ram"]
        assert ram["gpa"] == [[0, GIB, 64 * MIB]]
        assert read_gpa(image, 0x100123, 8) == bytes(8)  # nothing below the RAM base


@settings(max_examples=15)
@given(frac=st.floats(0.02, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                               min_size=1, max_size=3))
def test_corrupted_compressed_page_stream(unpacked: Path, tmp_path: Path, frac: float,
                                          flips: list, drain) -> None:
    real = qemu_sample("q35-64m-compress.qevm.xz", unpacked).read_bytes()
    data = bytearray(real[: int(len(real) * frac)])
    for f, x in flips:
        data[int(f * (len(data) - 1))] ^= x
    drain(write(tmp_path, bytes(data), "c.qevm"), "qemu-migration")


def test_corrupt_zlib_page_is_an_error_naming_its_offset(tmp_path: Path) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.compressed("pc.ram", 0, b"good page")
    bad_at = len(w.out) + 8 + 4  # payload of the next record: word, be32 length, zlib data
    w.compressed("pc.ram", PAGE, b"bad page")
    w.eos()
    data = bytearray(w.finish())
    data[bad_at + 2 : bad_at + 6] = b"\xff\xff\xff\xff"
    with registry.open_image(write(tmp_path, bytes(data))) as image:
        with pytest.raises(ImageError) as info:
            list(image.segments())
    assert info.value.offset == bad_at


def test_pages_beyond_their_block_are_dropped_with_a_warning(tmp_path: Path, read_gpa) -> None:
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.page("pc.ram", 0, b"inside")
    for i in range(40):  # long enough for the batched path
        w.page("pc.ram", (100 + i) * PAGE, b"outside")
    w.eos()
    with registry.open_image(write(tmp_path, w.finish())) as image:
        assert any("40 page records lie beyond" in x.message for x in image.warnings)
        assert image.guest_bytes(image.fixed_segments[0].extents) == PAGE
        assert read_gpa(image, 0, 6) == b"inside"


def test_resent_pages_keep_both_copies(tmp_path: Path, read_gpa, scan) -> None:
    """Live migration re-sends dirtied pages: the stale copy is guest data too."""
    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 4 * PAGE)])
    w.page("pc.ram", PAGE, b"old card=4532015112830366;")
    for i in (0, 2, 3):  # every page of the block once: nothing is missing
        w.zero("pc.ram", i * PAGE)
    w.eos()
    w.part(end=True)
    w.page("pc.ram", PAGE, b"new card=5544332211009989;")
    w.eos()
    with registry.open_image(write(tmp_path, w.finish())) as image:
        assert read_gpa(image, PAGE, 3) == b"new"  # the last copy is the final content
        found = scan(image)
    assert sorted((f.gpa, f.masked) for f in found) == [
        (PAGE + 9, "453201******0366"), (PAGE + 9, "554433******9989")
    ]
