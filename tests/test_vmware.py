"""VMware checkpoints: GPAs through the region map, embedded memory, flat .vmem, pairing,
metadata, and hostile checkpoints (hypothesis)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import registry, vmware
from parsers.base import ImageError, MemoryImage
from tests import vmware_writer as w

MiB = 1 << 20
LOW_PAGES = 0x300  # 3 MiB below the hole
HIGH_PAGES = 0x100  # 1 MiB from 4 GiB
HOLE_END = 0x100000 * w.PAGE  # 4 GiB
BELOW = LOW_PAGES * w.PAGE - 16  # the last 16 bytes below the PCI hole
ABOVE = HOLE_END  # the first bytes above it
PLANTS = {BELOW: b"below-the-hole!!", ABOVE: b"above-the-hole!!", 0x1234: b"low-memory"}
UUID = "56 4d 0a 1b 2c 3d 4e 5f-60 71 82 93 a4 b5 c6 d7"


def layout() -> list[w.Region]:
    return w.pci_hole_layout(LOW_PAGES, HIGH_PAGES)


def open_any(path: str) -> MemoryImage:
    return registry.open_image(path)


def assert_plants(image: MemoryImage, plants: dict[int, bytes], read_present) -> None:
    for gpa, data in plants.items():
        assert read_present(image, gpa, len(data)) == data, hex(gpa)


def assert_sane(image: MemoryImage) -> None:
    """Extents inside the file, no buffer byte mapped twice, no GPA mapped twice."""
    for seg in image.segments():
        e = seg.extents
        assert (e.buf_offset >= 0).all()
        assert (e.buf_offset + e.length <= seg.data.size).all()
        order = np.argsort(e.buf_offset)
        b, ln = e.buf_offset[order], e.length[order]
        assert (b[1:] >= b[:-1] + ln[:-1]).all()
        g = e.space == 0
        a, la = e.addr[g], e.length[g]
        o = np.argsort(a)
        assert (a[o][1:] >= a[o][:-1] + la[o][:-1]).all()


# --- every magic, both block widths, the three memory placements --------------------------


@pytest.mark.parametrize("magic", w.ALL_MAGICS, ids=hex)
@pytest.mark.parametrize("ext", [".vmss", ".vmsn"])
def test_separate_vmem_gpas_across_pci_hole(tmp_path, magic, ext, read_present):
    out = w.make_vm(
        tmp_path,
        "vm-Snapshot1",
        memory_size=4 * MiB,
        plants=PLANTS,
        regions=layout(),
        magic=magic,
        ext=ext,
    )
    fmt = "vmware-vmsn" if ext == ".vmsn" else "vmware-vmss"
    for path, want in ((out["checkpoint"], fmt), (out["vmem"], "vmware-vmem")):
        with open_any(path) as image:
            assert image.format == want
            assert image.warnings == []
            assert_plants(image, PLANTS, read_present)
            assert read_present(image, BELOW + 16, 1) is None  # inside the hole
            assert read_present(image, ABOVE - 1, 1) is None
            seg = image.fixed_segments[0]
            assert seg.file == out["vmem"]
            assert image.files[:2] == [
                path,
                out["vmem"] if path != out["vmem"] else out["checkpoint"],
            ]
            assert image.meta["ram_size"] == 4 * MiB
            assert [r["gpa"] for r in image.meta["regions"]] == [0, HOLE_END]
            # buffer offsets are offsets into the .vmem's mmap
            assert list(seg.extents.file_offset) == [0, LOW_PAGES * w.PAGE]
            assert_sane(image)


@pytest.mark.parametrize("magic", w.ALL_MAGICS, ids=hex)
@pytest.mark.parametrize("ext", [".vmss", ".vmsn"])
def test_embedded_memory_gpas_across_pci_hole(tmp_path, magic, ext, read_present):
    out = w.make_vm(
        tmp_path,
        "old",
        memory_size=4 * MiB,
        plants=PLANTS,
        regions=layout(),
        magic=magic,
        ext=ext,
        embedded=True,
    )
    assert out["vmem"] is None
    with open_any(out["checkpoint"]) as image:
        assert image.warnings == []
        assert image.meta["memory"] == "embedded"
        assert_plants(image, PLANTS, read_present)
        seg = image.fixed_segments[0]
        assert seg.file == out["checkpoint"]
        base = out["memory_base"]
        assert base % w.PAGE == 0
        gpa = seg.extents.space == 0
        assert list(seg.extents.file_offset[gpa]) == [base, base + LOW_PAGES * w.PAGE]
        # the checkpoint's other bytes (header, groups) are regions of the same mmap
        assert image.region_bytes(seg.extents) == os.path.getsize(out["checkpoint"]) - 4 * MiB
        assert_sane(image)


def test_embedded_flat_memory(tmp_path, read_present):
    plants = {0x10: b"flat-embedded", 3 * MiB: b"at-3MiB"}
    out = w.make_vm(
        tmp_path, "old", memory_size=4 * MiB, plants=plants, regions=None, embedded=True
    )
    with open_any(out["checkpoint"]) as image:
        assert image.meta["layout"] == "flat"
        assert_plants(image, plants, read_present)
        assert read_present(image, 4 * MiB, 1) is None


def test_lone_vmem_is_flat_with_warning(tmp_path, read_present):
    plants = {BELOW: b"below", LOW_PAGES * w.PAGE: b"next-page"}  # data offsets
    out = w.make_vm(
        tmp_path, "lone", memory_size=4 * MiB, plants=plants, regions=None, with_checkpoint=False
    )
    # flat: the bytes of the first region are at their GPAs, the rest at file offsets
    with open_any(out["vmem"]) as image:
        assert image.format == "vmware-vmem"
        assert read_present(image, BELOW, 5) == b"below"
        assert read_present(image, LOW_PAGES * w.PAGE, 9) == b"next-page"
        assert len(image.warnings) == 1
        msg = str(image.warnings[0])
        assert "may be wrong" in msg and out["vmem"] in msg and "\n" not in msg
        assert image.files == [out["vmem"]]


def test_lone_vmem_not_page_multiple_is_not_claimed(tmp_path):
    path = tmp_path / "odd.vmem"
    path.write_bytes(b"x" * 5000)
    assert vmware.probe(b"x" * 4096, str(path)) is None


def test_checkpoint_without_regions_maps_vmem_flat(tmp_path, read_present):
    out = w.make_vm(tmp_path, "flat", memory_size=2 * MiB, plants={0x5000: b"flat"}, regions=None)
    with open_any(out["vmem"]) as image:
        assert image.warnings == []
        assert image.meta["layout"] == "flat"
        assert read_present(image, 0x5000, 4) == b"flat"


def test_arm64_flat_starts_at_2gib(tmp_path, read_present):
    out = w.make_vm(
        tmp_path,
        "mac",
        memory_size=2 * MiB,
        plants={0x5000: b"arm"},
        regions=None,
        platform=vmware.PLATFORM_ARM64,
    )
    with open_any(out["checkpoint"]) as image:
        assert image.meta["platform"] == "arm64"
        assert read_present(image, vmware.ARM64_RAM_BASE + 0x5000, 3) == b"arm"
        assert read_present(image, 0x5000, 3) is None


def test_padsize_before_region_tags_is_honoured(tmp_path, read_present):
    out = w.make_vm(
        tmp_path,
        "pad",
        memory_size=4 * MiB,
        plants=PLANTS,
        regions=layout(),
        padded_block_in_memory_group=37,
    )
    with open_any(out["checkpoint"]) as image:
        assert image.warnings == []
        assert_plants(image, PLANTS, read_present)


def test_three_regions(tmp_path, read_present):
    regions = [w.Region(0, 0, 0xA0), w.Region(0x100, 0xA0, 0x200), w.Region(0x100000, 0x2A0, 0x60)]
    plants = {0x9FFF0: b"under-640K", 0x100000: b"at-1MiB", 0x100000000 + 0x5FFF0: b"top-of-ram"}
    out = w.make_vm(tmp_path, "three", memory_size=0x300 * w.PAGE, plants=plants, regions=regions)
    with open_any(out["checkpoint"]) as image:
        assert_plants(image, plants, read_present)
        assert read_present(image, 0xA0000, 1) is None
        assert len(image.meta["regions"]) == 3


def test_truncated_vmem_cuts_the_last_region(tmp_path, read_present):
    out = w.make_vm(tmp_path, "cut", memory_size=4 * MiB, plants=PLANTS, regions=layout())
    os.truncate(out["vmem"], 3 * MiB + 8192)
    with open_any(out["checkpoint"]) as image:
        assert read_present(image, ABOVE, 16) == PLANTS[ABOVE]
        assert read_present(image, HOLE_END + 8192, 1) is None
        assert any("cut" in str(x) for x in image.warnings)
        assert_sane(image)


def test_memory_in_no_region_is_still_scanned(tmp_path):
    out = w.make_vm(tmp_path, "extra", memory_size=5 * MiB, plants={}, regions=layout())
    w.write_vmem(out["vmem"], 5 * MiB, {4 * MiB + 8: b"orphan"})  # past every region
    with open_any(out["checkpoint"]) as image:
        seg = image.fixed_segments[0]
        e = seg.extents
        space = image.spaces.index("vmware:unmapped")
        k = int(np.flatnonzero(e.space == space)[0])
        assert e.addr[k] == 4 * MiB and e.length[k] == MiB
        assert seg.data[e.buf_offset[k] + 8 : e.buf_offset[k] + 14].tobytes() == b"orphan"
        assert any("in no region" in str(x) for x in image.warnings)


# --- metadata ----------------------------------------------------------------------------


def test_vmx_and_checkpoint_metadata(tmp_path):
    out = w.make_vm(
        tmp_path,
        "Win10-Snapshot2",
        memory_size=4 * MiB,
        plants=PLANTS,
        regions=layout(),
        ext=".vmsn",
        vmx=("Finance PC", UUID),
    )
    w.write_vmx(tmp_path / "Other.vmx", "not this one", UUID)
    with open_any(out["vmem"]) as image:
        m = image.meta
        assert m["guest_name"] == "Finance PC"
        assert m["guest_uuid"] == "564d0a1b-2c3d-4e5f-6071-8293a4b5c6d7"
        assert image.files == [out["vmem"], out["checkpoint"], out["vmx"]]
        assert m["screenshot"] is True
        shot = m["screen_blocks"][0]
        assert (shot["group"], shot["tag"], shot["png"]) == ("MKSVMX", "imageData", True)
        names = [g["name"] for g in m["groups"]]
        assert names == ["Checkpoint", "cpu", "memory", "MKSVMX"]
        assert all(g["complete"] for g in m["groups"])
        mem = next(g for g in m["groups"] if g["name"] == "memory")
        assert mem["tags"] == 2 + 3 * 2
        assert m["checkpoint_tags"]["memSize"] == 4
        assert m["checkpoint_magic"].startswith("0xbed2bed2")


def test_no_screenshot_reported_absent(tmp_path):
    out = w.make_vm(tmp_path, "noshot", memory_size=MiB, plants={}, regions=None, screenshot=None)
    with open_any(out["checkpoint"]) as image:
        assert image.meta["screenshot"] is False


def test_vmx_found_by_checkpoint_vmstate(tmp_path):
    out = w.make_vm(tmp_path, "renamed-abc", memory_size=MiB, plants={}, regions=None)
    w.write_vmx(
        tmp_path / "Totally Different.vmx",
        "Renamed VM",
        UUID,
        **{"checkpoint.vmState": "renamed-abc.vmss"},
    )
    with open_any(out["checkpoint"]) as image:
        assert image.meta["guest_name"] == "Renamed VM"


# --- pairing ------------------------------------------------------------------------------


def test_companions_and_primary_grouping(tmp_path):
    kw = dict(memory_size=MiB, plants={}, regions=None)
    susp = w.make_vm(tmp_path, "vm-4f1e2a3b", **kw, vmx=("VM", UUID))
    snap = w.make_vm(tmp_path, "vm-Snapshot1", ext=".vmsn", **kw)
    old = w.make_vm(tmp_path, "vm-Snapshot2", ext=".vmsn", embedded=True, **kw)
    lone = w.make_vm(tmp_path, "stray", with_checkpoint=False, **kw)
    # a .vmsn beside a .vmss + .vmem of the same stem, with no memory of its own
    dup = str(tmp_path / "vm-4f1e2a3b.vmsn")
    shutil.copy(susp["checkpoint"], dup)
    (tmp_path / "notes.txt").write_text("not VMware")
    vmx = susp["vmx"]

    assert vmware.companions(susp["checkpoint"]) == [susp["vmem"], vmx]
    assert vmware.companions(susp["vmem"]) == [susp["checkpoint"], vmx]  # .vmss before .vmsn
    assert vmware.companions(snap["vmem"]) == [snap["checkpoint"], vmx]

    groups = vmware.primary(sorted(str(p) for p in tmp_path.iterdir()))
    assert sorted(groups) == sorted(
        [
            [susp["checkpoint"], susp["vmem"], dup, vmx],
            [snap["checkpoint"], snap["vmem"], vmx],
            [old["checkpoint"], vmx],
            [lone["vmem"]],
        ]
    )
    memory_files = [g[0] for g in groups]
    assert len(memory_files) == len(set(memory_files)) == 4


def test_embedded_checkpoint_does_not_describe_a_vmem(tmp_path, read_present):
    out = w.make_vm(tmp_path, "both", memory_size=MiB, plants={}, regions=None, embedded=True)
    w.write_vmem(tmp_path / "both.vmem", MiB, {0: b"separate"})
    groups = vmware.primary([str(p) for p in tmp_path.iterdir()])
    assert sorted(groups) == sorted([[str(tmp_path / "both.vmem")], [out["checkpoint"]]])
    with open_any(str(tmp_path / "both.vmem")) as image:
        assert read_present(image, 0, 8) == b"separate"
        assert any("embeds its own memory" in str(x) for x in image.warnings)


def test_upper_case_extensions_pair(tmp_path, read_present):
    out = w.make_vm(tmp_path, "WIN", memory_size=4 * MiB, plants=PLANTS, regions=layout())
    os.rename(out["vmem"], tmp_path / "WIN.VMEM")
    os.rename(out["checkpoint"], tmp_path / "WIN.VMSS")
    with open_any(str(tmp_path / "WIN.VMSS")) as image:
        assert image.fixed_segments[0].file == str(tmp_path / "WIN.VMEM")
        assert_plants(image, PLANTS, read_present)
    with open_any(str(tmp_path / "WIN.VMEM")) as image:
        assert_plants(image, PLANTS, read_present)


def test_checkpoint_without_memory_or_vmem_is_an_error(tmp_path):
    out = w.make_vm(tmp_path, "gone", memory_size=MiB, plants={}, regions=layout())
    os.remove(out["vmem"])
    with pytest.raises(ImageError, match=r"gone\.vmem is not beside it"):
        open_any(out["checkpoint"])


def test_compressed_memory_block_is_a_clear_error(tmp_path):
    path = tmp_path / "z.vmsn"
    groups = w.standard_groups(None, w.Block("Memory", (0, 0), data=b"\0" * 4096, compressed=True))
    w.write_checkpoint(path, groups)
    with pytest.raises(ImageError, match="compressed") as err:
        open_any(str(path))
    assert err.value.file == str(path) and err.value.offset is not None


def test_forced_format_mismatch(tmp_path):
    out = w.make_vm(tmp_path, "f", memory_size=MiB, plants={}, regions=None)
    with pytest.raises(ImageError, match="checkpoint, not a .vmem"):
        registry.open_image(out["checkpoint"], "vmware-vmem")
    with pytest.raises(ImageError, match="not a VMware checkpoint"):
        registry.open_image(out["vmem"], "vmware-vmss")


# --- hostile checkpoints -------------------------------------------------------------------


def _fields(path: str) -> list[tuple[int, int]]:
    """(file offset, byte width) of every integer field a reader trusts in ``path``."""
    ck = vmware.read_checkpoint(path)
    out = [(8, 4)]  # numgroups
    for g in ck.groups:
        out += [(g.entry_offset + 64, 8), (g.entry_offset + 72, 8)]
    for t in ck.memory_tags:
        head = t.offset + 2 + len(t.name) + 4 * len(t.indices)
        out.append((t.offset, 1))  # flags: value size / index count
        if t.is_block:
            out += [(head, ck.width), (head + ck.width, ck.width), (head + 2 * ck.width, 2)]
        else:
            out.append((head, t.valsize))
        out += [(t.offset + 2 + len(t.name) + 4 * k, 4) for k in range(len(t.indices))]
    return out


ABSURD = st.one_of(
    st.sampled_from([0, 1, 0xFFF, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]),
    st.integers(min_value=0, max_value=2**64 - 1),
)


class Hostile:
    """Base fixtures, written once; each example gets mutated copies."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="vmleak-vmw-")
        self.sep = w.make_vm(
            os.path.join(self.dir),
            "sep",
            memory_size=64 * 1024,
            plants={0x100: b"x"},
            regions=w.pci_hole_layout(8, 8),
        )
        self.emb = w.make_vm(
            os.path.join(self.dir),
            "emb",
            memory_size=64 * 1024,
            plants={0x100: b"x"},
            regions=w.pci_hole_layout(8, 8),
            embedded=True,
            magic=w.MAGIC_V0,
            ext=".vmsn",
        )
        self.fields = {k: _fields(self.__dict__[k]["checkpoint"]) for k in ("sep", "emb")}
        self.bytes = {k: open(self.__dict__[k]["checkpoint"], "rb").read() for k in ("sep", "emb")}


