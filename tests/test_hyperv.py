"""Hyper-V saved states: .vmrs (every reading of the disputed layout facts, Gen 1 / Gen 2
memory runs, every page tag, XPRESS and LZNT1 pages), legacy .bin + .vsv, extract, and hostile
files (hypothesis). Fixtures come from ``tests/hyperv_writer.py`` (no Hyper-V runs here); its
test-only compressors are checked against libfwnt, an independent decoder."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers import hyperv, registry
from parsers.base import ImageError
from tests import hyperv_writer as hw
from tests.plant import luhn_digit

pyfwnt = pytest.importorskip("pyfwnt", exc_type=ImportError)

PAGE = hw.PAGE
GEN1 = [(0, 0xA0), (0x100, 0x160), (0x100000, 0x90)]  # 640 KiB, RAM from 1 MiB, RAM from 4 GiB
GEN2 = [(0, 0x180), (0x100000, 0x40)]  # UEFI: one low run, the rest from 4 GiB
ALL = ["raw", "xpress", "lznt1", "fill", "variable"]
PAN_A = "4111111111111111"


def page(seed: int) -> bytes:
    r = random.Random(seed)
    b = bytearray(PAGE)
    for k in range(0, PAGE, 64):
        x = r.random()
        if x < 0.3:
            b[k : k + 64] = r.randbytes(64)
        elif x < 0.6:
            b[k : k + 40] = b"the quick brown fox jumps over the lazy "
    return bytes(b)


def memory(runs, seed: int = 0, every: int = 11) -> dict[int, bytes]:
    f = hw.VmrsFile(runs)
    out = {}
    for i in range(0, f.total_pages(), every):
        if f.gpa_of(i) is not None:
            out[i] = page(seed + i)
    pattern = (b"\x11\x22\x33\x44\x55\x66\x77\x88") * (PAGE // 8)
    for i in (1, 2, 4, 5):  # a run of pattern pages and single ones
        out[i] = pattern
    return out


def read_all(path: str) -> dict[tuple[int, int], bytes]:
    got = {}
    with registry.open_image(path) as image:
        for seg in image.segments():
            e = seg.extents
            for k in range(len(e)):
                b, a, n, sp = (int(e.buf_offset[k]), int(e.addr[k]), int(e.length[k]),
                               int(e.space[k]))  # fmt: skip
                for j in range(0, n, PAGE):
                    got[(sp, a + j)] = seg.data[b + j : b + j + PAGE].tobytes()
    return got


def card_line(pan: str) -> bytes:
    """``pan`` as a line of text after a card keyword. It ends with a newline, not a space: a
    digit right after a lone space would join the PAN into a longer digit-group run, which is
    no PAN (patterns/pan.py), and the filler after it may start with a digit."""
    return f" card {pan}\n".encode()


# --- codecs -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=PAGE) | st.builds(lambda s: page(s), st.integers(0, 999)))
def test_test_compressors_agree_with_libfwnt(data):
    assert pyfwnt.lzxpress_decompress(hw.xpress_compress(data), len(data) + 1) == data
    assert pyfwnt.lznt1_decompress(hw.lznt1_compress(data), len(data)) == data


def test_ms_xca_lznt1_example_and_codec_detection():
    # MS-XCA section 3.3: a 142-byte string compressed to 59 bytes of LZNT1.
    vector = bytes.fromhex(
        "38b08846232000204720410010a24701a045204400084501507900c04520052413"
        "8805b4024a44ef0358028c09160148450 0be009e00040118900 0".replace(" ", "")
    )
    out, codec = hyperv.decode_page(vector, 142)
    assert (
        codec == "lznt1"
        and out.startswith(b"F# F# G A A G F# E D D E F# F# E E")
        and len(out) == 142
    )
    text = page(5)
    assert hyperv.decode_page(hw.xpress_compress(text), PAGE) == (text, "xpress")
    assert hyperv.decode_page(hw.lznt1_compress(text), PAGE) == (text, "lznt1")
    with pytest.raises(ValueError):
        hyperv.decode_page(hw.xpress_compress(text + text[:100]), PAGE)  # too long: refused


def test_benchmark_writer_round_trips_and_compresses_each_distinct_page_once(
    tmp_path, monkeypatch, read_gpa
):
    rng = random.Random(7)
    kinds = [bytes(PAGE), page(1), page(2), page(3), rng.randbytes(PAGE)]
    pages = [kinds[rng.randrange(len(kinds))] for _ in range(300)]  # two RamBlocks
    raw = tmp_path / "m.img"
    raw.write_bytes(b"".join(pages))
    calls = []
    real = hw.xpress_compress
    monkeypatch.setattr(hw, "xpress_compress", lambda data: calls.append(data) or real(data))
    runs = hw.write_vmrs_from_raw(str(raw), str(tmp_path / "m.vmrs"))
    assert runs == [(0, 300)]
    assert sorted(calls) == sorted(set(pages) - {bytes(PAGE), kinds[4]})  # each once, no random
    with registry.open_image(str(tmp_path / "m.vmrs")) as image:
        assert image.warnings == []
        assert read_gpa(image, 0, 300 * PAGE) == raw.read_bytes()


# --- layout readings ----------------------------------------------------------------------------


@pytest.mark.parametrize("table_at", ["dissect", "beyer", "vmkatz"])
@pytest.mark.parametrize(
    "fd, fc", [("pattern-count", "sized"), ("count-pattern", "one-page")], ids=["beyer", "vmkatz"]
)
@pytest.mark.parametrize("runs", [GEN1, GEN2], ids=["gen1", "gen2"])
def test_every_reading_maps_every_page_to_its_gpa(tmp_path, table_at, fd, fc, runs):
    pages = memory(runs)
    f = hw.VmrsFile(runs, pages, encoding=ALL, fd_order=fd, fc_mode=fc, table_at=table_at,
                    raw_blocks={1}, seed=3)  # fmt: skip
    path = f.write(str(tmp_path / "vm.vmrs"))
    assert registry.detect(path)[1] == "hyperv-vmrs"
    got = read_all(path)
    for i, data in pages.items():
        assert got.get((0, f.gpa_of(i)), bytes(PAGE)) == data, (i, hex(f.gpa_of(i)))
    with registry.open_image(path) as image:
        assert image.warnings == []
        assert image.meta["ram_size"] == sum(n for _, n in runs) * PAGE
        assert image.meta["gpa_layout"] == "RamMemoryBlock runs"


def test_no_memory_keys_maps_ramblocks_identity_with_a_remark(tmp_path, scan_result):
    pages = memory(GEN2)
    f = hw.VmrsFile(GEN2, pages, memory_keys=False)
    path = f.write(str(tmp_path / "id.vmrs"))
    got = read_all(path)
    for i, data in pages.items():
        assert got.get((0, i * PAGE), bytes(PAGE)) == data
    result = scan_result(path)
    assert result.errors == [] and len(result.warnings) == 1
    assert "may be wrong" in result.warnings[0]


@pytest.mark.parametrize(
    "seqs, bad, winner", [((1, 2), None, 0x1000), ((5, 4), None, 0), ((0xFFFF, 0), None, 0x1000),
                          ((1, 2), 1, 0), ((3, 2), 0, 0x1000)],
)  # fmt: skip
def test_active_header(tmp_path, seqs, bad, winner):
    f = hw.VmrsFile(GEN2, memory(GEN2), sequences=seqs, bad_header=bad)
    path = f.write(str(tmp_path / "h.vmrs"))
    with registry.open_image(path) as image:
        assert image.meta["active_header"].startswith(f"{winner:#x}")


def test_scan_finds_pans_below_and_above_the_gap_and_extract(tmp_path, scan_result, vmleak):
    pages = memory(GEN1)
    low = bytearray(page(1))
    low[4090:] = b" card "
    nxt = bytearray(page(2))
    nxt[:17] = (PAN_A + " ").encode()  # straddles two pages, inside one XPRESS block
    high_i = 0x200 + 0x10  # a page in the run at 4 GiB
    hi = bytearray(page(3))
    hi[100:123] = card_line(PAN_A)
    pages.update({0x10: bytes(low), 0x11: bytes(nxt), high_i: bytes(hi)})
    f = hw.VmrsFile(GEN1, pages, encoding=["xpress", "lznt1", "raw"], seed=4)
    path = f.write(str(tmp_path / "g1.vmrs"))
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    assert sorted(x.gpa for x in result.findings if x.detector == "pan") == [
        0x10 * PAGE + 4096 - 0,  # the PAN starts on the next page
        f.gpa_of(high_i) + 106,
    ]
    out = tmp_path / "guest.raw"
    r = vmleak("extract", path, "-o", str(out))
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as fh:
        for i, data in pages.items():
            fh.seek(f.gpa_of(i))
            assert fh.read(PAGE) == data, i


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    index=st.sampled_from([*range(0, 0x180, 7), *range(0x200, 0x240, 5)]),
    offset=st.integers(0, PAGE - 40),
    enc=st.sampled_from(["raw", "xpress", "lznt1", "variable", "mix"]),
    seed=st.integers(0, 1 << 16),
)
def test_any_pan_at_any_gpa_is_found_once_there(tmp_path, scan_result, index, offset, enc,
                                                 seed):
    f0 = hw.VmrsFile(GEN2)
    rng = random.Random(seed)
    body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
    pan = body + luhn_digit(body)  # a Visa number: an issuer every rule set reports
    pages = {index: bytearray(page(seed))}
    text = card_line(pan)
    pages[index][offset : offset + len(text)] = text
    f = hw.VmrsFile(GEN2, {k: bytes(v) for k, v in pages.items()},
                    encoding=ALL if enc == "mix" else enc, seed=seed)  # fmt: skip
    path = f.write(str(tmp_path / "p.vmrs"))
    gpa = f0.gpa_of(index)
    found = [x.gpa for x in scan_result(path).findings if x.detector == "pan"]
    assert found == [gpa + offset + 6]


def test_unknown_tag_is_an_error_after_the_readable_blocks(tmp_path):
    pages = memory(GEN2)
    pages[256] = b"UNIQUE-PAGE-256!" + page(77)[16:]
    f = hw.VmrsFile(GEN2, pages, encoding="raw")
    data = bytearray(f.to_bytes())
    # Block 1's first tag (4096: a raw page) becomes an unknown tag.
    second = data.index(b"\x00\x10\x00\x00" + pages[256][:16])
    data[second : second + 4] = b"\x00\x20\x00\x00"
    path = tmp_path / "t.vmrs"
    path.write_bytes(bytes(data))
    with registry.open_image(str(path)) as image:
        msgs = [str(w) for w in image.warnings]
    assert any("unknown RamBlock page tag 0x00002000" in m and f"{second:#x}" in m for m in msgs)
    got = read_all(str(path))
    assert got[(0, f.gpa_of(0))] == pages[0]  # block 0 still read


def test_coverage_declared_by_the_runs_against_the_pages_read(tmp_path, vmleak):
    declared = sum(n for _, n in GEN2) * PAGE
    f = hw.VmrsFile(GEN2, memory(GEN2), encoding=ALL, seed=5)
    path = f.write(str(tmp_path / "ok.vmrs"))
    with registry.open_image(path) as image:
        cov = image.coverage
        assert (cov.declared, cov.read, cov.missing) == (declared, declared, 0)
        assert cov.declared_by == "the RamMemoryBlock runs" and cov.outside == 32 * len(GEN2)
    # Block 1 unreadable (an unknown tag): its 128 pages inside the first run are missing.
    pages = memory(GEN2)
    pages[256] = b"UNIQUE-PAGE-256!" + page(77)[16:]
    data = bytearray(hw.VmrsFile(GEN2, pages, encoding="raw").to_bytes())
    second = data.index(b"\x00\x10\x00\x00" + pages[256][:16])
    data[second : second + 4] = b"\x00\x20\x00\x00"
    bad = tmp_path / "bad.vmrs"
    bad.write_bytes(bytes(data))
    with registry.open_image(str(bad)) as image:
        assert image.coverage.missing == (0x180 - 256) * PAGE
    r = vmleak("scan", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "guest memory missing: the RamMemoryBlock runs declares" in r.stderr


def test_undecodable_page_is_missing_memory_after_the_scan(tmp_path, scan_result):
    text = page(3)
    f = hw.VmrsFile(GEN2, {0x10: text, 0x20: page(4)}, encoding="xpress")
    data = bytearray(f.to_bytes())
    packed = hw.xpress_compress(text)
    at = data.index(packed)
    data[at : at + len(packed)] = bytes(len(packed))  # all literals: too short, and no LZNT1
    path = tmp_path / "z.vmrs"
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert any(f"{at:#x}" in e and "compressed page" in e for e in result.errors)
    assert any("guest memory missing" in e for e in result.errors)
    assert result.meta["coverage"]["missing"] == PAGE


# --- legacy .bin + .vsv ---------------------------------------------------------------------------


def test_bin_needs_its_vsv_and_is_grouped_with_it(tmp_path, scan_result, vmleak):
    mem = bytearray(8 * PAGE)
    mem[5000:5023] = card_line(PAN_A)
    b = tmp_path / "0A1B2C3D-VM.bin"
    b.write_bytes(bytes(mem))
    assert registry.detect(str(b))[1] == "raw"  # no .vsv: flat memory, nothing Hyper-V about it
    v = tmp_path / "0A1B2C3D-VM.VSV"
    v.write_bytes(b"\x01\x00device state".ljust(2 * PAGE, b"\0"))
    assert registry.detect(str(b))[1] == "hyperv-bin"
    with registry.open_image(str(v), "hyperv-bin") as image:
        assert image.path == str(b) and image.files == [str(b), str(v)]
    assert registry.primaries([str(b), str(v)]) == [str(b)]
    result = scan_result(str(b))
    assert [x.gpa for x in result.findings] == [5006]
    r = vmleak("scan", "--detectors", "pan", "--format", "jsonl", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert r.stdout.count('"pan"') == 1 and '"hyperv-bin"' in r.stdout


def test_vsv_is_scanned_as_device_state(tmp_path, scan_result):
    b = tmp_path / "VM.bin"
    b.write_bytes(bytes(4 * PAGE))
    vsv = bytearray(b"\x01\x00device state".ljust(3 * PAGE, b"\0"))
    vsv[PAGE - 10 : PAGE + 13] = card_line(PAN_A)  # across a page boundary of the file
    v = tmp_path / "VM.vsv"
    v.write_bytes(bytes(vsv))
    result = scan_result(str(b))
    assert result.errors == [] and result.warnings == []
    [f] = [x for x in result.findings if x.detector == "pan"]
    assert (f.gpa, f.file, f.offset) == (None, str(v), PAGE - 4)
    assert f.details["region"] == "device-state" and "stream_offset" not in f.details
    with registry.open_image(str(b)) as image:
        assert image.meta["vsv_size"] == 3 * PAGE
        cov = image.coverage  # nothing declares a .bin's size: what it holds is read
        assert (cov.declared, cov.read, cov.outside) == (None, 4 * PAGE, 3 * PAGE)


def test_vmrs_device_state_keys_are_scanned_as_device_state(tmp_path, scan_result):
    small = b"\x02\x00nic buffer" + card_line(PAN_A)  # in the key table
    big = bytearray(b"vga state".ljust(3 * PAGE, b"\0"))  # a file object
    big[PAGE - 10 : PAGE + 13] = card_line(PAN_A)
    f = hw.VmrsFile(GEN2, memory(GEN2), device_keys={"nic": small, "vga": bytes(big)})
    path = f.write(str(tmp_path / "d.vmrs"))
    data = open(path, "rb").read()
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    found = sorted((x.offset, x.gpa, x.details["region"], "stream_offset" in x.details)
                   for x in result.findings if x.detector == "pan")  # fmt: skip
    at_small, at_big = data.index(small), data.index(bytes(big))
    assert found == sorted([(at_small + 18, None, "device-state", False),
                            (at_big + PAGE - 4, None, "device-state", False)])  # fmt: skip
    with registry.open_image(path) as image:
        # the two values and the RamMemoryBlock runs (32 bytes each); never the RamBlocks
        assert image.meta["device_state_bytes"] == len(small) + len(big) + 32 * len(GEN2)


def test_unreadable_vsv_is_a_warning_and_the_bin_is_scanned(tmp_path, scan_result):
    b = tmp_path / "VM.bin"
    mem = bytearray(4 * PAGE)
    mem[100:123] = card_line(PAN_A)
    b.write_bytes(bytes(mem))
    (tmp_path / "VM.vsv").mkdir()  # a directory of that name: not readable as a file
    with registry.open_image(str(b), "hyperv-bin") as image:
        assert any("not a regular file" in str(w) for w in image.warnings)
    result = scan_result(str(b), fmt="hyperv-bin")
    assert [x.gpa for x in result.findings] == [106]


# --- hostile files ------------------------------------------------------------------------------


def drain(path: str) -> list[str]:
    problems = []
    try:
        with registry.open_image(path, "hyperv-vmrs") as image:
            problems += [str(x) for x in image.warnings]
            for _ in image.segments():
                pass
    except ImageError as err:
        problems.append(str(err))
    return problems


_BASE = hw.VmrsFile(GEN2, memory(GEN2, every=17), encoding=ALL, seed=9).to_bytes()


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, len(_BASE)),
    flips=st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=6),
)
def test_truncated_or_flipped_files_give_clear_errors(tmp_path, cut, flips):
    data = bytearray(_BASE[:cut])
    for at, v in flips:
        if at < len(data):
            data[at] = v
    path = tmp_path / "hostile.vmrs"
    path.write_bytes(bytes(data))
    for p in drain(str(path)):
        assert str(path) in p and "\n" not in p


def test_absurd_counts_and_sizes(tmp_path):
    import struct
    import tracemalloc

    data = bytearray(_BASE)
    # object table claiming 2**32-1 entries; RamBlock pointers far past the end of file
    data[0x2004:0x2008] = struct.pack("<I", 0xFFFFFFFF)
    p = tmp_path / "absurd.vmrs"
    p.write_bytes(bytes(data))
    tracemalloc.start()
    problems = drain(str(p))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert problems and peak < 64 << 20


def test_pan_across_pages_is_found_among_many_pages_beside_zero_pages(
    tmp_path, scan_result, monkeypatch
):
    """A PAN running from a raw page into a pattern page is found when thousands of raw pages,
    each beside zero-pattern pages, follow it, and the engine's store of unmatched memory edges
    is small. Zero-pattern pages lie in the windows as zeros, so a stored page beside one
    leaves no edge that never meets a partner (such edges once filled the store, which then
    forgot the raw page's edge before the pattern page's came: the PAN was missed)."""
    from scanner import engine

    monkeypatch.setattr(engine, "PENDING_LIMIT", 256 << 10)
    line = card_line("5555555555554444")  # " card 555555555555" | "4444\n"
    pages = {0x100 + 2 * k: page(k) for k in range(3000)}
    pages[0x10] = page(9999)[: PAGE - 18] + line[:18]
    pages[0x11] = (line[18:] + b"   ") * (PAGE // 8)  # a pattern page: a fill tag
    path = hw.VmrsFile([(0, 0x2000)], pages, encoding="fill").write(str(tmp_path / "z.vmrs"))
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    found = [(f.gpa, f.masked) for f in result.findings if f.detector == "pan"]
    assert found == [(0x11 * PAGE - 18 + 6, "555555******4444")]
