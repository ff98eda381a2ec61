"""vmleak's volatility3 layer (scanner/vol3/layer.py) against volatility3's own readers: on real
QEMU ELF cores it reads what volatility3's ELF layer reads, on every other fixture what
``vmleak extract`` writes; addresses the image does not hold are invalid; volatility3's stacker
picks it (or leaves flat memory alone); vmleak.Scan on a layer vmleak did not make."""

from __future__ import annotations

import gzip
import json
import lzma
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("volatility3", reason="volatility3 not installed: pip install 'vmleak[vol3]'",
                    exc_type=ImportError)

from volatility3.framework import contexts, exceptions  # noqa: E402
from volatility3.framework.layers import elf, physical  # noqa: E402

from scanner.vol3.layer import VmleakLayer, VmleakStacker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QEMU = ROOT / "samples" / "qemu"
DUMPS = ROOT / "samples" / "dumps"
PAGE = 4096


def unpack(src: Path, tmp: Path) -> Path:
    if src.suffix not in (".xz", ".gz"):
        return src
    out = tmp / src.stem
    opener = lzma.open if src.suffix == ".xz" else gzip.open
    with opener(src) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return out


def file_layer(path: Path) -> tuple[contexts.Context, str]:
    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
    return ctx, "base"


def stacked(path: Path) -> VmleakLayer | None:
    ctx, base = file_layer(path)
    return VmleakStacker.stack(ctx, base)


