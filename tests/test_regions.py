"""Findings in non-guest file regions (address spaces ``region:<kind>``): no GPA, the region's
kind in ``details.region``, and the stream offset when the bytes are not stored plainly."""

from __future__ import annotations

import numpy as np

from parsers.base import Extents, MemoryImage, Segment
from patterns.registry import select
from scanner.engine import Engine, ScanConfig

PAN = "4111111111111111"
PAGE = 4096


def test_region_findings_have_no_gpa_and_name_their_region() -> None:
    buf = np.zeros(3 * PAGE, np.uint8)
    for k in range(3):
        text = f" card {PAN} ".encode()
        buf[k * PAGE + 100 : k * PAGE + 100 + len(text)] = np.frombuffer(text, np.uint8)
    image = MemoryImage(path="img", format="test", files=["img"])
    header = image.space_id("region:header")
    state = image.space_id("region:device-state")
    ext = Extents.build(
        [0, PAGE, 2 * PAGE],
        [0x10000, 0, 0x5000],  # guest page at GPA 0x10000; header at file offset 0 ...
        [PAGE] * 3,
        [0x20000, 0, -1],  # ... device state decompressed: no file offset; addr = stream offset
        [0, header, state],
    )
    image.fixed_segments = [Segment(buf, ext, "img")]
    found = Engine(ScanConfig(select("pan"), key=b"k" * 32)).scan_image(image).findings
    by_gpa = {f.gpa: f for f in found if f.gpa is not None}
    assert list(by_gpa) == [0x10000 + 106]
    assert by_gpa[0x10000 + 106].offset == 0x20000 + 106
    assert "region" not in by_gpa[0x10000 + 106].details
    regions = {f.details["region"]: f for f in found if f.gpa is None}
    assert sorted(regions) == ["device-state", "header"]
    hdr, dev = regions["header"], regions["device-state"]
    assert (hdr.file, hdr.offset) == ("img", 106)
    assert "stream_offset" not in hdr.details and "block" not in hdr.details
    assert dev.offset is None
    assert dev.details["stream_offset"] == 0x5000 + 106
    assert "block" not in dev.details


def test_file_and_decoded_offsets_of_one_region_kind_never_meet() -> None:
    """A region kind addressed by file offset (a libvirt save's header, a qcow2 file's plain
    disk clusters) and the same kind addressed by offset in decoded data (the QEMU stream's
    header inside a compressed save, a qcow2 image's compressed disk clusters) are different
    spaces: the same card at the same number in both is reported twice, not merged into one,
    and bytes ending at offset X in one are not joined to bytes starting at X in the other."""
    buf = np.zeros(4 * PAGE, np.uint8)
    text = f" card {PAN} ".encode()
    for k in (0, 1):  # the same card at offset 100 of a plain and of a decoded header
        buf[k * PAGE + 100 : k * PAGE + 100 + len(text)] = np.frombuffer(text, np.uint8)
    split = f" card {PAN[:8]}".encode()  # half a card ending the plain page at 3 pages ...
    buf[3 * PAGE - len(split) : 3 * PAGE] = np.frombuffer(split, np.uint8)
    rest = f"{PAN[8:]} ".encode()  # ... and its other half starting the decoded one there
    buf[3 * PAGE : 3 * PAGE + len(rest)] = np.frombuffer(rest, np.uint8)
    image = MemoryImage(path="img", format="test", files=["img"])
    plain = image.region_space("header")
    decoded = image.region_space("header", decoded=True)
    ext = Extents.build(
        [0, PAGE, 2 * PAGE, 3 * PAGE],
        [0, 0, 2 * PAGE, 3 * PAGE],  # offset 0 in the file and in the stream; then X = 3 pages
        [PAGE] * 4,
        [0, -1, 2 * PAGE, -1],
        [plain, decoded, plain, decoded],
    )
    image.fixed_segments = [Segment(buf, ext, "img")]
    found = Engine(ScanConfig(select("pan"), key=b"k" * 32)).scan_image(image).findings
    assert all(f.details["region"] == "header" for f in found)
    assert sorted((f.offset, f.details.get("stream_offset")) for f in found
                  if f.offset is not None) == [(106, None)]
    assert sorted(f.details.get("stream_offset") for f in found if f.offset is None) == [106]
    assert len(found) == 2  # no card made of the two halves