@pytest.fixture(scope="module")
def hostile():
    h = Hostile()
    yield h
    shutil.rmtree(h.dir, ignore_errors=True)


def _check_hostile(path: str) -> None:
    try:
        image = registry.open_image(path)
    except ImageError as err:
        assert err.file and "\n" not in str(err)
        return
    with image:
        assert_sane(image)
        for x in image.warnings:
            assert isinstance(x, ImageError) and x.file and "\n" not in str(x)
        assert len(image.warnings) <= 100  # capped per kind, never one per table entry
        size = os.path.getsize(image.fixed_segments[0].file)
        assert image.fixed_segments[0].data.size == size


SETTINGS = settings(max_examples=60)


@SETTINGS
@given(kind=st.sampled_from(["sep", "emb"]), cut=st.floats(0, 1))
def test_hostile_truncated(hostile, kind, cut):
    data = hostile.bytes[kind]
    path = os.path.join(hostile.dir, f"{kind}.vmsn")  # beside the .vmem it pairs with
    with open(path, "wb") as fh:
        fh.write(data[: int(len(data) * cut)])
    _check_hostile(path)


@SETTINGS
@given(kind=st.sampled_from(["sep", "emb"]), data=st.data())
def test_hostile_absurd_fields(hostile, kind, data):
    buf = bytearray(hostile.bytes[kind])
    for _ in range(data.draw(st.integers(1, 3))):
        off, width = data.draw(st.sampled_from(hostile.fields[kind]))
        value = data.draw(ABSURD) & ((1 << (8 * width)) - 1)
        buf[off : off + width] = value.to_bytes(width, "little")
    # written beside the real .vmem so the separate case pairs with it
    path = os.path.join(hostile.dir, f"{kind}.vmsn")
    with open(path, "wb") as fh:
        fh.write(buf)
    _check_hostile(path)


