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
