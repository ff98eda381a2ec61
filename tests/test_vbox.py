"""VirtualBox saved states (.sav): GPAs below and above the RAM hole, live saves whose later
passes supersede earlier page copies, MMIO2 (video RAM) pages without a GPA, every record kind
(LZF, raw, zero, pages split across records), extract, and hostile files (hypothesis).

Fixtures come from ``tests/vbox_writer.py``, written from the same public sources as the parser
(no VirtualBox product runs here)."""

from __future__ import annotations

import os
import random

import lzf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers import registry, vbox
from parsers.base import Evidence, ImageError
from tests import vbox_writer as w
from tests.plant import luhn_digit

PAGE = w.PAGE
GiB = 1 << 30
HIGH = 4 * GiB  # RAM above the hole starts here
LOW_END = HIGH - w.MAX_HOLE  # the writer's RAM below 4 GiB ends here (its default RAM hole)
PAN_A = "4111111111111111"
PAN_B = "5555555555554444"
PAN_C = "4012888888881881"
PAN_D = "378282246310005"


def filler(seed: int) -> bytes:
    """A page of memory-like bytes: some text, some zeros, some noise (compresses a little)."""
    rng = random.Random(seed)
    out = bytearray(PAGE)
    for k in range(0, PAGE, 64):
        if rng.random() < 0.5:
            out[k : k + 64] = rng.randbytes(64)
        elif rng.random() < 0.5:
            out[k : k + 20] = b"the quick brown fox "
    return bytes(out)


def card_line(pan: str) -> bytes:
    """``pan`` as a line of text after a card keyword. It ends with a newline, not a space: a
    digit right after a lone space would join the PAN into a longer digit-group run, which is
    no PAN (patterns/pan.py), and the filler after it may start with a digit."""
    return f" card {pan}\n".encode()


def with_text(page: bytes, at: int, text: str) -> bytes:
    b = bytearray(page)
    data = card_line(text)
    b[at : at + len(data)] = data
    return bytes(b)


def pans(result) -> list[tuple[int | None, str | None, str]]:
    """(gpa, region or block, masked) of every PAN finding, sorted."""
    out = []
    for f in result.findings:
        if f.detector == "pan":
            where = f.details.get("region") or f.details.get("block")
            out.append((f.gpa, where, f.masked))
    return sorted(out, key=lambda t: (t[0] is None, t[0] or 0, t[1] or "", t[2]))


def mmio2() -> list[w.Range]:
    return [w.Range(1, "VRam", 1 << 20)]


def simple_pass() -> w.Pass:
    """RAM pages below the hole and above 4 GiB, a zero and a ballooned page, MMIO2 pages."""
    return w.Pass(
        ram={
            0x0: filler(1),
            0x1000: with_text(filler(2), 4000, PAN_A),  # straddles into the next page
            0x2000: filler(3),
            0x3000: None,
            0x4000: "balloon",
            HIGH: with_text(filler(4), 100, PAN_B),
            HIGH + 0x1000: filler(5),
        },
        mmio2={(1, 0): with_text(filler(6), 300, PAN_C), (1, 1): None},
        rom_virgin={(1, 0): filler(7)},
        rom_shadow={(1, 0): None},
    )


def roms() -> list[w.Range]:
    return [w.Range(1, "PC BIOS", PAGE, gcphys=0xFFFFF000)]


@pytest.mark.parametrize("codec", ["ssm", "raw", "small", ["ssm", "raw", "small"]], ids=str)
def test_plain_save_gpas_mmio2_and_rom(tmp_path, codec, scan_result):
    path = w.SavFile([simple_pass()], mmio2=mmio2(), rom=roms(), codec=codec, seed=5).write(
        str(tmp_path / "vm.sav")
    )
    assert registry.detect(path)[1] == "vbox-sav"
    with registry.open_image(path) as image:
        assert image.format == "vbox-sav"
        # the smallest whole-MiB RAM holding the pages given, 64 MiB of it below the hole
        assert image.meta["ram_size"] == 65 << 20 and image.meta["ram_hole"] == w.MAX_HOLE
        assert image.meta["pgm_passes"] == ["final"]
        assert image.warnings == []
        assert "block:VRam" in image.spaces and "block:PC BIOS (virgin)" in image.spaces
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    assert pans(result) == [
        (0x1000 + 4006, None, "411111******1111"),
        (HIGH + 106, None, "555555******4444"),
        (None, "block:VRam", "401288******1881"),
    ]


