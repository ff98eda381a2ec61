"""Mutation fuzzing of every parser family on the real fixtures (samples/).

A *plan* is a short list of mutations (byte flips, boundary values written into 1/2/4/8-byte
fields of either byte order, truncation, deleted/duplicated chunks, splices of another seed,
appended data) applied to one seed file. :func:`check` runs the whole pipeline in this process
(detect, parse, scan with the ``pan`` detector) and returns what went wrong, if anything:

- an exception other than ImageError (a traceback for the user), or an error line that is not
  one line naming the file;
- more than TIME_LIMIT seconds (CPU) or an RSS above RSS_LIMIT;
- silent loss: a scan without any error that read less guest memory than the image declares,
  or none at all.

Plans, not bytes, are what a failure keeps (``regressions/*.json``: family, seed, plan), so a
regression fixture is a few hundred bytes whatever the seed's size.
"""

from __future__ import annotations

import gzip
import lzma
import os
import random
import resource
import signal
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from parsers import registry
from parsers.base import ImageError
from patterns.registry import select
from scanner.engine import Engine, ScanConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
TIME_LIMIT = 20  # CPU seconds per input: a mutant taking longer is a hang
RSS_LIMIT = 1 << 30  # bytes of peak resident memory for the fuzzing process
BOUNDARY = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1)  # fmt: skip

# family -> seed files under samples/ (small real fixtures) or a writer-made seed
FAMILIES: dict[str, tuple[str, ...]] = {
    "qemu": ("qemu/pc-64m.qevm", "qemu/libvirt-raw.save", "qemu/libvirt-gzip.save"),
    "qcow2": ("qemu/savevm.qcow2.xz",),
    "elf": ("dumps/pc-5G-filtered.elf.gz", "writer:elf"),
    "kdump": ("dumps/pc-64M.kdump-zlib.gz", "dumps/q35-64M.kdump-zlib.flat.gz"),
    "vmware": ("writer:vmss",),
    "lime": ("writer:lime",),
    # writer-made (no VirtualBox or Hyper-V runs here); a .bin + .vsv pair is not a family:
    # check() takes one file, and neither file has structure (flat memory; bytes scanned whole)
    "vbox": ("writer:sav", "writer:sav-live"),
    "hyperv": ("writer:vmrs-gen1", "writer:vmrs-gen2"),
}


@dataclass(frozen=True)
class Op:
    """One mutation: ``kind`` and its arguments (positions as fractions of the size in
    [0, 1), so a plan applies to any seed)."""

    kind: str  # flip, field, truncate, delete, duplicate, splice, append
    at: float
    arg: int = 0
    width: int = 1
    big: bool = False


@cache
def seed(name: str) -> bytes:
    """The bytes of seed ``name`` (unpacked)."""
    if name.startswith("writer:"):
        return _written(name[7:])
    path = SAMPLES / name
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def _written(kind: str) -> bytes:
    from tests import plant, vmware_writer
    from tests.dumpwriter import Load, write_elf

    memory = bytearray(64 * 1024)
    memory[0x1234 : 0x1234 + 22] = b" card 4556737586899855"
    if kind.startswith("sav"):
        return _sav(bytes(memory), live=kind == "sav-live")
    if kind.startswith("vmrs"):
        return _vmrs(bytes(memory), gen1=kind == "vmrs-gen1")
    with tempfile.TemporaryDirectory() as d:
        if kind == "elf":
            write_elf(os.path.join(d, "c"), [Load(0, bytes(memory[:32768])),
                                            Load(0x100000, bytes(memory[32768:]))])  # fmt: skip
            return Path(d, "c").read_bytes()
        if kind == "lime":
            return plant.lime(bytes(memory), [3, 0, 1, 2, 5, 4])
        out = vmware_writer.make_vm(d, "vm", memory_size=64 * 1024, plants={0x1234: b"x"},
                                    regions=None, embedded=True)  # fmt: skip
        return Path(out["checkpoint"]).read_bytes()


def _pages(memory: bytes) -> list[bytes]:
    """Three distinct pages: the one with the planted card number, noise (does not compress)
    and text (compresses)."""
    text = (b"the quick brown fox jumps over the lazy dog " * 94)[:4096]
    return [memory[0x1000:0x2000], random.Random(7).randbytes(4096), text]


def _sav(memory: bytes, live: bool) -> bytes:
    """A VirtualBox save of 2 MiB of RAM (416 page records, most of them zero): LZF, raw and
    split pages, a ballooned page, MMIO2 and ROM pages, device units with LZF records; live:
    three passes, so superseded copies too."""
    from tests import vbox_writer as w

    plant, noise, text = _pages(memory)
    final = w.Pass(ram={0x1000: plant, 0x2000: noise, 0x3000: text, 0x4000: "balloon",
                        0x100000: text, 0x101000: plant},
                   mmio2={(1, 0): text, (1, 1): None}, rom_virgin={(1, 0): noise},
                   rom_shadow={(1, 0): None})  # fmt: skip
    passes = [w.Pass(ram={0x1000: text, 0x2000: plant}), w.Pass(ram={0x3000: plant})]
    sav = w.SavFile([*passes, final] if live else [final], ram_size=2 << 20,
                    mmio2=[w.Range(1, "VRam", 1 << 16)],
                    rom=[w.Range(1, "VGA BIOS", 0x8000, gcphys=0xC0000)],
                    codec=["ssm", "raw", "small"], device_state=text * 2)  # fmt: skip
    return sav.to_bytes()


