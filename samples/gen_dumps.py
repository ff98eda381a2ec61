#!/usr/bin/env python3
"""Generate small QEMU memory dumps with known content planted at known guest-physical
addresses (GPAs), for vmleak's ELF-core and kdump parsers.

It starts the real ``qemu-system-x86_64`` (TCG, paused with ``-S``, no guest OS: the bytes are
placed in guest RAM by ``-device loader,...,force-raw=on``), asks it over QMP for
``dump-guest-memory`` in ELF and kdump-zlib form, and turns the results into the other
variants with the real ``makedumpfile`` where it can (``-R`` reassembles a flattened kdump; a
plain ELF core it re-compresses with zlib/lzo/snappy/zstd when given a VMCOREINFO file).

Output (``samples/dumps/`` by default): each dump gzip-compressed (``*.gz``; mostly zero
pages, so a 64 MiB guest shrinks to a few KiB) plus ``manifest.json`` naming, for every
dump, its format, how it was made and every planted value with its GPA. Tests unpack the
dumps into a temporary directory and look for the planted values at those GPAs.

Usage: ``python3 samples/gen_dumps.py [--out DIR] [--keep-raw]``. Needs qemu-system-x86_64,
qemu-system-i386 and makedumpfile on PATH (Debian: qemu-system-x86, makedumpfile);
rerunnable, it overwrites, and the output is the same bytes each time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096


@dataclass(frozen=True)
class Plant:
    """A value placed at a guest-physical address (GPA, bytes)."""

    name: str
    gpa: int
    data: bytes


def noise(seed: str, size: int) -> bytes:
    """Deterministic incompressible bytes (SHA-256 in counter mode), so that some pages are
    stored raw by the kdump writers (compression would make them larger)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


def plants_low() -> list[Plant]:
    """Values below 16 MiB, for every guest: PANs, one straddling a page boundary (so a scanner
    must stitch two pages), an SSN, a UTF-16LE PAN, and an incompressible page with a marker."""
    return [
        Plant("pan_1mib", 0x100000, b"card=4111111111111111;exp=12/29"),
        Plant("pan_straddle", 0x200FF8, b"4012888888881881 straddles a page"),
        Plant("ssn", 0x345678, b"SSN 078-05-1120 (specimen)"),
        Plant("pan_utf16", 0x500010, "5555555555554444".encode("utf-16-le")),
        Plant("noise_page", 0x600000, noise("page", PAGE)),
        Plant("marker_end", 0x3FFF000 - 64, b"VMLEAK-MARKER-NEAR-64MIB-END"),
    ]


def plants_high() -> list[Plant]:
    """Values above the 4 GiB boundary (for a guest larger than 4 GiB)."""
    return [
        Plant("pan_above_4g", 0x140000000 + 0x1230, b"pan 4111111111111111 above 4G"),
        Plant("straddle_above_4g", 0x140001FFA, b"378282246310005 amex straddle"),
    ]


