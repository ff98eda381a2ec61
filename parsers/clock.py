"""The guest's wall-clock time when its state was saved, where the format records it.

Each reader returns ``{"guest_clock": "YYYY-MM-DDTHH:MM:SSZ"}`` (UTC, ISO-8601) or ``{}`` when
the bytes say nothing, so a parser's hook is one ``image.meta.update(...)`` line (the key is
``MemoryImage.meta["guest_clock"]``, absent when unknown). Sources:

- QEMU streams (raw, libvirt saves, qcow2 ``savevm``, ``virsh dump``): the CMOS registers of
  the ``mc146818rtc`` device section. QEMU brings them up to date just before saving
  (``rtc_pre_save`` -> ``rtc_update_time`` in ``hw/rtc/mc146818rtc.c``), so they read the
  guest's RTC at save time, to the second. The section is the device's full vmstate
  (``QEMU_VM_SECTION_FULL``: 0x04, be32 section id, u8 name length, name, be32 instance id,
  be32 version), whose first field is ``cmos_data``, 128 bytes — the layout the stream's own
  trailing VM description JSON states, and which is checked against it when present.
- kdump headers (``disk_dump_header.timestamp``, a ``struct timeval``; makedumpfile fills it
  in, QEMU's ``dump-guest-memory`` leaves it zero = unknown).
- VMCOREINFO ``CRASHTIME=<seconds>``, which the Linux kernel appends when it crashes
  (``crash_save_vmcoreinfo`` in ``kernel/crash_core.c``): ELF cores and kdump files of a crash.

The RTC holds what the guest (or ``-rtc base=``) set it to: UTC for Linux guests and QEMU's
default, local time for Windows guests (then the value is off by the guest's UTC offset).
"""

from __future__ import annotations

import json
import re
import struct
from datetime import datetime, timezone
from typing import Any

RTC_NAME = b"mc146818rtc"
# The device's section header as it precedes its fields (migration/savevm.c).
RTC_SECTION = struct.Struct(
    ">B"  # 0x04 QEMU_VM_SECTION_FULL
    "I"  # section id
    "B"  # length of the name that follows (11)
)
RTC_TAIL = struct.Struct(">II")  # be32 instance id, be32 version id (1..3 have cmos_data first)
CMOS_BYTES = 128
# MC146818 register numbers (hw/rtc/mc146818rtc_regs.h); CENTURY is the PC/CMOS convention.
REG_SEC, REG_MIN, REG_HOUR, REG_DAY, REG_MONTH, REG_YEAR = 0x00, 0x02, 0x04, 0x07, 0x08, 0x09
REG_B, REG_CENTURY = 0x0B, 0x32
REG_B_24H, REG_B_BINARY = 0x02, 0x04  # register B: 24-hour mode; binary (not BCD) values

# disk_dump_header.timestamp: after the 8-byte signature, be/le32 version and six 65-byte
# utsname strings (402 bytes), aligned to the guest word: struct timeval {tv_sec; tv_usec}.
KDUMP_TIMEVAL = {64: (0x198, "q"), 32: (0x194, "i")}  # guest bits -> (offset, tv_sec type)
CRASHTIME = re.compile(rb"(?m)^CRASHTIME=(\d{1,12})$")
EARLIEST = 86400  # a clock reading before 1970-01-02 is an unset field, not a time
LATEST = 253402300799  # 9999-12-31T23:59:59Z: a reading past it is a damaged field, not a time