def test_live_save_last_pass_wins_and_superseded_copies_are_reported(tmp_path, scan_result):
    p0 = w.Pass(
        ram={0x1000: with_text(filler(1), 10, PAN_A), 0x2000: with_text(filler(2), 10, PAN_D)},
        mmio2={(1, 0): with_text(filler(3), 10, PAN_C)},
    )
    p1 = w.Pass(ram={0x1000: with_text(filler(4), 50, PAN_B)})
    final = w.Pass(ram={0x2000: None, 0x1000: with_text(filler(5), 50, PAN_B)})
    path = w.SavFile([p0, p1, final], mmio2=mmio2(), seed=2).write(str(tmp_path / "live.sav"))
    with registry.open_image(path) as image:
        assert image.meta["live_save"] and image.meta["pgm_passes"] == [0, 1, "final"]
        assert image.meta["superseded_copies"] == 3
    found = pans(scan_result(path))
    # The guest's page 0x1000 is the final pass's copy; 0x2000 ended as a zero page.
    assert (0x1000 + 56, None, "555555******4444") in found
    assert [f for f in found if f[0] is not None] == [(0x1000 + 56, None, "555555******4444")]
    old = sorted(f[2] for f in found if f[1] and "superseded" in f[1])
    # pass 0's PAN_A and PAN_D and pass 1's PAN_B copy: still bytes in the file
    assert old == sorted(["411111******1111", "3782*******0005", "555555******4444"])
    assert (None, "block:VRam", "401288******1881") in found  # MMIO2 page never superseded


def test_extract_equals_the_guest_memory(tmp_path, vmleak):
    rng = random.Random(9)
    final: dict[int, bytes | str | None] = {}
    expected: dict[int, bytes] = {}
    for k in range(24):
        gpa = rng.choice([0, LOW_END - 24 * PAGE, HIGH]) + k * PAGE
        data = filler(100 + k)
        final[gpa] = data
        expected[gpa] = data
    p0 = w.Pass(ram={g: filler(900 + i) for i, g in enumerate(list(final)[:8])})
    path = w.SavFile([p0, w.Pass(ram=final)], codec=["ssm", "raw", "small"], seed=4).write(
        str(tmp_path / "x.sav")
    )
    out = tmp_path / "guest.raw"
    r = vmleak("extract", path, "-o", str(out))
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as fh:
        for gpa, data in expected.items():
            fh.seek(gpa)
            assert fh.read(PAGE) == data, hex(gpa)
    # the save has a zero-page record for every other RAM page: the copy ends where RAM does
    with registry.open_image(path) as image:
        ram_end = int(image.meta["ram_layout"][-1].split("-")[1], 16) + 1
    assert max(expected) + PAGE < ram_end
    assert os.path.getsize(out) == ram_end