class Qmp:
    """Minimal QMP client over a unix socket (one command at a time, events skipped)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")

    def close(self) -> None:
        self.sock.close()


class Guest:
    """A paused TCG guest with ``plants`` loaded into its RAM."""

    def __init__(
        self, work: Path, machine: str, mem: str, plants: list[Plant], arch: str = "x86_64"
    ) -> None:
        self.work = work
        sock = str(work / f"qmp-{arch}-{machine}-{mem}.sock")
        args = [
            f"qemu-system-{arch}",
            "-machine", f"{machine},accel=tcg",
            "-m", mem,
            "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ]  # fmt: skip
        for p in plants:
            blob = work / f"plant-{p.name}.bin"
            blob.write_bytes(p.data)
            args += ["-device", f"loader,file={blob},addr={p.gpa:#x},force-raw=on"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            self.qmp = Qmp(sock)
        except Exception:
            self.proc.kill()
            raise

    def dump(self, path: Path, fmt: str, **extra: object) -> None:
        """``dump-guest-memory`` into ``path`` (synchronous; paging off: GPAs, not VAs)."""
        self.qmp.cmd(
            "dump-guest-memory", paging=False, protocol=f"file:{path}", format=fmt, **extra
        )

    def close(self) -> None:
        try:
            self.qmp.cmd("quit")
        except (RuntimeError, OSError):
            pass
        self.qmp.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def gz(src: Path, dst: Path) -> None:
    """Store ``src`` gzip-compressed (deterministic: no name or time in the gzip header)."""
    with open(src, "rb") as fin, open(dst, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as out:
            shutil.copyfileobj(fin, out, 1 << 20)


def entry(name: str, fmt: str, how: str, machine: str, mem: str, plants: list[Plant]) -> dict:
    return {
        "file": name + ".gz",
        "format": fmt,
        "made_by": how,
        "machine": machine,
        "memory": mem,
        "plants": [{"name": p.name, "gpa": p.gpa, "hex": p.data.hex()} for p in plants],
    }


def generate(out: Path, keep_raw: bool) -> list[dict]:
    """Run the guests and write every dump into ``out``; returns the manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    made: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vmleak-dumps-") as tmp:
        work = Path(tmp)

        def keep(raw: Path, name: str, fmt: str, how: str, machine: str, mem: str,
                 plants: list[Plant]) -> None:  # fmt: skip
            gz(raw, out / (name + ".gz"))
            if keep_raw:
                shutil.copyfile(raw, out / name)
            made.append(entry(name, fmt, how, machine, mem, plants))

        for machine in ("pc", "q35"):
            plants = plants_low()
            guest = Guest(work, machine, "64M", plants)
            try:
                elf = work / f"{machine}-64M.elf"
                guest.dump(elf, "elf")
                keep(elf, elf.name, "elf-core", "qemu dump-guest-memory format=elf",
                     machine, "64M", plants)  # fmt: skip
                flat = work / f"{machine}-64M.kdump-zlib.flat"
                guest.dump(flat, "kdump-zlib")
                keep(flat, flat.name, "kdump", "qemu dump-guest-memory format=kdump-zlib "
                     "(makedumpfile flattened)", machine, "64M", plants)  # fmt: skip
            finally:
                guest.close()
            if machine == "pc":
                plain = work / f"{machine}-64M.kdump-zlib"
                with open(flat, "rb") as fin:
                    subprocess.run(["makedumpfile", "-R", str(plain)], stdin=fin, check=True,
                                   stdout=subprocess.DEVNULL)  # fmt: skip
                keep(plain, plain.name, "kdump", "makedumpfile -R of the flattened "
                     "kdump-zlib dump (plain kdump)", machine, "64M", plants)  # fmt: skip
        # A 32-bit x86 guest: QEMU 7.2 still writes the 64-bit kdump header layout but puts
        # "i686" in its utsname machine field (a reader must not trust that hint blindly).
        plants = plants_low()
        guest = Guest(work, "pc", "64M", plants, arch="i386")
        try:
            flat = work / "i386-pc-64M.kdump-zlib.flat"
            guest.dump(flat, "kdump-zlib")
            keep(flat, flat.name, "kdump", "qemu-system-i386 dump-guest-memory "
                 "format=kdump-zlib (makedumpfile flattened)", "pc", "64M", plants)  # fmt: skip
        finally:
            guest.close()
        # Guests larger than 4 GiB (RAM above the 4 GiB boundary). The ELF dumps are
        # filtered to a window around the planted values so the files stay small; the kdump
        # one holds all 5 GiB (zero pages share one stored page; gzip shrinks the rest).
        for machine in ("pc", "q35"):
            plants = plants_high()
            guest = Guest(work, machine, "5G", plants)
            try:
                elf = work / f"{machine}-5G-filtered.elf"
                guest.dump(elf, "elf", begin=0x140000000, length=0x10000)
                keep(elf, elf.name, "elf-core", "qemu dump-guest-memory format=elf "
                     "begin=0x140000000 length=0x10000", machine, "5G", plants)  # fmt: skip
                if machine == "q35":
                    flat = work / f"{machine}-5G.kdump-zlib.flat"
                    guest.dump(flat, "kdump-zlib")
                    keep(flat, flat.name, "kdump", "qemu dump-guest-memory format=kdump-zlib "
                         "(makedumpfile flattened)", machine, "5G", plants)  # fmt: skip
            finally:
                guest.close()
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dumps")
    ap.add_argument("--keep-raw", action="store_true", help="also keep the uncompressed dumps")
    args = ap.parse_args()
    for tool in ("qemu-system-x86_64", "qemu-system-i386", "makedumpfile"):
        if shutil.which(tool) is None:
            print(f"gen_dumps: {tool} not found on PATH", file=sys.stderr)
            return 2
    made = generate(args.out, args.keep_raw)
    manifest = {
        "generator": "samples/gen_dumps.py",
        "qemu": subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],  # fmt: skip
        "dumps": made,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum((args.out / d["file"]).stat().st_size for d in made)
    print(f"wrote {len(made)} dumps ({total} bytes gzip) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