def samples(layer, rng: random.Random, n: int = 200) -> list[tuple[int, int]]:
    """(GPA, length) reads: random ones inside the layer's range, some across page edges."""
    top = layer.maximum_address + 1
    out = []
    for _ in range(n):
        a = rng.randrange(0, top)
        if rng.random() < 0.3:
            a = (a // PAGE) * PAGE + PAGE - rng.randrange(1, 64)
        out.append((a, rng.randrange(1, 300)))
    return out


@pytest.mark.parametrize("name", ["pc-64M.elf.gz", "q35-64M.elf.gz"])
def test_same_bytes_as_volatility3s_elf_layer(tmp_path: Path, name: str) -> None:
    path = unpack(DUMPS / name, tmp_path)
    ours = stacked(path)
    assert ours is not None
    ctx, base = file_layer(path)
    ctx.config["theirs.base_layer"] = base
    theirs = elf.Elf64Layer(ctx, "theirs", "theirs")
    assert ours.maximum_address == theirs.maximum_address
    for gpa, n in samples(theirs, random.Random(name)):
        valid = theirs.is_valid(gpa, n)
        assert ours.is_valid(gpa, n) == valid, hex(gpa)
        if valid:
            assert ours.read(gpa, n) == theirs.read(gpa, n), hex(gpa)
        assert ours.read(gpa, n, pad=True) == theirs.read(gpa, n, pad=True), hex(gpa)


@pytest.mark.parametrize(
    "src", [QEMU / "pc-64m.qevm", QEMU / "libvirt-gzip.save", QEMU / "savevm.qcow2.xz",
            QEMU / "q35-5g.qevm.xz", DUMPS / "pc-64M.kdump-zlib.flat.gz"],
    ids=lambda p: p.name,
)
def test_same_bytes_as_extract(tmp_path: Path, src: Path) -> None:
    """Every stored byte as ``vmleak extract`` writes it (independent: a flat file read by
    volatility3's FileLayer); declared RAM the stream did not store reads as zeros."""
    path = unpack(src, tmp_path)
    flat = tmp_path / "flat.raw"
    done = subprocess.run([sys.executable, "-m", "scanner", "extract", str(path), "-o", str(flat)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    ours = stacked(path)
    assert ours is not None
    ctx, base = file_layer(flat)
    raw = ctx.layers[base]
    rng = random.Random(src.name)
    stored = list(ours.memory.ranges(0, ours.maximum_address + 1))
    checked = 0
    for _ in range(300):  # reads inside what the image holds (dumps of idle guests are sparse)
        start, length = rng.choice(stored)
        gpa = rng.randrange(start, start + length)
        n = min(rng.randrange(1, 300), start + length - gpa)
        if gpa + n <= raw.maximum_address + 1:
            assert ours.is_valid(gpa, n)
            assert ours.read(gpa, n) == raw.read(gpa, n), hex(gpa)
            checked += 1
    assert checked > 100


def test_holes_are_invalid(tmp_path: Path) -> None:
    """A 5 GiB q35 guest: RAM below 2 GiB and from 4 GiB; the PCI hole between is not
    memory — invalid, as in volatility3's own layers; padded reads give zeros there."""
    ours = stacked(unpack(QEMU / "q35-5g.qevm.xz", tmp_path))
    assert ours is not None
    hole = 3 << 30
    assert not ours.is_valid(hole, 1)
    with pytest.raises(exceptions.InvalidAddressException):
        ours.read(hole - 8, 16)
    assert ours.read(hole, 16, pad=True) == bytes(16)
    assert ours.is_valid(4 << 30, PAGE) and ours.is_valid(0x100000, PAGE)
    assert ours.maximum_address == (4 << 30) + (3 << 30) - 1
    with pytest.raises(exceptions.LayerException):
        ours.write(0, b"x")


def test_flat_memory_is_left_to_volatility3(tmp_path: Path) -> None:
    flat = tmp_path / "flat.raw"
    flat.write_bytes(bytes(8 * PAGE))
    assert stacked(flat) is None


def test_scan_plugin_on_a_layer_vmleak_did_not_make(tmp_path: Path) -> None:
    """vmleak.Scan over a flat raw file (volatility3's own FileLayer) finds the planted card
    numbers of the guest with the fingerprints ``vmleak scan`` gives the save."""
    save = QEMU / "libvirt-raw.save"
    flat = tmp_path / "guest.raw"
    env = {"VMLEAK_FINGERPRINT_KEY": "test-key", "PATH": "/usr/bin:/bin",
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    subprocess.run([sys.executable, "-m", "scanner", "extract", str(save), "-o", str(flat)],
                   check=True, capture_output=True, cwd=ROOT)
    scan = subprocess.run([sys.executable, "-m", "scanner", "scan", "--format", "jsonl",
                           "--detectors", "pan", str(save)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    want = {(json.loads(x)["gpa"], json.loads(x)["fingerprint"]) for x in scan.stdout.split("\n")
            if x}
    from scanner.vol3 import PLUGIN_DIR

    code = "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "-q", "--offline", "-r", "json", "-p",
                           str(PLUGIN_DIR), "-f", str(flat), "vmleak.Scan", "--detectors", "pan"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout[done.stdout.index("[") :])
    assert want and {(r["Physical address"], r["Fingerprint"]) for r in rows} == want


def test_vmware_embedded_memory_opens(tmp_path: Path) -> None:
    """A .vmsn with its memory inside (volatility3 alone reads only a .vmem beside its
    checkpoint): the planted bytes at their GPAs on both sides of the PCI hole."""
    from tests import vmware_writer as w

    regions = w.pci_hole_layout(0x400, 0x100)  # 4 MiB below the hole, 1 MiB from 4 GiB
    plants = {0x1234: b"below the hole", (0x100000 << 12) + 0x80: b"above the hole"}
    out = w.make_vm(tmp_path, "vm-Snapshot1", memory_size=5 << 20, plants=plants,
                    regions=regions, ext=".vmsn", embedded=True)
    ours = stacked(Path(out["checkpoint"]))
    assert ours is not None and ours.metadata["vmleak_format"] == "vmware-vmsn"
    for gpa, text in plants.items():
        assert ours.read(gpa, len(text)) == text
    assert not ours.is_valid(0x400 << 12, 1)  # the hole