def test_info_and_scan_cli(tmp_path, vmleak):
    path = w.SavFile([simple_pass()], mmio2=mmio2(), rom=roms()).write(str(tmp_path / "v.sav"))
    info = vmleak("info", path)
    assert info.returncode == 0, info.stderr
    assert "vbox-sav" in info.stdout and "VRam" in info.stdout
    r = vmleak("scan", "--detectors", "pan", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "411111******1111" in r.stdout


def test_v1_files_and_other_versions_are_clear_errors(tmp_path):
    p = tmp_path / "old.sav"
    p.write_bytes(b"\x7fVirtualBox SavedState V1.2\n" + bytes(100))
    with pytest.raises(ImageError, match="'V1.2' is not supported"):
        registry.open_image(str(p))


def test_unknown_page_record_is_an_error_after_the_readable_pages(tmp_path, scan_result):
    data = bytearray(w.SavFile([simple_pass()], codec="raw", mmio2=mmio2(), rom=roms()).to_bytes())
    # The record type byte of the page at HIGH + 0x1000 (implicit, right after HIGH's page):
    # the raw record holding the single byte 0x01 before the last RAM page.
    page = filler(5)
    at = data.index(page) - 4 - 3  # raw record header (3 bytes: 0x92 0x81 0x01?) + type byte
    rec = data.rfind(b"\x92\x01\x01", 0, at + 8)
    assert rec > 0
    data[rec + 2] = 0x42
    path = tmp_path / "bad.sav"
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert any("unknown pgm page record type 0x42" in e for e in result.errors)
    found = pans(result)
    assert (0x1000 + 4006, None, "411111******1111") in found  # before the bad record


# --- device units (region:device-state) ------------------------------------------------------


@pytest.mark.parametrize("size", [100, 3 * PAGE], ids=["raw-record", "lzf-records"])
def test_device_units_are_scanned_as_device_state(tmp_path, scan_result, read_present, size):
    """A PAN in a device unit's data: stored plainly (one small RAW record), or inside a
    compressible 12 KiB put (LZF records), straddling two of its 4 KiB records."""
    state = bytearray(b"\x11" * size)
    at = 40 if size < PAGE else PAGE - 10
    state[at : at + 23] = card_line(PAN_A)
    sav = w.SavFile([simple_pass()], mmio2=mmio2(), rom=roms(), device_state=bytes(state))
    path = sav.write(str(tmp_path / "d.sav"))
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    [f] = [x for x in result.findings if x.details.get("region") == "device-state"]
    assert f.gpa is None and f.masked == "411111******1111"
    with registry.open_image(path) as image:
        assert image.meta["device_state_bytes"] >= size
        space = image.space_id("region:device-state")
        if size < PAGE:  # plainly stored: the file offset, and the stream address maps there
            assert "stream_offset" not in f.details
            with open(path, "rb") as fh:
                fh.seek(f.offset)
                assert fh.read(16) == PAN_A.encode()
            assert read_present(image, f.addr, 16, space) == PAN_A.encode()
        else:
            assert f.offset is None
            assert read_present(image, f.details["stream_offset"], 16, space) == PAN_A.encode()


def test_damaged_device_record_is_an_error_after_the_pages(tmp_path, scan_result):
    state = bytes(range(200)) * 40  # 8000 bytes: one LZF record and a RAW tail
    sav = w.SavFile([simple_pass()], mmio2=mmio2(), rom=roms(), device_state=state)
    path = sav.write(str(tmp_path / "bad.sav"))
    # The vga unit's records: RAW (its registers), LZF (a 4 KiB table), LZF (the state's first
    # 4 KiB), RAW (the rest). The third record's payload becomes an out-of-range back reference.
    st = vbox._State(path, os.path.getsize(path))
    ev = Evidence(path)
    vbox.walk(ev, st)
    ev.close()
    [pos] = [u.data_offset for u in st.units if u.name == "vga"]
    data = bytearray(sav.to_bytes())
    recs = []
    while len(recs) < 3:
        rtype, p, n = vbox.read_record_header(np.frombuffer(data, np.uint8), pos, len(data), st)
        recs.append((rtype, p))
        pos = p + n
    assert [r for r, _ in recs] == [vbox.REC_RAW, vbox.REC_LZF, vbox.REC_LZF]
    data[recs[2][1] + 1 : recs[2][1] + 9] = b"\xff" * 8
    with open(path, "wb") as fh:
        fh.write(data)
    result = scan_result(path)
    assert any("LZF record" in e for e in result.errors)
    assert (0x1000 + 4006, None, "411111******1111") in pans(result)  # guest pages scanned


# --- declared RAM against RAM read (contract 4) ---------------------------------------------

KIB = 1 << 10
LEGACY = 384 * KIB  # 0xA0000-0xFFFFF: never RAM pages in a .sav


@pytest.mark.parametrize("passes", [1, 3], ids=["plain", "live"])
def test_complete_save_is_no_error_and_states_what_virtualbox_leaves_out(
    tmp_path, scan_result, passes
):
    """Every RAM page of 8 MiB written as VirtualBox writes it: no error; the legacy area and a
    ROM range inside RAM are excluded on purpose, with the reason; a RAM page an older
    VirtualBox saved inside the legacy area (0xC8000) counts as read."""
    rom = [w.Range(1, "VGA BIOS", 0x8000, gcphys=0xC0000), w.Range(2, "Test ROM", 2 * PAGE,
           gcphys=0x300000)]  # fmt: skip
    final = w.Pass(ram={0x1000: with_text(filler(1), 10, PAN_A), 0xC8000: filler(2)})
    plist = [w.Pass(ram={0x1000: filler(3)}) for _ in range(passes - 1)] + [final]
    path = w.SavFile(plist, ram_size=8 << 20, rom=rom).write(str(tmp_path / "c.sav"))
    with registry.open_image(path) as image:
        cov = image.coverage
        assert image.warnings == []
        assert (cov.declared, cov.missing) == (8 << 20, 0)
        assert cov.excluded == LEGACY - PAGE + 2 * PAGE
        assert cov.read == (8 << 20) - cov.excluded
        assert "0xA0000-0xFFFFF" in cov.excluded_why and "Test ROM" in cov.excluded_why
    result = scan_result(path)
    assert result.errors == [] and result.meta["coverage"]["missing"] == 0
    assert (0x1000 + 16, None, "411111******1111") in pans(result)


def test_truncated_save_is_missing_memory_and_the_rest_is_scanned(tmp_path, vmleak):
    """A save cut inside its page records: one declared-vs-read line, exit 2, and the pages
    before the cut are scanned (scan, info and extract alike)."""
    page = with_text(filler(1), 10, PAN_A)
    data = w.SavFile([w.Pass(ram={0x1000: page})], ram_size=8 << 20, codec="raw").to_bytes()
    cut = data.index(page) + PAGE + 1000  # in the run of zero-page records after it
    path = tmp_path / "cut.sav"
    path.write_bytes(data[:cut])
    r = vmleak("scan", "--detectors", "pan", str(path))
    assert r.returncode == 2, r.stderr
    assert "411111******1111" in r.stdout
    [line] = [x for x in r.stderr.splitlines() if "guest memory missing" in x]
    assert str(path) in line and "the pgm unit's RAM config declares 8,388,608 bytes" in line
    for cmd in (["info", str(path)], ["extract", str(path), "-o", str(tmp_path / "x.raw")]):
        assert vmleak(*cmd).returncode == 2


def test_pages_missing_from_a_whole_file_are_an_error(tmp_path, scan_result):
    """A file that ends properly but lacks pages its RAM config declares (a writer that skipped
    them, or records lost in a splice): missing memory, an error."""
    sav = w.SavFile([w.Pass(ram={0x1000: with_text(filler(1), 10, PAN_A)})], ram_size=8 << 20,
                    complete=False)  # fmt: skip
    result = scan_result(sav.write(str(tmp_path / "sparse.sav")))
    assert result.meta["coverage"]["missing"] == (8 << 20) - LEGACY - PAGE
    assert any("guest memory missing" in e for e in result.errors)
    assert (0x1000 + 16, None, "411111******1111") in pans(result)


def test_undecodable_page_is_missing_memory_after_the_scan(tmp_path, scan_result):
    page = filler(4)
    data = bytearray(w.SavFile([w.Pass(ram={0x2000: page})], ram_size=4 << 20).to_bytes())
    packed = lzf.compress(page, PAGE - PAGE // 16)
    assert packed
    at = data.index(packed)
    data[at : at + 8] = b"\xff" * 8  # a back reference before the start
    path = tmp_path / "lzf.sav"
    path.write_bytes(bytes(data))
    result = scan_result(str(path))
    assert any("LZF record" in e for e in result.errors)
    assert any("guest memory missing" in e for e in result.errors)
    assert result.meta["coverage"]["missing"] == PAGE


# --- hypothesis: any PAN at any GPA, whatever the record mix ---------------------------------


@st.composite
def layouts(draw):
    n_pages = draw(st.integers(2, 12))
    base = draw(st.sampled_from([0, 0x100000, LOW_END - 41 * PAGE, HIGH, HIGH + 0x3FF000]))
    gpas = sorted(draw(st.sets(st.integers(0, 40), min_size=n_pages, max_size=n_pages)))
    gpas = [base + g * PAGE for g in gpas]
    target = draw(st.sampled_from(gpas))
    offset = draw(st.integers(0, PAGE - 1))
    passes = draw(st.integers(1, 3))
    codec = draw(st.sampled_from(["ssm", "raw", "small", "mix"]))
    seed = draw(st.integers(0, 1 << 16))
    return gpas, target, offset, passes, codec, seed


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layouts())
def test_any_pan_at_any_gpa_is_found_once_there(tmp_path, scan_result, layout):
    gpas, target, offset, passes, codec, seed = layout
    rng = random.Random(seed)
    body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
    pan = body + luhn_digit(body)  # a Visa number: an issuer every rule set reports
    text = card_line(pan)
    mem = {g: bytearray(filler(seed + i)) for i, g in enumerate(gpas)}
    # the PAN at target+offset, spilling into the next page when that page is present
    start = target + offset
    for k, byte in enumerate(text):
        g = (start + k) // PAGE * PAGE
        if g not in mem:
            text = text[:k]
            break
        mem[g][(start + k) % PAGE] = byte
    whole = pan in text.decode()
    # earlier passes hold unrelated data at some of the same pages
    plist = [w.Pass(ram={g: filler(7000 + i) for i, g in enumerate(gpas) if rng.random() < 0.5})
             for _ in range(passes - 1)]  # fmt: skip
    plist.append(w.Pass(ram={g: bytes(b) for g, b in mem.items()}))
    mix = ["ssm", "raw", "small"] if codec == "mix" else codec
    path = w.SavFile(plist, codec=mix, seed=seed).write(str(tmp_path / "h.sav"))
    found = [f for f in pans(scan_result(path)) if f[0] is not None]
    if whole:  # the filler holds no card numbers: the planted one is the only finding
        assert [(f[0], f[2][-4:]) for f in found] == [(start + 6, pan[-4:])]
    else:
        assert found == []


# --- hostile files -----------------------------------------------------------------------------


def drain(path: str) -> list[str]:
    """Open and read every segment; return the problems. Anything but ImageError fails."""
    problems = []
    try:
        with registry.open_image(path, "vbox-sav") as image:
            problems += [str(x) for x in image.warnings]
            for seg in image.segments():
                assert seg.extents.buf_offset.size == seg.extents.length.size
    except ImageError as err:
        problems.append(str(err))
    return problems


_BASE = w.SavFile(
    [simple_pass(), w.Pass(ram={0x1000: filler(11)})], mmio2=mmio2(), rom=roms(), codec="ssm"
).to_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, len(_BASE)),
    flips=st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=6),
)
def test_truncated_or_flipped_files_give_clear_errors(tmp_path, cut, flips):
    data = bytearray(_BASE[:cut] if cut < len(_BASE) else _BASE)
    for at, v in flips:
        if at < len(data):
            data[at] = v
    path = tmp_path / "hostile.sav"
    path.write_bytes(bytes(data))
    problems = drain(str(path))
    for p in problems:
        assert str(path) in p and "\n" not in p
    if cut < len(_BASE) and cut >= 64:
        assert problems  # a truncated file always says so


