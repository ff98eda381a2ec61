"""Every byte of every input file (issue 11 part 1) and declared memory against memory read
(issue 13), on the real fixtures in samples/, each damaged by the one-byte or one-field change
the issue measured."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

from parsers import libvirt, qcow2, qemu, registry
from parsers.base import Evidence, ImageError
from tests import vmware_writer as vw
from tests.dumpwriter import Kdump, assemble_kdump, flatten
from tests.samples import dump_sample, qemu_sample

PAN = "4556737586899855"
PLANT = f" card {PAN} ".encode()
MIB = 1 << 20


def copied(name: str, tmp: Path) -> Path:
    """A writable copy, in ``tmp``, of the fixture ``qemu/NAME`` or ``dumps/NAME``
    (``samples/``), unpacked when stored compressed."""
    tmp.mkdir(parents=True, exist_ok=True)
    folder, _, file = name.partition("/")
    if folder == "dumps":
        return dump_sample(file, tmp)  # unpacked into tmp: a copy already
    src = qemu_sample(file, tmp)
    out = tmp / file.removesuffix(".xz")
    if src != out:
        shutil.copyfile(src, out)
    return out


def the_region_finding(findings, region: str, path: Path, offset: int) -> None:
    """Exactly one finding of the planted PAN, with no GPA, in ``region`` at ``offset``."""
    planted = [f for f in findings if f.gpa is None and f.details.get("region") == region]
    assert len(planted) == 1, [(f.gpa, f.details) for f in findings]
    f = planted[0]
    assert (f.file, f.offset) == (str(path), offset + PLANT.index(PAN.encode()))
    assert f.masked.endswith(PAN[-4:])


def stored_region_bytes(image, seg) -> int:
    """Bytes of ``seg`` in ``region:*`` extents stored plainly in the file (not decompressed)."""
    e = seg.extents
    region = np.array([not image.is_guest_space(int(k)) for k in e.space], bool)
    return int(e.length[region & (e.file_offset >= 0)].sum())


# ---- issue 11 part 1: a PAN planted outside guest memory is reported once -------------------


def appended_is_trailing(path: Path, scan_result) -> None:
    """A PAN appended to ``path`` is reported once as ``trailing`` at its file offset."""
    end = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(PLANT)
    result = scan_result(str(path))
    assert not result.errors, result.errors
    the_region_finding(result.findings, "trailing", path, end)


def test_pan_after_a_qemu_streams_end(tmp_path: Path, scan_result) -> None:
    appended_is_trailing(copied("qemu/pc-64m.qevm", tmp_path), scan_result)


def test_pan_in_a_libvirt_headers_xml_padding(tmp_path: Path, scan_result) -> None:
    for name in ("qemu/libvirt-raw.save", "qemu/libvirt-gzip.save"):
        path = copied(name, tmp_path)
        data = bytearray(path.read_bytes())
        payload = libvirt.HEADER_SIZE + struct.unpack_from("<I", data, 20)[0]
        area = np.frombuffer(bytes(data[libvirt.HEADER_SIZE : payload]), np.uint8)
        start = libvirt.HEADER_SIZE + int(np.flatnonzero(area)[-1]) + 64  # in the padding
        assert not any(data[start : start + len(PLANT)])
        data[start : start + len(PLANT)] = PLANT
        path.write_bytes(bytes(data))
        result = scan_result(str(path))
        findings, errors = result.findings, result.errors
        assert not errors, errors
        the_region_finding(findings, "padding", path, start)


def test_pan_after_a_vmware_checkpoints_groups(tmp_path: Path, scan_result) -> None:
    out = vw.make_vm(tmp_path, "vm", memory_size=4 * MIB, plants={}, regions=vw.pci_hole_layout(
        0x300, 0x100))  # fmt: skip
    appended_is_trailing(Path(out["checkpoint"]), scan_result)


def test_pan_after_an_elf_cores_segments(tmp_path: Path, scan_result) -> None:
    appended_is_trailing(copied("dumps/pc-64M.elf.gz", tmp_path), scan_result)


def test_pan_after_a_compressed_saves_last_member(tmp_path: Path, scan_result) -> None:
    """Plain bytes after the last gzip/bzip2/xz/lzop member: ``trailing`` at their file
    offset; the file is then header, padding, compressed payload (structure) and trailing."""
    for kind in ("gzip", "bzip2", "xz", "lzop"):
        path = copied(f"qemu/libvirt-{kind}.save", tmp_path)
        end = path.stat().st_size
        with open(path, "ab") as fh:
            fh.write(PLANT)
        result = scan_result(str(path))
        findings, errors = result.findings, result.errors
        assert not errors, errors
        the_region_finding(findings, "trailing", path, end)
        with registry.open_image(str(path)) as image:
            plain = sum(stored_region_bytes(image, s) for s in image.segments())
            assert plain + image.coverage.structure == end + len(PLANT)


def test_pan_in_a_kdumps_header_notes_and_after_its_last_page(tmp_path: Path, scan_result) -> None:
    """A plain kdump: the header block's padding (``header``), the ELF notes the sub header
    names (``metadata``), bytes after the last page (``trailing``); the raw pages, regions
    and structure (bitmaps, descriptors, compressed pages) add up to the file."""
    path = copied("dumps/pc-64M.kdump-zlib.gz", tmp_path)
    data = bytearray(path.read_bytes())
    end = len(data)
    bs = struct.unpack_from("<I", data, 0x1AC)[0]  # block_size
    note_at, note_size = struct.unpack_from("<QQ", data, bs + 48)  # sub header: offset_note
    plants = {"header": 0x300, "metadata": note_at + note_size - 40, "trailing": end}
    for kind, at in plants.items():
        assert not any(data[at : at + len(PLANT)]) or kind == "metadata"
        data[at : at + len(PLANT)] = PLANT
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    findings, errors = result.findings, result.errors
    assert not errors, errors
    for kind, at in plants.items():
        the_region_finding(findings, kind, path, at)
    with registry.open_image(str(path)) as image:
        plain = sum(stored_region_bytes(image, s) for s in image.segments())
        cov = image.coverage
        assert plain == cov.outside
        stored = len(data) - plain - cov.structure  # the raw pages, stored as they are
        assert stored % bs == 0 and 0 < stored < cov.read


def test_info_counts_every_byte_of_the_file(tmp_path: Path) -> None:
    """Bytes stored plainly in the file (guest memory, regions scanned anyway) and decoded
    structure (record headers, tables, compressed data) add up to the file, each byte once."""
    names = ("qemu/pc-64m.qevm", "qemu/libvirt-raw.save", "qemu/libvirt-gzip.save",
             "dumps/pc-64M.elf.gz")  # kdump: its own test (short raw runs are copied)
    for name in names:
        path = copied(name, tmp_path)
        with registry.open_image(str(path)) as image:
            spans = [(int(f), int(f + n)) for s in image.segments()
                     for f, n in zip(s.extents.file_offset, s.extents.length, strict=True)
                     if f >= 0]
            cov = image.coverage
            stored = sum(b - a for a, b in spans)
            assert stored + cov.structure == path.stat().st_size, name
            spans.sort()
            assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False)), name
            assert cov.missing == 0 and cov.outside > 0


# ---- issue 13: declared memory against memory read ------------------------------------------


def first_ram_part(stream: bytes) -> int:
    """Offset of the first ``ram`` section part (after the START section's block list)."""
    walker = qemu.peek_meta(stream[: qemu.PEEK], lambda o, m: ImageError("s", o, m), None, {})
    at = walker.header_end + 8 + 5  # EOS record, section footer
    assert stream[at] == qemu.SEC_PART
    return at


def test_qemu_stream_ending_before_any_page_is_an_error(tmp_path: Path, vmleak) -> None:
    path = copied("qemu/pc-64m.qevm", tmp_path)
    data = bytearray(path.read_bytes())
    data[first_ram_part(bytes(data))] = qemu.SEC_EOF  # one byte: the stream ends here
    path.write_bytes(bytes(data))
    run = vmleak("scan", "--detectors", "pan", str(path))
    assert run.returncode == 2
    assert "guest memory missing" in run.stderr and "declares 67,"  in run.stderr


def test_libvirt_gzip_stream_ending_before_any_page_is_an_error(
    tmp_path: Path, scan_result
) -> None:
    path = copied("qemu/libvirt-gzip.save", tmp_path)
    data = path.read_bytes()
    start = libvirt.HEADER_SIZE + struct.unpack_from("<I", data, 20)[0]
    stream = bytearray(gzip.decompress(data[start:]))
    stream[first_ram_part(bytes(stream))] = qemu.SEC_EOF
    path.write_bytes(data[:start] + gzip.compress(bytes(stream)))
    errors = scan_result(str(path)).errors
    assert any("guest memory missing" in e and "33," in e for e in errors), errors


def test_kdump_excluding_every_page_is_never_a_quiet_exit_0(tmp_path: Path, vmleak) -> None:
    path = copied("dumps/pc-64M.kdump-zlib.gz", tmp_path)
    data = bytearray(path.read_bytes())
    bs, sub, bitmaps = struct.unpack_from("<III", data, 0x1AC)
    second = (1 + sub) * bs + bitmaps * bs // 2
    data[second : second + bitmaps * bs // 2] = bytes(bitmaps * bs // 2)
    path.write_bytes(bytes(data))
    run = vmleak("scan", "--detectors", "pan", str(path))
    assert run.returncode == 2
    assert "no guest memory in this image" in run.stderr and "left out by the dump" in run.stderr


def test_kdump_pages_left_out_on_purpose_are_stated_not_errors(tmp_path: Path, scan_result) -> None:
    path = copied("dumps/pc-64M.kdump-zlib.gz", tmp_path)
    data = bytearray(path.read_bytes())
    bs, sub, bitmaps = struct.unpack_from("<III", data, 0x1AC)
    second = (1 + sub) * bs + bitmaps * bs // 2
    bm = np.frombuffer(bytes(data[second : second + bitmaps * bs // 2]), np.uint8)
    last = int(np.flatnonzero(bm)[-1])  # clear the last stored PFN: earlier descriptors hold
    data[second + last] &= 0x7F  # (the highest PFN of 64 MiB is bit 7 of its byte)
    path.write_bytes(bytes(data))
    with registry.open_image(str(path)) as image:
        errors = scan_result(str(path)).errors
        assert image.coverage.excluded > 0 and "left out by the dump" in image.coverage.excluded_why
    assert not errors


def test_vmware_vmem_shorter_than_memsize_is_an_error(tmp_path: Path, scan_result) -> None:
    out = vw.make_vm(tmp_path, "vm", memory_size=4 * MIB, plants={0x100: PLANT}, regions=None)
    os.truncate(out["vmem"], 3 * MIB)  # no region table; the .vmem lost its last MiB
    result = scan_result(out["checkpoint"])
    findings, errors = result.findings, result.errors
    assert [f.gpa for f in findings] == [0x100 + PLANT.index(PAN.encode())]
    want = ("memSize declares 4,194,304 bytes", "3,145,728 bytes (3.0 MiB) read")
    assert any(all(w in e for w in want) for e in errors), errors


def test_elf_pt_load_turned_pt_null_is_an_error_and_its_bytes_are_scanned(
    tmp_path: Path, scan_result
) -> None:
    path = copied("dumps/pc-64M.elf.gz", tmp_path)
    data = bytearray(path.read_bytes())
    phoff, = struct.unpack_from("<Q", data, 32)
    entsize, phnum = struct.unpack_from("<HH", data, 54)
    loads = [struct.unpack_from("<I4xQQQQQ", data, phoff + i * entsize) for i in range(phnum)]
    # the PT_LOAD holding GPA 1 MiB, where the planted values are
    k = next(i for i, h in enumerate(loads) if h[0] == 1 and h[3] <= MIB < h[3] + h[5])
    struct.pack_into("<I", data, phoff + k * entsize, 0)
    path.write_bytes(bytes(data))
    whole = scan_result(str(copied("dumps/pc-64M.elf.gz", tmp_path / "intact"))).findings
    result = scan_result(str(path))
    findings, errors = result.findings, result.errors
    assert any("has type 0 yet stores" in e for e in errors), errors
    # nothing is lost: the same values are found, without their GPAs
    assert sorted(f.fingerprint for f in findings) == sorted(f.fingerprint for f in whole)
    assert len([f for f in findings if f.gpa is None]) >= 3  # the planted values below 64 MiB


def test_qcow2_with_a_damaged_snapshot_count_is_not_scanned_as_raw(tmp_path: Path, vmleak) -> None:
    path = copied("qemu/savevm.qcow2.xz", tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, 0x3C, 0)  # nb_snapshots
    path.write_bytes(bytes(data))
    run = vmleak("scan", "--detectors", "pan", str(path))
    assert run.returncode == 2 and "qcow2 image with no internal snapshot" in run.stderr


def test_a_file_scanned_as_raw_says_so(tmp_path: Path, vmleak) -> None:
    path = tmp_path / "mem.bin"
    path.write_bytes(PLANT + bytes(4096 - len(PLANT)))
    run = vmleak("scan", "--detectors", "pan", str(path))
    assert run.returncode == 1 and "no known format recognised: scanned as raw" in run.stderr


def test_gzip_bomb_claiming_a_tib_stops_within_seconds(tmp_path: Path, scan_result) -> None:
    """XML says 1 MiB, the block list 1 TiB, then ~600 MB of zero-page records."""
    from tests.qemu_writer import Qevm, libvirt_save

    w = Qevm()
    w.start()
    w.blocks([("pc.ram", 1 << 40)])
    w.page("pc.ram", 0, b"readable before the bomb")
    comp = gzip.zlib.compressobj(1, gzip.zlib.DEFLATED, 31)
    payload = comp.compress(bytes(w.out))
    chunk = (struct.pack(">Q", 0x22) + b"\0") * (1 << 20)
    for _ in range(64):
        payload += comp.compress(chunk)
    payload += comp.flush()
    path = tmp_path / "bomb.save"
    path.write_bytes(libvirt_save(payload, 1, MIB))
    t0 = time.process_time()
    errors = scan_result(str(path)).errors
    assert any("decompression bomb" in e for e in errors), errors
    assert time.process_time() - t0 < 20
    assert libvirt.stream_bound("gzip", 10**6, MIB, 1 << 40) < 500 * MIB


def test_pan_in_a_qcow2s_slack_unreferenced_cluster_disk_data_and_after_its_end(
    tmp_path: Path, scan_result
) -> None:
    """The real ``savevm`` disk: bytes after its partly used last cluster (the snapshot
    table's, ``slack``), a cluster no table references (``unreferenced``), guest disk data
    written by qemu-io (``disk``) and bytes after the last cluster (``trailing``) are each
    reported once at their file offset; regions and structure add up to the file."""
    path = copied("qemu/savevm.qcow2.xz", tmp_path)
    pan = tmp_path / "pan.bin"
    pan.write_bytes(PLANT + bytes(4096 - len(PLANT)))
    subprocess.run(["qemu-io", "-c", f"write -q -s {pan} 0x10000 4096", str(path)], check=True)
    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(path)],
                                       check=True, capture_output=True, text=True).stdout)
    disk_at = next(m["offset"] for m in mapped if m["data"] and m["start"] == 0x10000)
    data = bytearray(path.read_bytes())
    cs = 1 << struct.unpack_from(">I", data, 0x14)[0]
    ev = Evidence(str(path))
    snap_at, snap_end = qcow2.Qcow2(ev).snapshots_span
    ev.close()
    table = bytes(data[snap_at:snap_end])  # moved past a free cluster appended at ``end``
    end = -(-len(data) // cs) * cs
    assert (snap_end - snap_at) % cs  # the table's cluster is partly used
    plants = {"slack": end + cs + len(table), "unreferenced": end + 100, "trailing": end + 2 * cs,
              "disk": disk_at}
    data += bytes(end - len(data)) + bytes(cs) + table + bytes(cs - len(table))
    struct.pack_into(">Q", data, 0x40, end + cs)  # the table moves: the cluster at end is free
    for at in plants.values():
        data[at : at + len(PLANT)] = PLANT
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert not result.errors, result.errors
    for kind, at in plants.items():
        the_region_finding(result.findings, kind, path, at)
    with registry.open_image(str(path)) as image:
        plain = sum(stored_region_bytes(image, s) for s in image.segments())
        assert plain + image.coverage.structure == len(data)


def flat_records(data: bytes) -> list[tuple[int, int, int]]:
    """(assembled offset, size, file position of the data) of each flattened record."""
    out, pos = [], 4096
    while True:
        offset, size = struct.unpack_from(">qq", data, pos)
        if offset == -1:
            return out
        out.append((offset, size, pos + 16))
        pos += 16 + size


def assert_every_byte_once(path: Path, bs: int) -> None:
    """Regions scanned, structure and raw pages stored as they are add up to the file."""
    with registry.open_image(str(path)) as image:
        plain = sum(stored_region_bytes(image, s) for s in image.segments())
        cov = image.coverage
        assert plain == cov.outside
        stored = path.stat().st_size - plain - cov.structure  # raw pages, stored as they are
        assert stored % bs == 0 and 0 <= stored <= cov.read


def test_pan_in_a_flattened_kdumps_container_header_notes_and_after_its_end(
    tmp_path: Path, scan_result
) -> None:
    """A real flattened kdump (QEMU): the flattened header's padding (``header``), the kdump
    header's unused utsname domainname (``header``, through its record), the end of the notes
    right before the next record header (``metadata``) and bytes after the end record
    (``trailing``), each reported once at its file offset."""
    name = next(p.name for p in (Path(__file__).parent.parent / "samples" / "dumps").iterdir()
                if p.name.endswith(".flat.gz") and not p.name.startswith("i386"))
    path = copied(f"dumps/{name}", tmp_path)
    data = bytearray(path.read_bytes())
    recs = flat_records(bytes(data))
    head = next(r for r in recs if r[0] == 0)
    bs = struct.unpack_from("<I", data, head[2] + 0x1AC)[0]
    sub = next(r for r in recs if r[0] == bs)
    note_at, note_size = struct.unpack_from("<QQ", data, sub[2] + 48)
    notes = next(r for r in recs if r[0] <= note_at < r[0] + r[1])
    plants = {"header": 0x100, "header+": head[2] + 8 + 4 + 5 * 65 + 10,
              "metadata": notes[2] + note_at - notes[0] + note_size - 40, "trailing": len(data)}
    assert plants["metadata"] + len(PLANT) <= notes[2] + notes[1]  # ends before a record header
    for kind, at in plants.items():
        assert not any(data[at : at + len(PLANT)]) or kind == "metadata"
        data[at : at + len(PLANT)] = PLANT
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert not result.errors, result.errors
    assert not result.warnings, result.warnings  # no partial-feature remark any more
    header = [f for f in result.findings if f.details.get("region") == "header"]
    assert sorted(f.offset for f in header) == [plants[k] + PLANT.index(PAN.encode())
                                                for k in ("header", "header+")]
    for kind in ("metadata", "trailing"):
        the_region_finding(result.findings, kind, path, plants[kind])
    assert_every_byte_once(path, bs)


def test_pan_in_a_superseded_flattened_record_and_the_assembled_header_padding(
    tmp_path: Path, scan_result
) -> None:
    """makedumpfile rewrites parts of the assembled file: a record's data a later record
    overwrote is ``superseded``, still scanned; the assembled header block's padding, stored
    in several records, is ``header``; page data is scanned once, with its GPA."""
    bs = 4096
    pages = {p: bytes(bs) for p in range(64)}
    pages[7] = PLANT.ljust(bs, b"\0")
    assembled = bytearray(assemble_kdump(pages, Kdump()))
    assembled[0x300 : 0x300 + len(PLANT)] = PLANT  # the header block's padding
    data = bytearray(flatten(bytes(assembled), chunk=3000, overwrite=True))
    first = flat_records(bytes(data))[0]  # garbage, rewritten by a later record
    at = first[2] + 100
    data[at : at + len(PLANT)] = PLANT
    path = tmp_path / "over.kdump"
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert not result.errors, result.errors
    the_region_finding(result.findings, "superseded", path, at)
    header = flat_records(bytes(data))[4]  # the real record of assembled [0, 3000)
    assert header[0] == 0
    the_region_finding(result.findings, "header", path, header[2] + 0x300)
    assert [f.gpa for f in result.findings if f.gpa is not None] == [
        7 * bs + PLANT.index(PAN.encode())]
    assert_every_byte_once(path, bs)