def _vmrs(memory: bytes, gen1: bool) -> bytes:
    """A Hyper-V .vmrs: Gen 1 (640 KiB, then RAM from 1 MiB: the remapped gap) or Gen 2, two
    RamBlocks of every page tag (raw, XPRESS, LZNT1, pattern fills, variable-size), device
    keys in the key table and as a file object."""
    from tests import hyperv_writer as hw

    plant, noise, text = _pages(memory)
    runs = [(0, 0xA0), (0x100, 0x60)] if gen1 else [(0, 0x100), (0x100000, 0x20)]
    pattern = b"\x11\x22\x33\x44\x55\x66\x77\x88" * 512
    pages = {1: plant, 2: noise, 3: text, 4: pattern, 5: pattern, 7: pattern, 0x101: plant,
             0x102: text, 0x103: noise}  # fmt: skip
    f = hw.VmrsFile(runs, pages, encoding=["raw", "xpress", "lznt1", "fill", "variable"],
                    seed=3, device_keys={"nic": text[:300], "vga": noise[:3000]})  # fmt: skip
    return f.to_bytes()


def random_plan(rng: random.Random, seeds: int) -> tuple[int, list[Op]]:
    """A seed index and 1-4 mutations, drawn from ``rng``."""
    kinds = ("flip", "field", "field", "truncate", "delete", "duplicate", "splice", "append")
    ops = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        # half the mutations hit the first 4 KiB (headers, tables), as real damage does less
        at = rng.random() * (0.01 if rng.random() < 0.5 else 1.0)
        ops.append(Op(kind, at, rng.randrange(len(BOUNDARY) if kind == "field" else 1 << 16),
                      rng.choice((1, 2, 4, 8)), rng.random() < 0.5))  # fmt: skip
    return rng.randrange(seeds), ops


def apply(data: bytes, plan: list[Op], other: bytes) -> bytes:
    """``data`` with the mutations of ``plan`` applied (``other``: the seed for splices)."""
    buf = bytearray(data)
    for op in plan:
        n = len(buf)
        if n == 0:
            break
        p = min(int(op.at * n), n - 1)
        if op.kind == "flip":
            buf[p] ^= 1 << (op.arg % 8)
        elif op.kind == "field":
            v = BOUNDARY[op.arg % len(BOUNDARY)] & ((1 << (8 * op.width)) - 1)
            buf[p : p + op.width] = v.to_bytes(op.width, "big" if op.big else "little")
        elif op.kind == "truncate":
            del buf[p:]
        elif op.kind == "delete":
            del buf[p : p + 1 + op.arg]
        elif op.kind == "duplicate":
            buf[p:p] = buf[p : p + 1 + op.arg]
        elif op.kind == "splice":
            q = op.arg * 61 % max(1, len(other))
            buf[p : p + 1 + op.arg % 4096] = other[q : q + 1 + op.arg % 4096]
        else:
            buf += bytes((op.arg * k) & 0xFF for k in range(1 + op.arg % 512))
    return bytes(buf)


class _Hang(Exception):
    pass


# CPU seconds (process_time) when the input being checked started; None between inputs. The
# kernel keeps sending SIGXCPU once a second after a soft RLIMIT_CPU passes, and a signal can
# arrive after the limit was lifted again: only an input that really used TIME_LIMIT seconds
# is a hang, and no signal may interrupt the bookkeeping between inputs.
_started: float | None = None


def _alarm(*_: Any) -> None:
    if _started is not None and time.process_time() - _started >= TIME_LIMIT - 1:
        raise _Hang


@cache
def _engine() -> Engine:
    return Engine(ScanConfig(select("pan"), key=b"k" * 32))


def check(data: bytes, directory: str, name: str = "image") -> str | None:
    """Run vmleak on ``data`` (written to ``directory``) in this process; the failure, or
    None. The exit status is implied: any error -> 2, else findings -> 1, else 0."""
    path = os.path.join(directory, name)
    with open(path, "wb") as fh:
        fh.write(data)
    global _started
    signal.signal(signal.SIGXCPU, _alarm)
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + TIME_LIMIT,
                                             hard))  # fmt: skip
    _started = time.process_time()
    try:
        try:
            image = registry.open_image(path)
        except ImageError as err:
            return _bad_line(str(err), path)
        with image:
            result = _engine().scan_image(image)
            cov = image.coverage
        for line in result.errors:
            if (bad := _bad_line(line, path)) is not None:
                return bad
        if not result.errors and cov.declared is not None and cov.missing:
            return f"silent loss: declared {cov.declared}, read {cov.read}, no error"
        guest = result.bytes_scanned - cov.outside
        if not result.errors and guest <= 0 and image.format != "raw":
            return "silent loss: no guest memory and no error"
    except _Hang:
        return f"hang: more than {TIME_LIMIT} s of CPU"
    except Exception as exc:  # noqa: BLE001 - every other exception is a traceback for a user
        return f"traceback: {type(exc).__name__}: {exc}"
    finally:
        _started = None
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        os.unlink(path)
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > RSS_LIMIT:
        return f"memory: peak RSS above {RSS_LIMIT >> 20} MiB"
    return None


def _bad_line(line: str, path: str) -> str | None:
    if "\n" in line or not line.startswith(path):
        return f"error line not one line naming the file: {line[:200]!r}"
    return None


def replay(entry: dict[str, Any], directory: str) -> str | None:
    """Re-run a kept regression (``{"family", "seed", "plan"}``)."""
    seeds = FAMILIES[entry["family"]]
    name = entry["seed"]
    plan = [Op(**op) for op in entry["plan"]]
    other = seed(seeds[(seeds.index(name) + 1) % len(seeds)])
    return check(apply(seed(name), plan, other), directory)