def test_absurd_sizes_do_not_allocate(tmp_path):
    import tracemalloc

    data = bytearray(_BASE)
    # a record header claiming 2 GiB of data; a LZF record claiming 255 KiB decoded
    at = data.index(b"\x93", 64 + 44)
    bad = bytes(data[:at]) + bytes([0x92, 0xFD, 0xBF, 0xBF, 0xBF, 0xBF, 0xBF]) + bytes(64)
    bad2 = bytearray(data)
    lz = bad2.index(b"\x93\xe0")
    bad2[lz + 4] = 255
    for i, blob in enumerate((bad, bytes(bad2))):
        p = tmp_path / f"absurd{i}.sav"
        p.write_bytes(blob)
        tracemalloc.start()
        problems = drain(str(p))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert problems and peak < 64 << 20


def test_lzf_record_layout_matches_ssm():
    """Each compressed page is one record: 0x93, a 3-byte size, the KiB byte (4), LZF data."""
    u = w._Unit("ssm", random.Random(0))
    u.big(filler(1))
    out = bytes(u.out)
    assert out[0] == 0x93 and out[1] & 0xF0 == 0xE0 and out[4] == 4
    st_ = vbox._State("x", len(out))
    rtype, p, n = vbox.read_record_header(np.frombuffer(out, np.uint8), 0, len(out), st_)
    assert (rtype, p, n) == (3, 4, len(out) - 4)