@SETTINGS
@given(
    kind=st.sampled_from(["sep", "emb"]),
    flips=st.lists(st.tuples(st.integers(0, 1199), st.integers(0, 255)), max_size=8),
)
def test_hostile_byte_flips(hostile, kind, flips):
    buf = bytearray(hostile.bytes[kind])
    for pos, val in flips:
        if pos < len(buf):
            buf[pos] = val
    path = os.path.join(hostile.dir, f"{kind}.flip.vmsn")
    with open(path, "wb") as fh:
        fh.write(buf)
    _check_hostile(path)


def test_hostile_overlapping_and_outside_regions(tmp_path, read_present):
    regions = [
        w.Region(0, 0, 0x100),
        w.Region(0x80, 0x100, 0x100),  # GPA overlap
        w.Region(0x1000, 0x80, 0x10),  # data overlap
        w.Region(0x2000, 0x10000, 0x10),
    ]  # outside the data
    out = w.make_vm(
        tmp_path, "bad", memory_size=0x200 * w.PAGE, plants={0x10: b"ok"}, regions=regions
    )
    with open_any(out["checkpoint"]) as image:
        assert read_present(image, 0x10, 2) == b"ok"
        msgs = [str(x) for x in image.warnings]
        assert sum("dropped" in m for m in msgs) == 3
        assert all(out["checkpoint"] in m and " at offset " in m for m in msgs if "dropped" in m)
        assert_sane(image)


