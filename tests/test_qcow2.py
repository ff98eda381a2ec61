"""qcow2 internal snapshots: a real disk with two ``savevm`` snapshots from QEMU 7.2
(samples/qemu/savevm.qcow2.xz), the same disk with its vmstate clusters rewritten compressed,
snapshot selection, hostile tables and hypothesis robustness."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import qcow2, registry
from parsers.base import ImageError
from tests.qemu_writer import compress_qcow2_vmstate
from tests.samples import QEMU_MANIFEST, pan_gpas, qemu_sample

NAME = "savevm.qcow2.xz"
ENTRY = QEMU_MANIFEST[NAME]


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    return qemu_sample(NAME, tmp_path_factory.mktemp("qcow2"))


def check_snapshot(image, snap: str, read_gpa) -> None:
    for plant in ENTRY["snapshots"][snap]:
        assert read_gpa(image, plant["gpa"], len(plant["text"])) == plant["text"].encode()


def test_snapshot_list_and_metadata(disk: Path) -> None:
    with registry.open_image(str(disk)) as image:
        assert image.format == "qcow2-snapshot"
        snaps = image.meta["snapshots"]
        assert [s["name"] for s in snaps] == ["first", "second"]
        assert all(s["vm_state_size"] > 0 for s in snaps)
        assert image.meta["machine"].startswith("pc-i440fx-")
        assert image.meta["ram_size"] == ENTRY["ram_size"]
        assert image.meta["scanned_snapshots"] == ["first", "second"]


@pytest.mark.parametrize("snap", ["first", "second"])
def test_one_snapshot_by_name_or_id(disk: Path, snap: str, scan, read_gpa) -> None:
    with registry.open_image(str(disk), options={"snapshot": snap}) as image:
        assert image.meta["snapshot"] == snap
        check_snapshot(image, snap, read_gpa)
        found = scan(image)
    assert [f.gpa for f in found if f.gpa is not None] == pan_gpas(ENTRY["snapshots"][snap])
    # the other snapshot's VM state is still scanned, as plain cluster bytes (no GPA)
    other = [f for f in found if f.gpa is None]
    assert other and {f.details["region"] for f in other} == {"vmstate"}
    ident = {"first": "1", "second": "2"}[snap]
    with registry.open_image(str(disk), options={"snapshot": ident}) as image:
        check_snapshot(image, snap, read_gpa)


def test_every_snapshot_is_scanned_by_default(disk: Path) -> None:
    seen = set()
    with registry.open_image(str(disk)) as image:
        for seg in image.segments():
            blob = seg.data.tobytes()
            seen |= {snap for snap in ("first", "second") if f"{snap} card=".encode() in blob}
    assert seen == {"first", "second"}


def test_unknown_snapshot(disk: Path) -> None:
    with pytest.raises(ImageError, match="no snapshot 'third'.*'first', 'second'"):
        registry.open_image(str(disk), options={"snapshot": "third"})


@pytest.mark.parametrize("codec", ["deflate", "zstd"])
def test_compressed_vmstate_clusters(disk: Path, tmp_path: Path, codec: str, read_gpa) -> None:
    if codec == "zstd":
        pytest.importorskip("cramjam", reason="zstd clusters need the cramjam package")
    out = tmp_path / "compressed.qcow2"
    n = compress_qcow2_vmstate(disk, out, zstd=codec == "zstd")
    assert n > 4
    for snap in ("first", "second"):
        with registry.open_image(str(out), options={"snapshot": snap}) as image:
            assert codec in image.meta["compression"]
            check_snapshot(image, snap, read_gpa)


def test_disk_without_snapshots_is_not_memory(tmp_path: Path) -> None:
    path = tmp_path / "empty.qcow2"
    head = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, 16, 1 << 20, 0, 0, 0, 0, 0, 0, 0)
    path.write_bytes(head + bytes(512 - len(head)))
    assert qcow2.probe(path.read_bytes()[:4096], str(path)) is None
    with pytest.raises(ImageError, match="no snapshot with VM state"):
        qcow2.open_image(str(path), "qcow2-snapshot", {})


def test_encrypted_and_bad_cluster_bits(disk: Path, tmp_path: Path) -> None:
    data = bytearray(disk.read_bytes())
    struct.pack_into(">I", data, 0x20, 2)
    (tmp_path / "enc.qcow2").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="encrypted"):
        registry.open_image(str(tmp_path / "enc.qcow2"))
    data = bytearray(disk.read_bytes())
    struct.pack_into(">I", data, 0x14, 40)
    (tmp_path / "cb.qcow2").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="cluster_bits"):
        registry.open_image(str(tmp_path / "cb.qcow2"))


# ---- robustness ---------------------------------------------------------------------------------

@settings(max_examples=25)
@given(frac=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                            max_size=3),
       meta_flip=st.tuples(st.integers(0, 0x2FF), st.integers(1, 255)))
def test_truncated_or_corrupted_disk(disk: Path, tmp_path: Path, frac: float, flips: list,
                                    meta_flip: tuple, drain) -> None:
    real = disk.read_bytes()
    data = bytearray(real[: max(1, int(len(real) * frac))])
    for f, x in flips:
        data[int(f * (len(data) - 1))] ^= x
    pos, x = meta_flip  # the header and the start of the tables, where lies hurt most
    if pos < len(data):
        data[pos] ^= x
    path = tmp_path / "h.qcow2"
    path.write_bytes(bytes(data))
    drain(str(path), "qcow2-snapshot")


@settings(max_examples=40)
@given(region=st.sampled_from(["snapshots", "l1", "l2"]), at=st.integers(0, 255),
       value=st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x40]))
def test_lies_in_the_snapshot_l1_and_l2_tables(disk: Path, tmp_path: Path, region: str,
                                              at: int, value: int, drain) -> None:
    data = bytearray(disk.read_bytes())
    img = qcow2.Qcow2(qcow2.Evidence(str(disk)))
    snap = img.snapshots[0]
    l1_index = img.vmstate_offset(snap) >> (img.cluster_bits + img.l2_bits)
    l1_entry = snap["l1_offset"] + 8 * l1_index
    l2 = struct.unpack_from(">Q", data, l1_entry)[0] & qcow2.L1_OFFSET_MASK
    base = {"snapshots": snap["table_offset"], "l1": l1_entry - 128, "l2": l2}[region]
    data[min(base + at, len(data) - 1)] = value  # the snapshot table may end the file
    path = tmp_path / "lie.qcow2"
    path.write_bytes(bytes(data))
    drain(str(path), "qcow2-snapshot")


# ---- guest disk clusters stored compressed (issue 11 part 1) ---------------------------------

ONE = b" card 4111111111111111 "  # inside the cluster at ONE_AT
TWO = b" card 5500000000000004 "  # across the two clusters from TWO_AT
ONE_AT, TWO_AT = 0x20000, 0x40000


def l2_entry_at(path: Path, guest: int) -> int:
    """File offset of the active table's L2 entry for guest disk offset ``guest``."""
    ev = qcow2.Evidence(str(path))
    try:
        img = qcow2.Qcow2(ev)
        l1_off = img.active_l1[0] + 8 * (guest >> (img.cluster_bits + img.l2_bits))
        l2 = struct.unpack(">Q", ev.need(l1_off, 8, "L1"))[0] & qcow2.L1_OFFSET_MASK
        return l2 + 8 * ((guest >> img.cluster_bits) & ((1 << img.l2_bits) - 1))
    finally:
        ev.close()