def test_pan_across_pages_is_found_among_many_pages_beside_zero_pages(
    tmp_path, scan_result, monkeypatch
):
    """A PAN running from a raw page into an LZF one is found when thousands of stored pages,
    each beside zero pages, come before it, and the engine's store of unmatched memory edges
    is small. Zero pages lie in the windows as zeros, so a stored page beside one leaves no
    edge that never meets a partner (such edges once filled the store, which then forgot the
    raw page's edge before the LZF page's came: the PAN was missed, with a warning)."""
    from scanner import engine

    monkeypatch.setattr(engine, "PENDING_LIMIT", 256 << 10)
    rng = random.Random(14)
    ram: dict[int, bytes | str | None] = {2 * k * PAGE: filler(k) for k in range(3000)}
    top = 6000 * PAGE
    line = card_line(PAN_B)
    ram[top] = rng.randbytes(PAGE - 8) + line[:8]  # incompressible: a raw record
    ram[top + PAGE] = line[8:] + bytes(PAGE - len(line) + 8)  # compressible: LZF
    path = w.SavFile([w.Pass(ram=ram)], codec="ssm", seed=6).write(str(tmp_path / "z.sav"))
    result = scan_result(path)
    assert result.errors == [] and result.warnings == []
    assert pans(result) == [(top + PAGE - 8 + 6, None, "555555******4444")]