def iso(seconds: float) -> str:
    """``seconds`` since the Unix epoch as ISO-8601 UTC, to the second."""
    return datetime.fromtimestamp(int(seconds), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> float:
    """Seconds since the epoch of an ISO-8601 time as :func:`iso` writes it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def qemu_rtc(devices: bytes) -> dict[str, Any]:
    """The guest clock from the device state of a QEMU stream (``devices``: the bytes after the
    RAM, up to and including the trailing VM description)."""
    layout = _rtc_layout(devices)
    if layout is False:  # the description says the RTC state is laid out otherwise
        return {}
    at = devices.find(RTC_NAME)
    while at >= 0:
        head = at - RTC_SECTION.size
        end = at + len(RTC_NAME) + RTC_TAIL.size
        if head >= 0 and end + CMOS_BYTES <= len(devices):
            kind, _, ln = RTC_SECTION.unpack_from(devices, head)
            _, version = RTC_TAIL.unpack_from(devices, at + len(RTC_NAME))
            if kind == 0x04 and ln == len(RTC_NAME) and 1 <= version <= 3:
                when = _cmos_time(devices[end : end + CMOS_BYTES])
                return {"guest_clock": iso(when)} if when is not None else {}
        at = devices.find(RTC_NAME, at + 1)
    return {}


def _rtc_layout(devices: bytes) -> bool | None:
    """Whether the VM description (JSON after a 0x06 byte and its be32 length) describes
    ``mc146818rtc`` with ``cmos_data`` (128 bytes) as its first field: None when there is no
    readable description (the section header alone is then trusted)."""
    for m in re.finditer(rb'\x06[\x00-\xff]{4}\{"page_size"', devices):
        (ln,) = struct.unpack_from(">I", devices, m.start() + 1)
        try:
            desc = json.loads(devices[m.start() + 5 : m.start() + 5 + ln])
        except (ValueError, UnicodeDecodeError):
            continue
        for dev in desc.get("devices", []) if isinstance(desc, dict) else []:
            if isinstance(dev, dict) and dev.get("name") == RTC_NAME.decode():
                fields = dev.get("fields") or [{}]
                first = fields[0] if isinstance(fields[0], dict) else {}
                return first.get("name") == "cmos_data" and first.get("size") == CMOS_BYTES
        return False  # described, but no RTC
    return None


def _cmos_time(cmos: bytes) -> float | None:
    """Seconds since the epoch that the MC146818 time registers hold (None if invalid)."""
    reg_b = cmos[REG_B]

    def value(reg: int, mask: int = 0xFF) -> int:
        v = cmos[reg] & mask
        return v if reg_b & REG_B_BINARY else (v >> 4) * 10 + (v & 0x0F)

    hour = value(REG_HOUR, 0x7F)
    if not reg_b & REG_B_24H:  # 12-hour mode: bit 7 is PM, 12 stands for 0
        hour = hour % 12 + (12 if cmos[REG_HOUR] & 0x80 else 0)
    century = value(REG_CENTURY) or 20
    try:
        when = datetime(
            century * 100 + value(REG_YEAR),
            value(REG_MONTH),
            value(REG_DAY),
            hour,
            value(REG_MIN),
            value(REG_SEC),
            tzinfo=timezone.utc,
        )
    except ValueError:
        return None
    return when.timestamp()


def kdump(header: bytes, order: str, bits: int) -> dict[str, Any]:
    """The guest clock from a kdump ``disk_dump_header`` (its first bytes, in byte ``order``
    "<" or ">", for a ``bits``-bit guest); ``{}`` when the timestamp is zero."""
    at, kind = KDUMP_TIMEVAL[bits]
    if len(header) < at + 8:
        return {}
    (sec,) = struct.unpack_from(order + kind, header, at)
    return _reading(sec)


def crashtime(vmcoreinfo: bytes) -> dict[str, Any]:
    """The guest clock from a VMCOREINFO note's ``CRASHTIME=`` line."""
    m = CRASHTIME.search(vmcoreinfo)
    return _reading(int(m[1])) if m else {}


def _reading(sec: int) -> dict[str, Any]:
    """``{"guest_clock": ...}`` for a plausible clock reading (seconds since the epoch), ``{}``
    for an unset or damaged one."""
    return {"guest_clock": iso(sec)} if EARLIEST <= sec <= LATEST else {}