def test_hostile_huge_group_count(tmp_path):
    path = tmp_path / "many.vmss"
    w.write_checkpoint(path, [("memory", [w.u32("regionsCount", 0)])])
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(struct.pack("<I", 0xFFFFFFFF))
    w.write_vmem(tmp_path / "many.vmem", w.PAGE, {})
    with open_any(str(path)) as image:
        assert any("group table" in str(x) for x in image.warnings)


def test_every_region_outside_the_data_is_an_error(tmp_path):
    out = w.make_vm(tmp_path, "far", memory_size=w.PAGE, plants={}, regions=[w.Region(0, 0x100, 1)])
    with pytest.raises(ImageError, match="no usable memory region"):
        open_any(out["checkpoint"])


def test_hostile_tag_budget_keeps_the_memory_group(tmp_path, monkeypatch, read_present):
    monkeypatch.setattr(vmware, "MAX_TAGS", 500)
    noise = [w.u32("reg", k, k) for k in range(2000)]
    groups = [("device", noise), ("memory", w.memory_group(layout()))]
    path = tmp_path / "noisy.vmss"
    w.write_checkpoint(path, groups)
    w.write_vmem(tmp_path / "noisy.vmem", 4 * MiB, {ABOVE - HOLE_END + LOW_PAGES * w.PAGE: b"hi"})
    with open_any(str(path)) as image:
        assert read_present(image, ABOVE, 2) == b"hi"
        assert any("stopped after 500 tags" in str(x) for x in image.warnings)