# --- the fast path of the page-record walk -----------------------------------------------------


def walked_table(path: str, fast: bool = True) -> tuple:
    """Everything the walk of ``path`` fills in (page table, device records, problems), with the
    page-record fast path on or off (off: every record through the general path)."""
    saved = vbox._PgmReader._fast_pages
    if not fast:
        vbox._PgmReader._fast_pages = lambda self, base: None
    try:
        ev = Evidence(path)
        s = vbox._State(path, ev.size)
        meta = vbox.walk(ev, s)
        ev.close()
    finally:
        vbox._PgmReader._fast_pages = saved
    arrays = tuple(getattr(s, f).tobytes() for f in ("key", "kind", "where", "clen", "soff",
                   "dev_type", "dev_at", "dev_len", "dev_out", "dev_soff"))  # fmt: skip
    return arrays, s.split, meta, s.stream_base, s.passes, [str(p) for p in s.problems]


@st.composite
def page_runs(draw):
    """A RAM run with every kind of page a guest has: memory-like, incompressible (raw),
    all-zero data (a zero record), zero-page records and ballooned pages, with gaps."""
    ram: dict[int, bytes | str | None] = {}
    gpa = draw(st.sampled_from([0, LOW_END - 30 * PAGE, HIGH]))
    for i in range(draw(st.integers(1, 30))):
        gpa += PAGE * draw(st.sampled_from([1, 1, 1, 2, 9]))
        page = draw(st.sampled_from(["filler", "random", "zeros", "none", "balloon"]))
        ram[gpa] = {"filler": filler(i), "random": random.Random(i).randbytes(PAGE),
                    "zeros": bytes(PAGE), "none": None, "balloon": "balloon"}[page]  # fmt: skip
    return ram


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    runs=st.lists(page_runs(), min_size=1, max_size=3),
    codec=st.sampled_from(["ssm", "raw", "small", "mix"]),
    flips=st.lists(st.tuples(st.integers(64, 1 << 20), st.integers(0, 255)), max_size=3),
    cut=st.integers(64, 1 << 20),
)
def test_fast_page_walk_equals_the_general_one(tmp_path, runs, codec, flips, cut):
    """The fast path fills exactly what the record-by-record path does, for saves of every
    record mix, live saves (later passes), and damaged or truncated ones."""
    mix = ["ssm", "raw", "small"] if codec == "mix" else codec
    plist = [w.Pass(ram=r, mmio2={(1, 0): filler(9)} if k == 0 else {}) for k, r in enumerate(runs)]
    data = bytearray(w.SavFile(plist, mmio2=mmio2(), codec=mix, complete=False).to_bytes())
    for at, v in flips:
        if at < len(data):
            data[at] = v
    path = tmp_path / "f.sav"
    path.write_bytes(bytes(data[:cut]))
    assert walked_table(str(path)) == walked_table(str(path), fast=False)


def test_fast_page_walk_takes_the_usual_records(tmp_path, monkeypatch):
    """A save written as SSM writes one (type bytes, then each page as one LZF, raw or zero
    record) goes through the fast path: the general path reads a handful of type bytes, not
    one per page."""
    rng = random.Random(3)
    ram: dict[int, bytes | str | None] = {}
    for k in range(400):
        ram[k * PAGE] = [filler(k), rng.randbytes(PAGE), bytes(PAGE), None][k % 4]
    path = w.SavFile([w.Pass(ram=ram)], codec="ssm").write(str(tmp_path / "u.sav"))
    calls = []
    u8 = vbox._Cursor.u8
    monkeypatch.setattr(vbox._Cursor, "u8", lambda self: calls.append(1) or u8(self))
    table = walked_table(path)
    monkeypatch.setattr(vbox._Cursor, "u8", u8)
    assert table == walked_table(path, fast=False)
    assert len(table[0][0]) // 8 >= 400 and len(calls) < 40
