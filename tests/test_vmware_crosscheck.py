"""Every checkpoint the test writer makes is read by an independent reader too, with identical
bytes at a sample of GPAs: volatility3's VmwareLayer (.vmem + checkpoint) and LeechCore's
file device (.vmem + checkpoint; memory embedded in a .vmsn). Which reader accepts which
variant is ``docs/formats.md`` §13 (observed against the real tools); a variant no available
reader accepts is skipped with the reason. padsize is cross-checked through the embedded
Memory block (padded to a page boundary); a padded block before the region tags has no
independent reader (volatility3 ignores padsize, LeechCore assumes 4-byte memory-group values,
crash needs a kernel), so test_vmware.py covers it against the writer alone."""

from __future__ import annotations

import contextlib
import random

import pytest

from parsers import registry, vmware
from tests import vmware_writer as w

MiB = 1 << 20

# docs/formats.md §13: magics each reader accepts.
VOL3_MAGICS = {w.MAGIC_V0, w.MAGIC_RESTORED, w.MAGIC_CURRENT, w.MAGIC_PARTIAL}
LEECH_MAGICS = {w.MAGIC_CURRENT, w.MAGIC_PARTIAL, w.MAGIC_RESTORED}
CRASH_REASON = (
    "crash reads VMware checkpoints (magics BED2BED2/BED3BED3/BAD1BAD1/BAD2BAD2, embedded "
    "memory included) but only with the guest kernel's vmlinux as NAMELIST; synthetic memory "
    "has no kernel, so crash cannot serve as a byte reader here"
)
LEECH_MIN_FILE = 16 * MiB  # device_file.c refuses smaller files
LEECH_INLINE_MIN = 0x10000000  # .vmsn must exceed 256 MiB for its inline-memory heuristic


def _samples(regions: list[w.Region], seed: int) -> dict[int, bytes]:
    """Distinct 32-byte tokens at each region's first and last bytes, right around every
    page boundary of the region edges, and at random GPAs inside the regions."""
    rng = random.Random(seed)
    gpas = []
    for r in regions:
        start, end = r.ppn * w.PAGE, (r.ppn + r.pages) * w.PAGE
        gpas += [start, end - 32, start + w.PAGE - 16, end - w.PAGE - 16]
        gpas += [rng.randrange(start, end - 32) for _ in range(12)]
    out: dict[int, bytes] = {}
    for g in sorted(set(gpas)):
        if all(abs(g - o) >= 32 for o in out):
            out[g] = rng.randbytes(32)
    return out


def _vol3_reader(vmem: str, checkpoint: str):
    """volatility3's VmwareLayer over the pair (callers request the ``vol3`` fixture)."""
    from pathlib import Path

    from volatility3.framework import contexts
    from volatility3.framework.layers import physical, vmware

    ctx = contexts.Context()
    ctx.config["base.location"] = Path(vmem).as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["meta.location"] = Path(checkpoint).as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "meta", "meta"))
    ctx.config["vmw.base_layer"] = "base"
    ctx.config["vmw.meta_layer"] = "meta"
    layer = vmware.VmwareLayer(ctx, "vmw", "vmw")
    return layer.read


@contextlib.contextmanager
def _leech_reader(leechcore, path: str):
    """LeechCore reads whole pages only; return a reader of any (GPA, length)."""
    lc = leechcore.LeechCore("file://" + path)
    try:

        def read(gpa: int, n: int) -> bytes:
            first = gpa & ~(w.PAGE - 1)
            last = (gpa + n + w.PAGE - 1) & ~(w.PAGE - 1)
            return lc.read(first, last - first)[gpa - first : gpa - first + n]

        yield read
    finally:
        lc.close()


def _compare(image_path: str, samples: dict[int, bytes], other_read, read_present) -> None:
    with registry.open_image(image_path) as image:
        for gpa, token in samples.items():
            ours = read_present(image, gpa, len(token))
            theirs = other_read(gpa, len(token))
            assert ours == token, hex(gpa)
            assert theirs == ours, hex(gpa)


def _separate(tmp_path, magic: int, ext: str, size: int):
    low = size // w.PAGE * 3 // 4
    regions = w.pci_hole_layout(low, size // w.PAGE - low)
    samples = _samples(regions, magic ^ len(ext))
    out = w.make_vm(
        tmp_path,
        "vm-Snapshot1",
        memory_size=size,
        plants=samples,
        regions=regions,
        magic=magic,
        ext=ext,
    )
    return out, samples


@pytest.mark.parametrize("ext", [".vmss", ".vmsn"])
@pytest.mark.parametrize("magic", w.ALL_MAGICS, ids=hex)
def test_volatility3_reads_the_same_bytes(tmp_path, magic, ext, read_present, vol3):
    if magic not in VOL3_MAGICS:
        pytest.skip(f"volatility3 refuses magic {magic:#x} (docs/formats.md §13)")
    out, samples = _separate(tmp_path, magic, ext, 4 * MiB)
    read = _vol3_reader(out["vmem"], out["checkpoint"])
    for path in (out["checkpoint"], out["vmem"]):
        _compare(path, samples, read, read_present)


@pytest.mark.parametrize("ext", [".vmss", ".vmsn"])
@pytest.mark.parametrize("magic", w.ALL_MAGICS, ids=hex)
def test_leechcore_reads_the_same_bytes(tmp_path, magic, ext, read_present, leechcore):
    if magic not in LEECH_MAGICS:
        pytest.skip(f"LeechCore refuses magic {magic:#x} and reads the .vmem flat "
                    "(docs/formats.md §13)")
    out, samples = _separate(tmp_path, magic, ext, LEECH_MIN_FILE)
    with _leech_reader(leechcore, out["vmem"]) as read:
        _compare(out["vmem"], samples, read, read_present)


@pytest.mark.parametrize("magic", w.ALL_MAGICS, ids=hex)
def test_embedded_memory_leechcore_reads_the_same_bytes(tmp_path, magic, read_present,
                                                        leechcore):
    if magic not in LEECH_MAGICS:
        pytest.skip(
            f"embedded memory with magic {magic:#x}: volatility3 never reads embedded memory, "
            f"LeechCore refuses this magic; {CRASH_REASON}"
        )
    size = 256 * MiB  # sparse; LeechCore only looks for inline memory in a .vmsn > 256 MiB
    regions = w.pci_hole_layout(0xC000, 0x4000)
    samples = _samples(regions, magic)
    out = w.make_vm(
        tmp_path,
        "old-Snapshot3",
        memory_size=size,
        plants=samples,
        regions=regions,
        magic=magic,
        ext=".vmsn",
        embedded=True,
    )
    assert w.os.path.getsize(out["checkpoint"]) > LEECH_INLINE_MIN
    # the Memory block is padded (padsize) to page-align its data, as LeechCore expects: so
    # this also cross-checks that padsize is honoured
    block = vmware.read_checkpoint(out["checkpoint"]).memory_block()
    head_end = block.offset + 2 + len("Memory") + 2 * 4 + 8 + 8 + 2
    assert block.data_offset - head_end > 0
    with _leech_reader(leechcore, out["checkpoint"]) as read:
        _compare(out["checkpoint"], samples, read, read_present)