# --- end to end through the engine ------------------------------------------------------

PAN_BELOW = b"4111111111111111"  # well-known test PANs (reported with details.test)
PAN_ABOVE = b"5555555555554444"
PAN_LOW = b"4012888888881881"


def _found(result) -> dict[int, tuple[str, str, int]]:
    return {f.gpa: (f.masked, f.file, f.offset) for f in result.findings if f.detector == "pan"}


@pytest.mark.parametrize(
    "ext, embedded",
    [(".vmss", False), (".vmsn", False), (".vmss", True), (".vmsn", True)],
    ids=["vmss+vmem", "vmsn+vmem", "embedded-vmss", "embedded-vmsn"],
)
def test_scan_reports_pans_at_gpas_around_the_pci_hole(tmp_path, ext, embedded, scan_result):
    plants = {BELOW: PAN_BELOW, ABOVE: PAN_ABOVE, 0x2000: PAN_LOW}
    out = w.make_vm(
        tmp_path,
        "vm-Snapshot1",
        memory_size=4 * MiB,
        plants=plants,
        regions=layout(),
        ext=ext,
        embedded=embedded,
    )
    holder = out["checkpoint"] if embedded else out["vmem"]
    base = out["memory_base"]
    for path in filter(None, (out["checkpoint"], out["vmem"])):
        result = scan_result(path)
        assert result.errors == [] and result.warnings == []
        assert _found(result) == {
            BELOW: ("411111******1111", holder, base + BELOW),
            ABOVE: ("555555******4444", holder, base + LOW_PAGES * w.PAGE),
            0x2000: ("401288******1881", holder, base + 0x2000),
        }


