"""The committed real fixtures (``samples/``): their manifests (what was planted where) and
their unpacking into a test's temporary directory. Generators: samples/gen_qemu.py and
samples/gen_dumps.py (samples/README.md)."""

from __future__ import annotations

import gzip
import json
import lzma
import re
import shutil
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
QEMU_DIR = SAMPLES / "qemu"
DUMPS_DIR = SAMPLES / "dumps"
# samples/qemu: file name -> {kind, machine, ram_size, compression, plants: [{gpa, text}]...}
QEMU_MANIFEST: dict = json.loads((QEMU_DIR / "manifest.json").read_text())
# samples/dumps: {"dumps": [{file, format, machine, plants: [{name, gpa, hex}]...}]}
DUMPS_MANIFEST: dict = json.loads((DUMPS_DIR / "manifest.json").read_text())


def _unpack(src: Path, out: Path, opener) -> Path:
    if not out.exists():
        with opener(src) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return out


def qemu_sample(name: str, tmp: Path) -> Path:
    """The QEMU/libvirt fixture ``name``, unpacked into ``tmp`` when it is stored xz-compressed."""
    if not name.endswith(".xz"):
        return QEMU_DIR / name
    return _unpack(QEMU_DIR / name, tmp / name.removesuffix(".xz"), lzma.open)


def dump_entry(name: str) -> dict:
    """The manifest entry of dump ``name``."""
    return next(d for d in DUMPS_MANIFEST["dumps"] if d["file"] == name)


def dumps_of(fmt: str) -> list[dict]:
    """Manifest entries of the dumps in format ``fmt`` (``elf-core``, ``kdump``)."""
    return [d for d in DUMPS_MANIFEST["dumps"] if d["format"] == fmt]


def dump_sample(name: str, tmp: Path) -> Path:
    """The dump fixture ``name`` (stored gzip-compressed), unpacked into ``tmp``."""
    return _unpack(DUMPS_DIR / name, tmp / name.removesuffix(".gz"), gzip.open)


def pan_gpas(plants: list[dict]) -> list[int]:
    """GPA of the card number inside each planted text of a QEMU fixture."""
    out = []
    for p in plants:
        m = re.search(r"\d{13,19}", p["text"])
        assert m is not None
        out.append(p["gpa"] + m.start())
    return sorted(out)


def planted_pans(plants: list[dict]) -> set[tuple[int, str]]:
    """(GPA, encoding) of every 13-19 digit run in the planted values of a dump fixture
    (ASCII and UTF-16LE), i.e. where a PAN detector must report them."""
    out = set()
    for p in plants:
        data = bytes.fromhex(p["hex"])
        for m in re.finditer(rb"(?<![0-9])[0-9]{13,19}(?![0-9])", data):
            out.add((p["gpa"] + m.start(), "ascii"))
        for m in re.finditer(rb"(?<![0-9]\0)(?:[0-9]\0){13,19}(?![0-9]\0)", data):
            out.add((p["gpa"] + m.start(), "utf-16le"))
    return out
