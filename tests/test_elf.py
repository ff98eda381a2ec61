"""ELF core parser: real QEMU dumps (samples/dumps) and written variants."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import elf, registry
from parsers.base import Extents, ImageError
from tests.dumpwriter import Load, elf_note, write_elf
from tests.samples import dump_sample, dumps_of, planted_pans


def guest(ext: Extents) -> Extents:
    """The extents of ``ext`` in guest-physical memory (not the file's other regions)."""
    k = ext.space == 0
    return Extents(ext.buf_offset[k], ext.addr[k], ext.length[k], ext.file_offset[k], k[k] * 0)


@pytest.mark.parametrize("entry", dumps_of("elf-core"), ids=lambda d: d["file"])
def test_real_qemu_elf_planted_values_at_their_gpas(entry: dict, tmp_path: Path,
                                                    read_ranges) -> None:
    path = dump_sample(entry["file"], tmp_path)
    with registry.open_image(str(path)) as image:
        assert image.format == "elf-core"
        assert image.random_access and not image.warnings
        assert image.meta["vcpus"] == 1
        plants = entry["plants"]
        got = read_ranges(image, [(p["gpa"], len(p["hex"]) // 2) for p in plants])
        for p, data in zip(plants, got, strict=True):
            assert data == bytes.fromhex(p["hex"]), p["name"]
        ext = image.fixed_segments[0].extents
        # Zero copy: every extent's buffer offset is its file offset.
        assert (ext.buf_offset == ext.file_offset).all()


def test_real_qemu_elf_ram_size_and_layout(tmp_path: Path) -> None:
    entry = next(d for d in dumps_of("elf-core") if d["memory"] == "64M")
    path = dump_sample(entry["file"], tmp_path)
    with registry.open_image(str(path)) as image:
        ext = guest(image.fixed_segments[0].extents)
        # 64 MiB of RAM from GPA 0 (one coalesced extent) plus the BIOS ROM below 4 GiB.
        assert ext.addr[0] == 0 and ext.length[0] == 64 << 20
        assert ext.addr[-1] + ext.length[-1] == 1 << 32


PAGE_A = b"A" * 4096
PAGE_B = bytes(range(256)) * 16


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("order", ["<", ">"])
def test_written_classes_and_byte_orders(tmp_path: Path, bits: int, order: str,
                                         read_ranges) -> None:
    path = tmp_path / "core"
    vmci = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n"
    notes = elf_note(b"CORE", 1, b"\0" * 16, order) * 2 + elf_note(b"VMCOREINFO", 0, vmci, order)
    write_elf(str(path), [Load(0x1000, PAGE_A), Load(0x9000, PAGE_B)], bits=bits,
              order=order, notes=notes)  # fmt: skip
    with registry.open_image(str(path)) as image:
        assert image.meta["elf_class"] == bits
        assert image.meta["vcpus"] == 2
        assert image.meta["guest_os_release"] == "6.1.0-test"
        assert read_ranges(image, [(0x1000, 4096), (0x9000, 4096)]) == [PAGE_A, PAGE_B]


def test_pn_xnum_many_program_headers(tmp_path: Path, read_ranges) -> None:
    path = tmp_path / "core"
    loads = [Load(i * 0x1000, i.to_bytes(4, "little") * 4) for i in range(70000)]
    write_elf(str(path), loads, xnum=True)
    with registry.open_image(str(path)) as image:
        assert image.meta["pt_load"] == 70000
        assert read_ranges(image, [(69999 * 0x1000, 4)]) == [(69999).to_bytes(4, "little")]


def test_partial_unstored_and_duplicate_loads(tmp_path: Path, read_ranges) -> None:
    path = tmp_path / "core"
    loads = [
        Load(0x10000, PAGE_A, memsz=3 * 4096),  # only the first page stored
        Load(0x20000, None, memsz=4096),  # outside a dump filter: p_offset = -1
        Load(0x40000, PAGE_B, vaddr=0xFFFF0000),  # paging dump: two virtual mappings
        Load(0x40000, PAGE_B, vaddr=0xFFFF8000),  # of the same physical page
        Load(0x40800, PAGE_B[:2048] * 2),  # overlaps the second half of it
    ]
    write_elf(str(path), loads)
    with registry.open_image(str(path)) as image:
        assert image.meta["not_stored_bytes"] == 2 * 4096 + 4096
        ext = image.fixed_segments[0].extents
        assert guest(ext).total() == 4096 + 4096 + 2048  # each physical byte kept once
        assert read_ranges(image, [(0x10000, 4096), (0x40000, 4096)]) == [PAGE_A, PAGE_B]
        assert read_ranges(image, [(0x11000, 1), (0x20000, 1)]) == [None, None]


def test_truncated_load_is_a_warning_and_the_rest_is_read(tmp_path: Path, read_ranges) -> None:
    path = tmp_path / "core"
    write_elf(str(path), [Load(0, PAGE_A), Load(0x5000, PAGE_B)])
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with registry.open_image(str(path)) as image:
        cause, loss = image.warnings  # what went wrong, then what it cost
        assert "truncated" in str(cause)
        assert "declares 8,192 bytes, 7,192 bytes read" in str(loss)
        assert read_ranges(image, [(0, 4096), (0x5000, 3096)]) == [PAGE_A, PAGE_B[:3096]]


def test_not_a_core_and_no_loads(tmp_path: Path) -> None:
    path = tmp_path / "core"
    write_elf(str(path), [])
    with elf.open_image(str(path), "elf-core", {}) as image:  # scanned, without any GPA
        assert "no PT_LOAD" in str(image.warnings[0])
        assert "no guest memory" in str(image.warnings[-1])
        assert guest(image.fixed_segments[0].extents).total() == 0
    exe = bytearray(path.read_bytes())
    exe[16] = 2  # ET_EXEC
    path.write_bytes(bytes(exe))
    assert elf.probe(bytes(exe[:4096]), str(path)) is None
    with pytest.raises(ImageError, match="not a core"):
        elf.open_image(str(path), "elf-core", {})


def test_absurd_phnum_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "core"
    write_elf(str(path), [Load(0, PAGE_A)], xnum=True)
    data = bytearray(path.read_bytes())
    shoff = int.from_bytes(data[40:48], "little")
    data[shoff + 44 : shoff + 48] = (0xFFFFFFFF).to_bytes(4, "little")  # sh_info: 4 G headers
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="program headers") as err:
        elf.open_image(str(path), "elf-core", {})
    assert str(err.value).startswith(str(path))


def _base_core(tmp: Path, bits: int, order: str, xnum: bool) -> bytes:
    path = tmp / "base"
    notes = elf_note(b"CORE", 1, b"\0" * 16, order)
    loads = [Load(0, PAGE_A), Load(0x3000, None, 4096), Load(0x8000, PAGE_B)]
    write_elf(str(path), loads, notes=notes, bits=bits, order=order, xnum=xnum)
    return path.read_bytes()


@settings(max_examples=100)
@given(data=st.data())
def test_corrupted_cores_fail_cleanly(tmp_path: Path, data: st.DataObject, drain) -> None:
    bits = data.draw(st.sampled_from([32, 64]))
    order = data.draw(st.sampled_from(["<", ">"]))
    base = _base_core(tmp_path, bits, order, xnum=data.draw(st.booleans()))
    blob = bytearray(base)
    cut = data.draw(st.integers(0, len(blob)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
    for pos, val in flips:
        if pos < len(blob):
            blob[pos] = val
    path = tmp_path / "fuzzed"
    path.write_bytes(bytes(blob[:cut]))
    drain(str(path), "elf-core", peak=64 << 20)


@pytest.mark.parametrize("entry", dumps_of("elf-core"), ids=lambda d: d["file"])
def test_scan_real_elf_finds_planted_pans_once_at_their_gpas(entry: dict, tmp_path: Path,
                                                             scan) -> None:
    path = dump_sample(entry["file"], tmp_path)
    found = [(f.gpa, f.encoding) for f in scan(str(path), chunk_size=64 * 1024)]
    assert sorted(found) == sorted(planted_pans(entry["plants"]))


def test_process_core_without_physical_addresses(tmp_path: Path, read_ranges) -> None:
    path = tmp_path / "core"
    loads = [Load(0, PAGE_A, vaddr=0x400000), Load(0, PAGE_B, vaddr=0x7FFF0000)]
    write_elf(str(path), loads)
    with registry.open_image(str(path)) as image:
        space = image.spaces.index("virtual")
        assert read_ranges(image, [(0x7FFF0000, 4096)], space=space) == [PAGE_B]
        assert read_ranges(image, [(0, 1)]) == [None]
        assert "virtual" in str(image.warnings[0])


def test_ram_size_counts_each_physical_byte_once(tmp_path: Path) -> None:
    path = tmp_path / "core"
    loads = [
        Load(0x40000, PAGE_B, vaddr=0xFFFF0000),
        Load(0x40000, PAGE_B, vaddr=0xFFFF8000),
        Load(0x40800, PAGE_B),
        Load(0x90000, None, memsz=8192),
    ]
    write_elf(str(path), loads)
    with registry.open_image(str(path)) as image:
        assert image.meta["ram_size"] == 4096 + 2048 + 8192