def test_scan_never_joins_the_two_sides_of_the_hole(tmp_path, scan_result):
    # 8 digits end region 0 and 8 digits start region 1: adjacent in the .vmem, a valid PAN
    # there, but 4 GiB - 3 MiB apart in the guest.
    plants = {LOW_PAGES * w.PAGE - 8: PAN_BELOW[:8], ABOVE: PAN_BELOW[8:]}
    out = w.make_vm(tmp_path, "split", memory_size=4 * MiB, plants=plants, regions=layout())
    assert _found(scan_result(out["checkpoint"])) == {}
    raw = _found(scan_result(out["vmem"], fmt="raw"))  # the same file without its region map
    assert list(raw) == [LOW_PAGES * w.PAGE - 8]


def test_scan_lone_vmem_flat_with_warning(tmp_path, scan_result):
    plants = {BELOW: PAN_BELOW, LOW_PAGES * w.PAGE + 64: PAN_ABOVE}  # data offsets
    out = w.make_vm(
        tmp_path, "lone", memory_size=4 * MiB, plants=plants, regions=None, with_checkpoint=False
    )
    result = scan_result(out["vmem"])
    assert result.format == "vmware-vmem"
    assert set(_found(result)) == set(plants)  # GPA = file offset
    assert len(result.warnings) == 1 and "may be wrong" in result.warnings[0]


