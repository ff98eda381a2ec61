"""What does reading guest memory out of a libvirt save cost? Turn a raw memory image into a
``virsh save``-style file (libvirt header + QEMU migration stream: a PAGE record per non-zero
page, a ZERO record per zero page, machine pc-i440fx-7.2), then scan the raw image and the save
with the same detectors and compare throughput (MB/s of guest memory, wall time of
``Engine.scan_image`` in this process, median of ``--repeat`` runs after a warm-up run).

Compressed saves (``--compress gzip,lzop,zstd,xz,bzip2``) are made with the same programs and
levels libvirt uses, and their throughput is reported per MB of guest memory and per MB of
file: they are bounded by decompression speed. Both scans must report the same secrets; GPAs
differ from raw offsets only above the 3 GiB split of a >= 3.5 GiB pc guest.

Usage (the issue's benchmark: a 4 GiB guest; build the image with benchmarks/gen_image.py)::

    python benchmarks/bench_libvirt.py --image m.img
    python benchmarks/bench_libvirt.py --image m.img --compress gzip,lzop --repeat 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.inprocess import timed  # noqa: E402
from parsers import qemu_gpa  # noqa: E402
from patterns import registry as detectors  # noqa: E402
from scanner.engine import Engine, ScanConfig  # noqa: E402
from tests.qemu_writer import libvirt_head  # noqa: E402  (test-only container writer)

PAGE = 4096
CHUNK = 16 << 20  # raw bytes converted per step
MACHINE = "pc-i440fx-7.2"
# libvirt's format codes and the commands it runs (src/qemu/qemu_saveimage.c)
COMPRESS = {
    "gzip": (1, ["gzip", "-c"]),
    "bzip2": (2, ["bzip2", "-c"]),
    "xz": (3, ["xz", "-c", "-3"]),
    "lzop": (4, ["lzop", "-c"]),
    "zstd": (5, ["zstd", "-c", "-q"]),
}


def stream_chunks(raw: str, size: int):
    """The QEVM stream of a pc guest whose RAM is the file ``raw`` (``size`` bytes), in
    pieces: header, configuration, one ram section with every page, EOF."""
    machine = MACHINE.encode()
    yield b"QEVM\x00\x00\x00\x03" + b"\x07" + len(machine).to_bytes(4, "big") + machine
    name = b"\x06pc.ram"
    yield (b"\x01" + (2).to_bytes(4, "big") + b"\x03ram" + (0).to_bytes(4, "big")
           + (4).to_bytes(4, "big") + (size | 0x4).to_bytes(8, "big") + name
           + size.to_bytes(8, "big") + (0x10).to_bytes(8, "big") + b"\x7e" + (2).to_bytes(4, "big"))
    yield b"\x03" + (2).to_bytes(4, "big")
    first = True
    with open(raw, "rb") as fh:
        off = 0
        while off < size:
            data = np.frombuffer(fh.read(min(CHUNK, size - off)), np.uint8)
            pages = data.reshape(-1, PAGE)
            nonzero = pages.any(axis=1)
            out = bytearray()
            for i in range(pages.shape[0]):
                flags = (0x08 if nonzero[i] else 0x02) | (0 if first else 0x20)
                out += (off + i * PAGE | flags).to_bytes(8, "big")
                if first:
                    out += name
                    first = False
                out += pages[i].tobytes() if nonzero[i] else b"\0"
            yield bytes(out)
            off += data.size
    yield (0x10).to_bytes(8, "big") + b"\x7e" + (2).to_bytes(4, "big") + b"\x00"


def make_save(raw: str, out: str, fmt: str | None) -> None:
    size = os.path.getsize(raw) // PAGE * PAGE
    code, cmd = COMPRESS[fmt] if fmt else (0, None)
    head, _ = libvirt_head(code, size, name="bench", machine=MACHINE)
    with open(out, "wb") as fh:
        fh.write(head)
        fh.flush()
        if cmd is None:
            for piece in stream_chunks(raw, size):
                fh.write(piece)
            return
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fh)
        assert proc.stdin is not None
        for piece in stream_chunks(raw, size):
            proc.stdin.write(piece)
        proc.stdin.close()
        if proc.wait() != 0:
            raise SystemExit(f"{cmd[0]} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="raw memory image (e.g. from gen_image.py)")
    ap.add_argument("--detectors", default="pan,ssn")
    ap.add_argument("--compress", default="", help="comma list: gzip,bzip2,xz,lzop,zstd")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the save files go (default: tmp)")
    opts = ap.parse_args()
    engine = Engine(ScanConfig(detectors=detectors.select(opts.detectors), key=b"bench" * 8))
    size = os.path.getsize(opts.image) // PAGE * PAGE
    below = qemu_gpa.layout(MACHINE, [("pc.ram", size)]).pieces["pc.ram"][0].length
    t_raw, _, f_raw = timed(engine, opts.image, "raw", opts.repeat, count_open=True)
    print(f"raw          {size / t_raw / 1e6:8.0f} MB/s guest   {t_raw:6.2f} s   "
          f"{len(f_raw)} findings")
    expected = sorted((f.detector, f.gpa + (4 << 30) - below if f.gpa >= below else f.gpa)
                      for f in f_raw)
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        for fmt in [None] + [c for c in opts.compress.split(",") if c]:
            if fmt and shutil.which(COMPRESS[fmt][1][0]) is None:
                print(f"{fmt}: program not installed, skipped")
                continue
            out = os.path.join(tmp, f"bench-{fmt or 'raw'}.save")
            t0 = time.perf_counter()
            make_save(opts.image, out, fmt)
            made = time.perf_counter() - t0
            fsize = os.path.getsize(out)
            t, _, found = timed(engine, out, None, opts.repeat, count_open=True)
            same = sorted((f.detector, f.gpa) for f in found) == expected
            print(
                f"save {fmt or 'raw':7} {size / t / 1e6:8.0f} MB/s guest "
                f"{fsize / t / 1e6:8.0f} MB/s file   {t:6.2f} s   {100 * t_raw / t:5.1f}% of raw"
                f"   file {fsize / 1e6:.0f} MB (made in {made:.0f} s)"
                f"   findings {'identical' if same else 'DIFFER'}"
            )
            os.unlink(out)


if __name__ == "__main__":
    main()
