"""Guest wall-clock time at save (parsers/clock.py): the RTC of real QEMU/libvirt streams, the
kdump header timestamp and VMCOREINFO CRASHTIME, and hostile device-state bytes."""

from __future__ import annotations

import json
import lzma
import shutil
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import clock, registry

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
QEMU = json.loads((SAMPLES / "qemu" / "manifest.json").read_text())


def materialise(name: str, tmp: Path) -> Path:
    src = SAMPLES / "qemu" / name
    if not name.endswith(".xz"):
        return src
    out = tmp / name.removesuffix(".xz")
    with lzma.open(src) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return out


def read_to_end(path: Path) -> dict:
    """The image's metadata after every segment was produced (a compressed stream reaches its
    device state only at its end)."""
    with registry.open_image(str(path)) as image:
        for _ in image.segments():
            pass
        return image.meta


X86 = sorted(n for n, e in QEMU.items() if e["machine"] in ("pc", "q35"))


@pytest.mark.parametrize("name", X86)
def test_real_qemu_fixture_clock_is_the_day_it_was_made(tmp_path: Path, name: str) -> None:
    """A paused guest's RTC starts at the host's time: every committed x86 QEMU/libvirt
    fixture reads the day its manifest says it was made (the day of its commit)."""
    meta = read_to_end(materialise(name, tmp_path))
    assert meta["guest_clock"].startswith(QEMU[name]["made"] + "T"), meta.get("guest_clock")


def test_arm_virt_clock_is_unknown(tmp_path: Path) -> None:
    """An arm64 ``virt`` guest has a PL031, whose saved state is an offset from a clock the
    stream does not hold: no guest clock rather than a wrong one."""
    assert "guest_clock" not in read_to_end(materialise("arm-virt-64m.qevm.xz", tmp_path))


def test_qemu_fixture_clock_is_in_the_mapped_metadata() -> None:
    """An uncompressed stream has its device state in the mmap: known at open time."""
    with registry.open_image(str(SAMPLES / "qemu" / "pc-64m.qevm")) as image:
        assert image.meta["guest_clock"] == "2026-11-23T15:14:08Z"


def test_qemu_kdump_fixtures_have_no_clock(tmp_path: Path) -> None:
    """QEMU's dump-guest-memory leaves the kdump timestamp zero: unknown, not 1970."""
    import gzip

    out = tmp_path / "dump"
    out.write_bytes(gzip.decompress((SAMPLES / "dumps" / "pc-64M.kdump-zlib.gz").read_bytes()))
    with registry.open_image(str(out)) as image:
        assert "guest_clock" not in image.meta


def rtc_section(cmos: bytes, version: int = 3) -> bytes:
    return (
        struct.pack(">BIB", 4, 7, 11) + b"mc146818rtc" + struct.pack(">II", 0, version) + cmos
        + bytes(60)
    )


def cmos_regs(**regs: int) -> bytes:
    cmos = bytearray(128)
    names = {"sec": 0, "min": 2, "hour": 4, "day": 7, "month": 8, "year": 9, "b": 0xB,
             "century": 0x32}
    for k, v in regs.items():
        cmos[names[k]] = v
    return bytes(cmos)


def test_cmos_bcd_24h() -> None:
    cmos = cmos_regs(sec=0x59, min=0x30, hour=0x23, day=0x31, month=0x12, year=0x25,
                     century=0x20, b=0x02)
    assert clock.qemu_rtc(rtc_section(cmos)) == {"guest_clock": "2025-12-31T23:30:59Z"}


def test_cmos_binary_12h_pm() -> None:
    cmos = cmos_regs(sec=5, min=4, hour=0x80 | 3, day=2, month=1, year=24, century=20,
                     b=0x04)
    assert clock.qemu_rtc(rtc_section(cmos)) == {"guest_clock": "2024-01-02T15:04:05Z"}


def test_cmos_invalid_date_is_unknown() -> None:
    assert clock.qemu_rtc(rtc_section(cmos_regs(month=0x13, day=1, b=2))) == {}


def test_description_without_cmos_first_is_not_trusted() -> None:
    cmos = cmos_regs(day=1, month=1, year=0x25, century=0x20, b=2)
    desc = json.dumps({"page_size": 4096, "devices": [
        {"name": "mc146818rtc", "fields": [{"name": "other", "size": 4}]}]}).encode()
    tail = rtc_section(cmos) + b"\x06" + struct.pack(">I", len(desc)) + desc
    assert clock.qemu_rtc(tail) == {}
    good = desc.replace(b'"other", "size": 4', b'"cmos_data", "size": 128')
    tail = rtc_section(cmos) + b"\x06" + struct.pack(">I", len(good)) + good
    assert clock.qemu_rtc(tail) == {"guest_clock": "2025-01-01T00:00:00Z"}


def test_kdump_timestamp_both_layouts() -> None:
    t = int(datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc).timestamp())
    h64 = bytearray(0x1A8)
    struct.pack_into("<q", h64, 0x198, t)
    assert clock.kdump(bytes(h64), "<", 64) == {"guest_clock": "2026-03-04T05:06:07Z"}
    h32 = bytearray(0x1A8)
    struct.pack_into(">i", h32, 0x194, t)
    assert clock.kdump(bytes(h32), ">", 32) == {"guest_clock": "2026-03-04T05:06:07Z"}
    assert clock.kdump(bytes(0x1A8), "<", 64) == {}


def test_crashtime() -> None:
    info = b"OSRELEASE=6.1.0\nPAGESIZE=4096\nCRASHTIME=1767225600\n"
    assert clock.crashtime(info) == {"guest_clock": "2026-01-01T00:00:00Z"}
    assert clock.crashtime(b"OSRELEASE=6.1.0\n") == {}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 399))
def test_hostile_device_state_never_raises(noise: bytes, cut: int) -> None:
    blob = noise[:cut] + rtc_section(noise[cut:] + bytes(128))[: 150 + len(noise) % 200]
    out = clock.qemu_rtc(blob)
    assert out == {} or clock.parse(out["guest_clock"]) > 0


@given(sec=st.integers(-(1 << 63), (1 << 63) - 1))
def test_any_kdump_timestamp_is_a_time_or_none(sec: int) -> None:
    """A damaged timestamp field (found by the kdump fuzz family: years past 9999 raised
    ValueError/OverflowError) is no guest clock, never a traceback."""
    h64 = bytearray(0x1A8)
    struct.pack_into("<q", h64, 0x198, sec)
    got = clock.kdump(bytes(h64), "<", 64)
    assert got == ({"guest_clock": clock.iso(sec)} if clock.EARLIEST <= sec <= clock.LATEST
                   else {})
    line = abs(sec) % 10**12  # CRASHTIME= holds up to 12 digits
    assert clock.crashtime(b"CRASHTIME=%d\n" % line) == (
        {"guest_clock": clock.iso(line)} if clock.EARLIEST <= line <= clock.LATEST else {})