def test_scan_checkpoint_declaring_flat_memory(tmp_path, scan_result):
    plants = {BELOW: PAN_BELOW, LOW_PAGES * w.PAGE + 64: PAN_ABOVE}
    out = w.make_vm(tmp_path, "flat", memory_size=4 * MiB, plants=plants, regions=None)
    result = scan_result(out["vmem"])
    assert result.warnings == []
    assert set(_found(result)) == set(plants)


def test_png_block_outside_mks_groups_is_reported(tmp_path):
    groups = w.standard_groups(None, screenshot=None)
    groups.append(
        ("gui", [w.Block("thumb", (0,), data=w.TINY_PNG), w.Block("blob", (), data=b"x" * 9)])
    )
    path = tmp_path / "t.vmss"
    w.write_checkpoint(path, groups)
    w.write_vmem(tmp_path / "t.vmem", w.PAGE, {})
    with open_any(str(path)) as image:
        assert image.meta["screenshot"] is False
        (shot,) = image.meta["screen_blocks"]
        assert (shot["group"], shot["tag"], shot["png"]) == ("gui", "thumb[0]", True)


def test_companions_of_an_embedded_checkpoint_exclude_the_vmem(tmp_path):
    out = w.make_vm(tmp_path, "emb", memory_size=MiB, plants={}, regions=None, embedded=True)
    w.write_vmem(tmp_path / "emb.vmem", MiB, {})
    assert vmware.companions(out["checkpoint"]) == []
    assert vmware.companions(str(tmp_path / "emb.vmem")) == []


# --- the command line ---------------------------------------------------------------------


def test_cli_scan_finds_pans_at_gpas_and_exit_1(tmp_path, vmleak):
    import json

    out = w.make_vm(
        tmp_path, "vm", memory_size=4 * MiB, plants={ABOVE: PAN_ABOVE}, regions=layout()
    )
    run = vmleak("scan", "--format", "jsonl", out["checkpoint"])
    assert run.returncode == 1, run.stderr
    (row,) = [json.loads(x) for x in run.stdout.splitlines()]
    assert (row["gpa"], row["file"], row["format"]) == (ABOVE, out["vmem"], "vmware-vmss")


def test_cli_checkpoint_without_memory_exits_2_with_one_line(tmp_path, vmleak):
    out = w.make_vm(tmp_path, "vm", memory_size=MiB, plants={}, regions=layout())
    os.remove(out["vmem"])
    run = vmleak("scan", out["checkpoint"])
    assert run.returncode == 2
    lines = [x for x in run.stderr.splitlines() if out["checkpoint"] in x]
    assert len(lines) == 1 and "vm.vmem is not beside it" in lines[0]
    assert "Traceback" not in run.stderr


def test_cli_info_lists_regions_and_groups(tmp_path, vmleak):
    out = w.make_vm(
        tmp_path, "vm", memory_size=4 * MiB, plants={}, regions=layout(), vmx=("Guest X", UUID)
    )
    run = vmleak("info", out["vmem"])
    assert run.returncode == 0, run.stderr
    for text in ("vmware-vmem", "Guest X", "MKSVMX", "screenshot", "0x000100000000"):
        assert text in run.stdout


def test_hostile_group_count_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(vmware, "MAX_GROUPS", 3)
    groups = [(f"dev{k}", [w.u32("x", k)]) for k in range(6)]
    path = tmp_path / "g.vmss"
    w.write_checkpoint(path, [("memory", w.memory_group(None)), *groups])
    ck = vmware.read_checkpoint(str(path))
    assert [g.name for g in ck.groups] == ["memory", "dev0", "dev1"]
    assert any("7 groups claimed" in str(x) for x in ck.warnings)


def test_hostile_region_count_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(vmware, "MAX_REGIONS", 4)
    regions = [w.Region(2 * k, k, 1) for k in range(10)]  # one page each, holes between
    out = w.make_vm(tmp_path, "many", memory_size=10 * w.PAGE, plants={}, regions=regions)
    with open_any(out["checkpoint"]) as image:
        assert len(image.meta["regions"]) == 4
        assert any("10 regions; using the first 4" in str(x) for x in image.warnings)
        assert_sane(image)