def compressed_disk(disk: Path, tmp: Path, codec: str) -> Path:
    """The real ``savevm`` disk with guest data written compressed by qemu-io (``write -c``):
    ONE in one cluster, TWO straddling two consecutive clusters; for zstd the header's
    compression type is set first (as ``qemu-img create -o compression_type=zstd`` does)."""
    path = tmp / f"{codec}.qcow2"
    data = bytearray(disk.read_bytes())
    if codec == "zstd":
        data[qcow2.COMPRESSION_TYPE_AT] = 1
        data[qcow2.V3_AT + 7] |= 1 << 3  # incompatible feature bit 3: compression type
    path.write_bytes(bytes(data))
    cs = 1 << struct.unpack_from(">I", data, 0x14)[0]
    one, two = tmp / "one.bin", tmp / "two.bin"
    one.write_bytes(bytes(100) + ONE + bytes(cs - 100 - len(ONE)))
    two.write_bytes(b"x" * (cs - 8) + TWO + b"y" * (cs + 8 - len(TWO)))
    subprocess.run(["qemu-io", "-c", f"write -q -c -s {one} {ONE_AT} {cs}",
                    "-c", f"write -q -c -s {two} {TWO_AT} {2 * cs}", str(path)], check=True)
    written = path.read_bytes()
    assert ONE not in written and TWO[:12] not in written  # stored compressed, not plainly
    for guest in (ONE_AT, TWO_AT, TWO_AT + cs):
        assert struct.unpack_from(">Q", written, l2_entry_at(path, guest))[0] & qcow2.L2_COMPRESSED
    return path


