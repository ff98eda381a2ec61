"""The same images read by independent readers and by our parsers, compared byte for byte at
a sample of GPAs: volatility3's ELF layer (QEMU ELF cores, real and written), its LiME layer
(parsers/lime.py), LeechCore's file device (ELF cores), and, for kdump (which neither reads),
volatility3's reading of the ELF core QEMU dumped from the very same guest."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from parsers import registry
from tests.dumpwriter import Load, write_elf
from tests.samples import dump_entry, dump_sample, dumps_of

PAGE = 4096


def vol3_layer(path: Path, kind: str):
    """A volatility3 layer of ``kind`` ("elf" or "lime") over ``path``, built the way its
    automagic does: a context, a FileLayer named in the config by file:// URI, the layer.
    (Callers request the ``vol3`` fixture, which skips when volatility3 cannot load.)"""
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, lime, physical

    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["top.base_layer"] = "base"
    cls = elf.Elf64Layer if kind == "elf" else lime.LimeLayer
    layer = cls(ctx, "top", "top")
    ctx.layers.add_layer(layer)
    return layer


def sample_ranges(spans: list[tuple[int, int]], plants: list[dict], seed: int) -> list:
    """(GPA, length) ranges: the planted values, both sides of span edges and of page
    boundaries, and random places inside the spans (GPA, length) given."""
    rng = random.Random(seed)
    out = [(p["gpa"], len(p["hex"]) // 2) for p in plants]
    for start, length in spans:
        end = start + length
        out += [(start, min(64, length)), (max(start, end - 64), min(64, length))]
        for _ in range(24):
            g = rng.randrange(start, end)
            out.append((g, min(96, end - g)))
        if length > 2 * PAGE:
            b = rng.randrange(start // PAGE + 1, end // PAGE) * PAGE
            out.append((b - 40, 80))
    return out


def vol3_spans(layer) -> list[tuple[int, int]]:
    return [(m[0], m[1]) for m in layer.mapping(0, layer.maximum_address + 1, ignore_errors=True)]


@pytest.mark.parametrize("name", [d["file"] for d in dumps_of("elf-core")])
def test_real_elf_against_volatility3(tmp_path: Path, name: str, read_ranges, vol3) -> None:
    path, entry = dump_sample(name, tmp_path), dump_entry(name)
    layer = vol3_layer(path, "elf")
    spans = vol3_spans(layer)
    ranges = sample_ranges(spans, entry["plants"], seed=len(name))
    with registry.open_image(str(path)) as image:
        ours = read_ranges(image, ranges)
        assert image.guest_bytes(image.fixed_segments[0].extents) == sum(n for _, n in spans)
    for (gpa, n), mine in zip(ranges, ours, strict=True):
        assert mine == layer.read(gpa, n), hex(gpa)


def test_written_elf_against_volatility3(tmp_path: Path, read_ranges, vol3) -> None:
    rng = random.Random(5)
    layout = [(0, 0xA0000), (0x100000, 0x53000), (0x2000_0000, 0x3000), (1 << 32, 0x8000)]
    loads = [Load(g, rng.randbytes(n)) for g, n in layout]
    path = tmp_path / "core"
    write_elf(str(path), loads)
    layer = vol3_layer(path, "elf")
    spans = [(ld.paddr, len(ld.data)) for ld in loads]
    assert sorted(vol3_spans(layer)) == spans
    ranges = sample_ranges(spans, [], seed=1)
    with registry.open_image(str(path)) as image:
        ours = read_ranges(image, ranges)
    assert ours == [layer.read(g, n) for g, n in ranges]


def write_lime(path: Path, ranges: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as fh:
        for start, data in ranges:
            fh.write(struct.pack("<IIQQ8x", 0x4C694D45, 1, start, start + len(data) - 1))
            fh.write(data)


def test_lime_against_volatility3(tmp_path: Path, read_ranges, vol3) -> None:
    rng = random.Random(9)
    parts = [(0x1000, rng.randbytes(0x9F000)), (0x100000, rng.randbytes(0x200000)),
             (0x1_0000_0000, rng.randbytes(0x5000))]  # fmt: skip
    path = tmp_path / "mem.lime"
    write_lime(path, parts)
    layer = vol3_layer(path, "lime")
    spans = [(s, len(d)) for s, d in parts]
    ranges = sample_ranges(spans, [], seed=2)
    with registry.open_image(str(path)) as image:
        assert image.format == "lime"
        ours = read_ranges(image, ranges)
    assert ours == [layer.read(g, n) for g, n in ranges]


def test_real_elf_against_leechcore(tmp_path: Path, read_ranges, leechcore) -> None:
    name = "pc-64M.elf.gz"
    path, entry = dump_sample(name, tmp_path), dump_entry(name)
    with registry.open_image(str(path)) as image:
        ext = image.fixed_segments[0].extents
        gpa = ext.space == 0  # the file's region:* extents have no GPA
        spans = list(zip(ext.addr[gpa].tolist(), ext.length[gpa].tolist(), strict=True))
        ranges = sample_ranges(spans, entry["plants"], seed=3)
        ours = read_ranges(image, ranges)
    lc = leechcore.LeechCore("file://" + str(path))
    try:
        for (gpa, n), mine in zip(ranges, ours, strict=True):
            first = gpa & ~(PAGE - 1)
            last = (gpa + n + PAGE - 1) & ~(PAGE - 1)
            assert mine == lc.read(first, last - first)[gpa - first : gpa - first + n], hex(gpa)
    finally:
        lc.close()


@pytest.mark.parametrize("name", ["pc-64M.kdump-zlib.gz", "pc-64M.kdump-zlib.flat.gz"])
def test_kdump_against_volatility3_on_the_same_guests_elf(tmp_path: Path, name: str, read_ranges,
                                                          vol3) -> None:
    """QEMU dumped one guest both ways: our kdump reading must equal volatility3's reading
    of the ELF core at every sampled GPA (kdump pages we skip must be all-zero there)."""
    elf_path = dump_sample("pc-64M.elf.gz", tmp_path)
    path, entry = dump_sample(name, tmp_path), dump_entry(name)
    layer = vol3_layer(elf_path, "elf")
    ranges = []  # split at page boundaries: a skipped zero page is skipped whole
    for gpa, n in sample_ranges(vol3_spans(layer), entry["plants"], seed=4):
        while n:
            take = min(n, PAGE - gpa % PAGE)
            ranges.append((gpa, take))
            gpa, n = gpa + take, n - take
    with registry.open_image(str(path)) as image:
        ours = read_ranges(image, ranges)
    compared = 0
    for (gpa, n), mine in zip(ranges, ours, strict=True):
        theirs = layer.read(gpa, n)
        if mine is None:
            mine = bytes(n)  # zero pages are not materialised by the kdump parser
        compared += any(theirs)
        assert mine == theirs, hex(gpa)
    assert compared >= len(entry["plants"])


def test_extract_output_opens_in_volatility3(tmp_path: Path, vmleak, vol3) -> None:
    """`vmleak extract` of a real QEMU ELF dump: volatility3 reads the flat raw file it writes
    (a FileLayer, GPA = file offset) with the same bytes as the dump's own ELF layer."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    name = dumps_of("elf-core")[0]["file"]
    path, entry = dump_sample(name, tmp_path), dump_entry(name)
    flat = tmp_path / "guest.raw"
    done = vmleak("extract", str(path), "-o", str(flat))
    assert done.returncode == 0, done.stderr
    elf = vol3_layer(path, "elf")
    ctx = contexts.Context()
    ctx.config["raw.location"] = flat.as_uri()
    raw = physical.FileLayer(ctx, "raw", "raw")
    for gpa, n in sample_ranges(vol3_spans(elf), entry["plants"], seed=7):
        assert raw.read(gpa, n) == elf.read(gpa, n), hex(gpa)