def disk_findings(findings: list) -> dict[int, object]:
    """Findings in region ``disk`` by stream offset (each must be reported once)."""
    found = [f for f in findings if f.details.get("region") == "disk"]
    by = {f.details["stream_offset"]: f for f in found}
    assert len(by) == len(found), [f.details for f in found]
    return by


@pytest.mark.parametrize("codec", ["deflate", "zstd"])
def test_pan_in_compressed_disk_clusters_is_found_at_its_disk_offset(
    disk: Path, tmp_path: Path, codec: str, scan_result, read_gpa
) -> None:
    if codec == "zstd":
        pytest.importorskip("cramjam", reason="zstd clusters need the cramjam package")
    path = compressed_disk(disk, tmp_path, codec)
    result = scan_result(str(path))
    assert not result.errors and not result.warnings, (result.errors, result.warnings)
    by = disk_findings(result.findings)
    cs = 1 << 16
    assert sorted(by) == [ONE_AT + 100 + 6, TWO_AT + cs - 8 + 6]  # the straddler stitched
    for f in by.values():
        assert (f.gpa, f.file, f.offset) == (None, str(path), None)
    with registry.open_image(str(path)) as image:
        assert codec in image.meta["compression"]
        check_snapshot(image, "second", read_gpa)  # the VM state is still read
        decompressed = plain = 0
        for seg in image.segments():
            e = seg.extents
            disk_sp = e.space == image.region_space("disk", decoded=True)
            decompressed += int(e.length[disk_sp & (e.file_offset < 0)].sum())
            plain += int(e.length[image.in_region(e.space) & (e.file_offset >= 0)].sum())
        assert decompressed == 3 * cs
        # the compressed bytes count as structure: plain regions and structure make the file
        assert plain + image.coverage.structure == path.stat().st_size
        assert image.coverage.outside >= plain + decompressed


def test_a_corrupt_compressed_disk_cluster_is_an_error_the_rest_is_scanned(
    disk: Path, tmp_path: Path, scan_result
) -> None:
    path = compressed_disk(disk, tmp_path, "deflate")
    data = bytearray(path.read_bytes())
    entry = struct.unpack_from(">Q", data, l2_entry_at(path, ONE_AT))[0]
    host = entry & ((1 << (62 - (16 - 8))) - 1)
    data[host : host + 8] = b"\xff" * 8  # deflate block type 3: invalid
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert any(e.startswith(f"{path} at offset {host:#x}: compressed cluster corrupt")
               for e in result.errors), result.errors
    assert sorted(disk_findings(result.findings)) == [TWO_AT + (1 << 16) - 8 + 6]
    assert len([f for f in result.findings if f.gpa is not None]) >= 3  # the VM state's plants


def test_a_hostile_table_naming_one_compressed_cluster_everywhere_inflates_it_once(
    disk: Path, tmp_path: Path, scan_result
) -> None:
    path = compressed_disk(disk, tmp_path, "deflate")
    data = bytearray(path.read_bytes())
    at = l2_entry_at(path, ONE_AT)
    entry = data[at : at + 8]
    first = at - 8 * (ONE_AT >> 16)
    data[first : first + (1 << 16)] = entry * (1 << 13)  # all 8192 entries: the same cluster
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert not result.errors, result.errors
    assert sorted(disk_findings(result.findings)) == [100 + 6]  # at the first guest cluster


def test_inflating_more_than_the_ratio_bound_stops_with_an_error(
    disk: Path, tmp_path: Path, scan_result, monkeypatch
) -> None:
    path = compressed_disk(disk, tmp_path, "deflate")
    monkeypatch.setattr(qcow2, "MAX_RATIO", 0)  # the budget: one cluster of the three
    result = scan_result(str(path))
    assert any("2 compressed disk clusters not decompressed" in e for e in result.errors)
    assert sorted(disk_findings(result.findings)) == [ONE_AT + 100 + 6]
